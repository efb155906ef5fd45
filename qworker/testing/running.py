"""Helpers for users' tests: run a worker for the duration of a block."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from qworker.app import App
from qworker.worker import Worker


@asynccontextmanager
async def running(
    app: App,
    *,
    queues: Sequence[str] | None = None,
    concurrency: int = 10,
    prefetch: int | None = None,
    grace: float = 5.0,
    ready_timeout: float = 15.0,
) -> AsyncIterator[Worker]:
    """Start a :class:`Worker` for ``app``, wait until it consumes, stop it on exit.

    The worker's own failure (e.g. a misconfigured topology) is raised here.
    """
    worker = Worker(app, queues=queues, concurrency=concurrency, prefetch=prefetch, grace=grace)
    task = asyncio.create_task(worker.run())
    ready = asyncio.create_task(worker.ready.wait())
    await asyncio.wait({task, ready}, timeout=ready_timeout, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        ready.cancel()
        task.result()
        raise RuntimeError("worker stopped before it was ready")
    if not ready.done():
        ready.cancel()
        worker.stop()
        await task
        raise TimeoutError(f"worker not ready within {ready_timeout:g}s")
    try:
        yield worker
    finally:
        worker.stop()
        await task
