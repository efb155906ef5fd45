"""A known mix of messages for the ledger app, and the metrics it must produce."""

from __future__ import annotations

import asyncio

import aio_pika

from tests.support.broker import eventually, publish_job
from tests.support.workers import WorkerProcess

MIX = {"ok": 7, "fail_once": 3, "permanent": 2}


async def publish_mix(amqp: aio_pika.abc.AbstractConnection, queue: str) -> None:
    """7 successes, 3 retried-then-succeeded, 2 permanent failures."""
    for mode, count in MIX.items():
        for n in range(count):
            await publish_job(amqp, queue, f"{mode}-{n}", mode)


async def assert_mix_counted(process: WorkerProcess, queue: str) -> None:
    """The metrics show exactly the outcomes of :func:`publish_mix`."""
    total = "qworker_messages_total"

    def all_counted() -> bool:
        return (
            process.metric(total, outcome="succeeded") >= 10
            and process.metric(total, outcome="dead_lettered") >= 2
        )

    await eventually(all_counted, timeout=20, interval=0.1, message=process.output)
    await asyncio.sleep(0.5)  # nothing more may come
    handler = "tests.apps.ledger_app:handle"
    q = {"queue": queue}
    assert process.metric(total, **q, handler=handler, outcome="succeeded") == 10
    assert process.metric(total, **q, handler=handler, outcome="retried") == 3
    assert process.metric(total, **q, handler=handler, outcome="dead_lettered") == 2
    assert process.metric("qworker_retries_total", **q, tier="200ms") == 3
    assert process.metric("qworker_retries_total", **q) == 3
    assert process.metric("qworker_dead_letters_total", **q, reason="permanent_error") == 2
    assert process.metric("qworker_dead_letters_total", **q) == 2
    failures = "qworker_failures_total"
    assert process.metric(failures, **q, outcome="retried", severity="low") == 3
    assert process.metric(failures, **q, outcome="dead_lettered", severity="high") == 2
    assert process.metric("qworker_handler_seconds_count", **q, handler=handler) == 15
    assert process.metric("qworker_in_flight", **q) == 0
    assert process.metric("qworker_circuit_state", **q) == 0
