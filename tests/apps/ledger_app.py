"""A worker app for subprocess tests: behaviour chosen per message, successes written to a ledger.

Environment: QWORKER_TEST_URL (broker), QWORKER_TEST_QUEUE (queue), QWORKER_TEST_LEDGER (a file
where each successfully handled message id is appended, one per line, before the handler returns),
QWORKER_TEST_STARTED (optional file where each started message id is appended).
Payload: {"id": str, "mode": "ok" | "fail_once" | "slow" | "permanent", "seconds": float}.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from qworker import App, Context, Permanent, RetryPolicy

app = App(os.environ.get("QWORKER_TEST_URL", "amqp://guest:guest@127.0.0.1:5672/"), name="ledger")
QUEUE = os.environ.get("QWORKER_TEST_QUEUE", "ledger.default")


def _append(path: str | None, line: str) -> None:
    if path:
        with open(path, "a") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())


@app.handler(
    QUEUE,
    retry=RetryPolicy(
        max_attempts=3, initial_delay=float(os.environ.get("QWORKER_TEST_DELAY", "0.2")), jitter=0
    ),
)
async def handle(payload: dict[str, Any], ctx: Context) -> None:
    _append(os.environ.get("QWORKER_TEST_STARTED"), payload["id"])
    mode = payload.get("mode", "ok")
    if mode == "slow":
        await asyncio.sleep(float(payload.get("seconds", 1.0)))
    elif mode == "fail_once" and ctx.attempt == 1:
        raise ConnectionError("first attempt fails")
    elif mode == "permanent":
        raise Permanent("bad message")
    _append(os.environ.get("QWORKER_TEST_LEDGER"), payload["id"])
