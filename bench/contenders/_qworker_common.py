"""Shared code of the qworker contenders (``qworker_c`` and ``qworker_classic_c``).

The leading underscore keeps the harness from treating this module as a contender
(``contenders.discover()`` skips names starting with ``_``).

qworker is used the way a user would use it: an ``App``, one decorated handler
with a pydantic payload model and a ``Context``, published with ``app.publish``
(publisher confirms) and consumed by ``Worker(app, ...)`` run like ``qworker run``
runs it: ``configure_logging("json")`` first, SIGTERM/SIGINT -> ``worker.stop()``.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Literal

from bench_common import Ctx, Reporter, make_payload
from pydantic import BaseModel

from qworker import App, Context, Permanent, RetryPolicy, Transient, Worker
from qworker.logging import configure_logging

PACKAGES = ("qworker", "aio-pika", "aiormq", "pamqp", "pydantic", "structlog", "tenacity")
NOT_APPLICABLE: dict[str, str] = {}

# One policy for all three scenarios, so the topology is the same in each:
# Q, Q.dlq and one retry tier Q.retry.1ms. max_attempts=2: the first failure is
# retried once; jitter=0 so the wait is exactly the tier's TTL.
RETRY = RetryPolicy(max_attempts=2, initial_delay=0.001, jitter=0)


def mechanisms(queue_type: str) -> dict[str, str]:
    return {
        "S1": f"qworker Worker(concurrency=prefetch=100), {queue_type} queue, pydantic model "
        "payload + Context; ack after the handler returns; JSON logs "
        '(configure_logging("json"), as the CLI)',
        "S2": "handler raises qworker.Transient when ctx.attempt == 1; "
        "RetryPolicy(max_attempts=2, initial_delay=0.001, jitter=0): the copy with "
        "x-qworker-* headers (traceback incl.) is published to <q>.retry.1ms "
        "(x-message-ttl=1, dead-letters back to <q>), confirm awaited, then the original "
        "is acked; one WARNING log line per retry",
        "S3": "handler raises qworker.Permanent: the copy with the full x-qworker-* error "
        "context is published to <q>.dlq, confirm awaited, then the original is acked; "
        "one ERROR log line per dead letter",
    }


class BenchPayload(BaseModel):
    """The body of bench_common.make_payload, validated by pydantic."""

    id: int
    run: str
    kind: str
    pad: str


def build_app(ctx: Ctx, queue_type: Literal["quorum", "classic"], report: Reporter | None) -> App:
    """The app a user would write: one handler on ctx.queue."""
    app = App(ctx.amqp_url, name=f"bench-{ctx.contender}")
    scenario = ctx.scenario

    @app.handler(ctx.queue, retry=RETRY, queue_type=queue_type)
    async def handle(payload: BenchPayload, context: Context) -> None:
        assert report is not None  # only the worker process runs handlers
        report.call()
        _ = payload.id
        if scenario == "S2" and context.attempt == 1:
            raise Transient("first attempt fails")
        if scenario == "S3":
            raise Permanent("always fails")
        report.done()

    return app


def queues(ctx: Ctx, queue_type: Literal["quorum", "classic"]) -> dict:
    # Every queue qworker declares for this handler (work, DLQ, retry tiers).
    declared = [spec.name for spec in build_app(ctx, queue_type, None).topology()]
    dead = f"{ctx.queue}.dlq"
    assert dead in declared and ctx.queue in declared, declared
    return {
        "main": ctx.queue,
        "dead": dead if ctx.scenario == "S3" else None,
        "delete": declared,
        "exchanges": [],
    }


async def _publish(ctx: Ctx, queue_type: Literal["quorum", "classic"]) -> float:
    app = build_app(ctx, queue_type, None)
    async with app:
        await app.declare()  # what `qworker run` would declare, so the preload has a home
        t0 = time.perf_counter()
        for i in range(ctx.n):
            # dict -> JSON body, persistent, message_id, timestamp, confirm awaited
            await app.publish(ctx.queue, make_payload(i, ctx.run_id, ctx.body_size))
        return time.perf_counter() - t0


def publish(ctx: Ctx, queue_type: Literal["quorum", "classic"]) -> float:
    return asyncio.run(_publish(ctx, queue_type))


def run_worker(ctx: Ctx, report: Reporter, queue_type: Literal["quorum", "classic"]) -> None:
    # As `qworker run APP --log-format json --concurrency 100 --prefetch 100` does it.
    configure_logging("json")
    app = build_app(ctx, queue_type, report)
    worker = Worker(app, concurrency=ctx.prefetch, prefetch=ctx.prefetch)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        await worker.run()

    asyncio.run(serve())
