"""The worker app of the subprocess tests (outcomes, faults, supervisor, metrics, health).

Run as ``qworker run tests.apps.ledger_app:app`` by :class:`tests.support.workers.WorkerProcess`
(fixture ``worker``); :func:`env` builds its environment. Every setting is an environment
variable, read at import:

- QWORKER_APP_URL: the broker.
- QWORKER_APP_QUEUE: the queue; the app is named ``ledger-<queue>``, also its connection name.
- QWORKER_APP_DELAY: the first retry delay in seconds (default 0.2: tiers 200ms and 400ms).
- QWORKER_APP_LEDGER: file where each successfully handled id is appended before the handler
  returns.
- QWORKER_APP_STARTED: file where each started id is appended.
- QWORKER_APP_PIDS: file where the pid of the process that handled a message successfully is
  appended.
- QWORKER_APP_CHILD_DIES=1: a process started by a supervisor exits 1 as it imports the app.

Payload: {"id": str, "mode": "ok" | "fail_once" | "permanent" | "slow" | "die", "seconds": float}.
``fail_once`` raises a transient error on the first attempt; ``die`` ends the process at once
(``os._exit(1)``), like a segfault would.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from qworker import App, Context, Permanent, RetryPolicy

if os.environ.get("QWORKER_APP_CHILD_DIES") and os.environ.get("QWORKER_SUPERVISOR_DIR"):
    os._exit(1)

QUEUE = os.environ.get("QWORKER_APP_QUEUE", "ledger.default")
DELAY = float(os.environ.get("QWORKER_APP_DELAY", "0.2"))


def app_name(queue: str) -> str:
    """The app's name (and connection name) on ``queue``."""
    return f"ledger-{queue}"


app = App(
    os.environ.get("QWORKER_APP_URL", "amqp://guest:guest@127.0.0.1:5672/"), name=app_name(QUEUE)
)


def env(url: str, queue: str, files: Path) -> dict[str, str]:
    """The variables that run this app on ``queue``, with its ledger files in ``files``."""
    return {
        "QWORKER_APP_URL": url,
        "QWORKER_APP_QUEUE": queue,
        "QWORKER_APP_LEDGER": str(files / "ledger.txt"),
        "QWORKER_APP_STARTED": str(files / "started.txt"),
        "QWORKER_APP_PIDS": str(files / "pids.txt"),
    }


def _append(variable: str, line: str) -> None:
    if path := os.environ.get(variable):
        with open(path, "a") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())


@app.handler(QUEUE, retry=RetryPolicy(max_attempts=3, initial_delay=DELAY, jitter=0))
async def handle(payload: dict[str, Any], ctx: Context) -> None:
    _append("QWORKER_APP_STARTED", payload["id"])
    mode = payload.get("mode", "ok")
    if mode == "slow":
        await asyncio.sleep(float(payload.get("seconds", 1.0)))
    elif mode == "fail_once" and ctx.attempt == 1:
        raise ConnectionError("first attempt fails")
    elif mode == "permanent":
        raise Permanent("bad message")
    elif mode == "die":
        os._exit(1)
    _append("QWORKER_APP_LEDGER", payload["id"])
    _append("QWORKER_APP_PIDS", str(os.getpid()))
