"""A worker app for the operations tests (supervisor, metrics, health), run as a subprocess.

Environment: QWORKER_OPS_URL (broker), QWORKER_OPS_QUEUE (queue; the app is named
``ops-<queue>``, which is also its connection name), QWORKER_OPS_LEDGER (file where each
successfully handled id is appended before the handler returns), QWORKER_OPS_STARTED
(file where each started id is appended), QWORKER_OPS_PIDS (file where the pid of the process
that handled a message successfully is appended).
Payload: {"id": str, "mode": "ok" | "fail_once" | "permanent" | "slow" | "die", "seconds": float}.
``die`` ends the process at once (``os._exit(1)``), like a segfault would.
QWORKER_OPS_CHILD_DIES=1 makes a process started by a supervisor exit 1 as it imports the app.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from qworker import App, Context, Permanent, RetryPolicy

if os.environ.get("QWORKER_OPS_CHILD_DIES") and os.environ.get("QWORKER_SUPERVISOR_DIR"):
    os._exit(1)

QUEUE = os.environ.get("QWORKER_OPS_QUEUE", "ops.default")
app = App(
    os.environ.get("QWORKER_OPS_URL", "amqp://guest:guest@127.0.0.1:5672/"), name=f"ops-{QUEUE}"
)


def _append(variable: str, line: str) -> None:
    if path := os.environ.get(variable):
        with open(path, "a") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())


@app.handler(QUEUE, retry=RetryPolicy(max_attempts=3, initial_delay=0.2, jitter=0))
async def handle(payload: dict[str, Any], ctx: Context) -> None:
    _append("QWORKER_OPS_STARTED", payload["id"])
    mode = payload.get("mode", "ok")
    if mode == "slow":
        await asyncio.sleep(float(payload.get("seconds", 1.0)))
    elif mode == "fail_once" and ctx.attempt == 1:
        raise ConnectionError("first attempt fails")
    elif mode == "permanent":
        raise Permanent("bad message")
    elif mode == "die":
        os._exit(1)
    _append("QWORKER_OPS_LEDGER", payload["id"])
    _append("QWORKER_OPS_PIDS", str(os.getpid()))
