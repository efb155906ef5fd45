"""The app ``bench/latency.py`` runs with ``qworker run latency_app:app`` (parts 2 and 3).

Configured by environment variables set by the runner (this module is imported by the CLI):

* ``LAT_MODE=retry``: one handler per ``LAT_TIERS`` entry (``name=seconds,...``) on queue
  ``<LAT_QUEUE>.<name>``, ``RetryPolicy(max_attempts=2, initial_delay=seconds, jitter=0)``.
  Attempt 1 records ``time.monotonic_ns()`` right before it raises ``Transient`` (slot a);
  attempt 2 records its start (slot b). Message ids index the recorder.
* ``LAT_MODE=sigterm``: one handler on ``LAT_QUEUE`` that records its start (slot a), sleeps
  ``LAT_SLEEP`` seconds and records its end (slot b) just before returning.

``LAT_QTYPE`` is the queue type (quorum by default, like qworker's own default).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from latency_workers import URL, Recorder
from pydantic import BaseModel

from qworker import App, Context, RetryPolicy, Transient


class Body(BaseModel):
    id: int
    t: int
    run: str
    kind: str
    pad: str


_MODE = os.environ.get("LAT_MODE", "sigterm")
_QUEUE = os.environ.get("LAT_QUEUE", "lat.app")
_QTYPE: Any = os.environ.get("LAT_QTYPE", "quorum")
_REC_PATH = os.environ.get("LAT_RECORDER")
_REC = Recorder(_REC_PATH, int(os.environ.get("LAT_SLOTS", "0"))) if _REC_PATH else None

app = App(URL, name="bench-latency")


def _retry_handler(queue: str, seconds: float) -> None:
    policy = RetryPolicy(max_attempts=2, initial_delay=seconds, jitter=0)

    async def handle(payload: Body, ctx: Context) -> None:
        now = time.monotonic_ns()
        assert _REC is not None
        if ctx.attempt == 1:
            _REC.put(payload.id, a=time.monotonic_ns())
            _REC.count(started=1)
            raise Transient("first attempt fails")
        _REC.put(payload.id, b=now)
        _REC.count(finished=1)

    handle.__name__ = handle.__qualname__ = f"retry_{queue.rsplit('.', 1)[-1]}"
    app.handler(queue, retry=policy, queue_type=_QTYPE)(handle)


if _MODE == "retry":
    for entry in os.environ.get("LAT_TIERS", "").split(","):
        tier, _, secs = entry.partition("=")
        _retry_handler(f"{_QUEUE}.{tier}", float(secs))
else:
    _SLEEP = float(os.environ.get("LAT_SLEEP", "0.5"))

    @app.handler(_QUEUE, queue_type=_QTYPE)
    async def slow(payload: Body) -> None:
        assert _REC is not None
        _REC.put(payload.id, a=time.monotonic_ns())
        _REC.count(started=1)
        await asyncio.sleep(_SLEEP)
        _REC.put(payload.id, b=time.monotonic_ns())
        _REC.count(finished=1)
