"""The crash-loop limit is configurable, and by default above ``max_deliveries``: a poison
message (a handler that kills its process on one message) is dead-lettered before the
supervisor gives up."""

from __future__ import annotations

import asyncio

import aio_pika
import pytest

from tests.support.broker import depth, eventually, eventually_depth, publish_job, take
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
    DLQ with reason poison and a critical outcome after max_deliveries (5) deaths; the
    supervisor keeps running and the other messages are handled."""
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
    (dead,) = await take(amqp, f"{queue_name}.dlq", 1)
    assert (dead.headers or {}).get("x-qworker-reason") == "poison"
    assert (dead.headers or {}).get("x-qworker-error-type") == "qworker.errors.PoisonMessage"
    poisoned = [e for e in worker.events("message.dead_lettered") if e.get("reason") == "poison"]
    assert [e.get("severity") for e in poisoned] == ["critical"], worker.output()
    assert worker.terminate(45) == 0


async def test_a_poison_message_under_one_process_restarted_by_its_orchestrator_is_dead_lettered(
    worker: WorkerProcess, queue_name: str, amqp: aio_pika.abc.AbstractConnection
) -> None:
    """--processes 1 has no supervisor: the process dies with the message, and whatever runs it
    (systemd, Kubernetes; here the test) starts it again. After max_deliveries (5) deaths the
    next process dead-letters it as poison (critical) instead of running it, and handles the
    rest: one poison message does not keep a single-process deployment down."""
    worker.launch("--processes", "1")
    worker.wait_consuming()
    await publish_job(amqp, queue_name, "poison", "die")
    for n in range(5):
        await publish_job(amqp, queue_name, f"ok{n}")
    restarts = 0
    while (await depth(amqp, f"{queue_name}.dlq")) == 0:
        assert restarts < 8, worker.output()
        if not worker.alive():
            restarts += 1
            worker.launch("--processes", "1")
            worker.wait_consuming()
        await asyncio.sleep(0.2)
    await eventually(
        lambda: {f"ok{n}" for n in range(5)} <= set(worker.ledger()), 30, message=worker.output
    )
    assert 4 <= restarts <= 6, restarts
    (dead,) = await take(amqp, f"{queue_name}.dlq", 1)
    assert (dead.headers or {}).get("x-qworker-reason") == "poison"
    poisoned = [e for e in worker.events("message.dead_lettered") if e.get("reason") == "poison"]
    assert [e.get("severity") for e in poisoned] == ["critical"], worker.output()
    assert worker.terminate(45) == 0
