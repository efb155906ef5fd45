"""The crash-loop limit is configurable, and by default above ``max_deliveries``: a poison
message (a handler that kills its process on one message) is dead-lettered before the
supervisor gives up."""

from __future__ import annotations

import aio_pika
import pytest

from tests.support.broker import eventually, eventually_depth, publish_job
from tests.support.workers import WorkerProcess

pytestmark = pytest.mark.rabbitmq


async def test_crash_limit_and_window_are_options(
    worker: WorkerProcess, queue_name: str, amqp: aio_pika.abc.AbstractConnection
) -> None:
    worker.launch("--processes", "2", "--crash-limit", "3", "--crash-window", "30")
    worker.wait_log("supervisor.ready", timeout=60)
    for n in range(3):
        await publish_job(amqp, queue_name, f"die{n}", "die")
    assert worker.wait(timeout=60) == 1, worker.output()
    last = worker.err.read_text().strip().splitlines()[-1]
    assert last.startswith("qworker: error: crash loop: worker processes exited 3 times within 30s")
    assert len(worker.events("supervisor.child_exited")) == 3


async def test_a_poison_message_is_dead_lettered_before_the_crash_limit(
    worker: WorkerProcess, queue_name: str, amqp: aio_pika.abc.AbstractConnection
) -> None:
    """Default limits, two processes, one message that kills whoever runs it: it ends in the
    DLQ (reason poison) after max_deliveries (5) deaths; the supervisor keeps running and the
    other messages are handled."""
    worker.launch("--processes", "2")
    worker.wait_log("supervisor.ready", timeout=60)
    await publish_job(amqp, queue_name, "poison", "die")
    for n in range(5):
        await publish_job(amqp, queue_name, f"ok{n}")
    await eventually_depth(amqp, f"{queue_name}.dlq", 1, timeout=90)
    await eventually(
        lambda: {f"ok{n}" for n in range(5)} <= set(worker.ledger()), 30, message=worker.output
    )
    assert worker.alive(), worker.output()
    exits = len(worker.events("supervisor.child_exited"))
    assert 1 <= exits < 10
    assert worker.terminate(45) == 0
