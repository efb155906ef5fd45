"""``qworker run --processes N``: restarts, graceful drain, start failures and crash loworker."""

from __future__ import annotations

import os
import signal
import time

import aio_pika
import pytest

from tests.support.broker import depth, eventually, publish_job
from tests.support.workers import WorkerProcess

pytestmark = pytest.mark.rabbitmq


async def wait_ledger(process: WorkerProcess, ids: set[str], timeout: float = 20.0) -> None:
    await eventually(
        lambda: ids <= set(process.ledger()),
        timeout,
        message=lambda: f"missing {ids - set(process.ledger())}",
    )


async def test_a_killed_worker_process_is_replaced_and_messages_keep_flowing(
    worker: WorkerProcess, queue_name: str, amqp: aio_pika.abc.AbstractConnection
) -> None:
    """kill -9 of one child: the other keeps consuming, a new child takes the slot, readiness
    dips to 503 and returns to 200 while liveness stays 200 (the supervisor restarts the child
    itself), and every message is handled."""
    worker.launch("--processes", "2", "--metrics-port", "0")
    worker.wait_log("supervisor.ready")
    first = worker.children()
    assert len(first) == 2 and worker.get("/healthz")[0] == 200 and worker.get("/readyz")[0] == 200
    for n in range(10):
        await publish_job(amqp, queue_name, f"a{n}")
    await wait_ledger(worker, {f"a{n}" for n in range(10)})

    victim, survivor = first
    os.kill(victim, signal.SIGKILL)
    for n in range(10):  # handled by the survivor while the victim's slot restarts
        await publish_job(amqp, queue_name, f"b{n}")
    statuses = set()

    alive = set()

    def dipped() -> bool:
        statuses.add(worker.get("/readyz")[0])
        alive.add(worker.get("/healthz")[0])
        return 503 in statuses

    await eventually(dipped, 5, interval=0, message=lambda: f"/readyz answered {statuses}")
    assert 503 in statuses and alive == {200}
    worker.wait_log("supervisor.child_started", count=3)
    worker.wait_log("supervisor.ready", count=2)
    now = worker.children()
    assert victim not in now and survivor in now and len(now) == 2
    for n in range(10):
        await publish_job(amqp, queue_name, f"c{n}")
    await wait_ledger(worker, {f"{p}{n}" for p in "abc" for n in range(10)})
    assert worker.get("/healthz")[0] == 200 and worker.get("/readyz")[0] == 200
    assert worker.metric("qworker_process_restarts_total") == 1
    exited = worker.events("supervisor.child_exited")
    assert [(e["pid"], e["signal"]) for e in exited] == [(victim, "SIGKILL")]


async def test_sigterm_drains_every_process_and_loses_nothing(
    worker: WorkerProcess, queue_name: str, amqp: aio_pika.abc.AbstractConnection
) -> None:
    """SIGTERM to the supervisor with handlers running: they finish, the rest stays queued,
    handled + queued = published, and the supervisor exits 0."""
    worker.launch("--processes", "2", "--concurrency", "2", "--grace", "20")
    worker.wait_log("supervisor.ready")
    published = {f"s{n}" for n in range(10)}
    for ident in sorted(published):
        await publish_job(amqp, queue_name, ident, "slow", seconds=1.5)
    await eventually(lambda: len(worker.started()) >= 4, 10, 0.02, message=worker.output)
    assert worker.proc is not None
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=40) == 0, worker.output()
    handled = worker.ledger()
    assert len(handled) >= 4 and len(set(handled)) == len(handled)
    assert sorted(handled) == sorted(worker.started())  # every handler that started finished
    assert len(handled) + await depth(amqp, queue_name) == len(published)
    assert worker.events("supervisor.stopped") == [
        {**worker.events("supervisor.stopped")[0], "clean": True}
    ]


async def test_a_worker_that_fails_on_start_stops_the_supervisor(
    worker: WorkerProcess, queue_name: str, amqp: aio_pika.abc.AbstractConnection
) -> None:
    """The work queue exists with conflicting arguments: the children exit 3 before they are
    ready, and the supervisor stops at once (no restart) with one clear line and exit code 3."""
    channel = await amqp.channel()
    await channel.declare_queue(queue_name, durable=True)  # classic: the app wants quorum
    await channel.close()
    worker.launch("--processes", "2")
    assert worker.wait(timeout=30) == 3, worker.output()
    errors = worker.err.read_text().strip().splitlines()
    assert errors[-1].startswith("qworker: error: worker process ")
    assert "exited with code 3 before it was ready" in errors[-1]
    assert any("already exists with different arguments" in line for line in errors)
    assert not worker.events("supervisor.restarting")


async def test_children_that_keep_crashing_stop_the_supervisor(
    worker: WorkerProcess, queue_name: str, amqp: aio_pika.abc.AbstractConnection
) -> None:
    """Messages that kill their worker: restarts with backoff until 10 exits within 120 s (the
    default crash limit, above max_deliveries), then the supervisor gives up with a 'crash
    loop' line and exit code 1."""
    worker.launch("--processes", "2")
    worker.wait_log("supervisor.ready")
    await publish_job(amqp, queue_name, "die1", "die")
    await publish_job(amqp, queue_name, "die2", "die")
    assert worker.wait(timeout=90) == 1, worker.output()
    last = worker.err.read_text().strip().splitlines()[-1]
    assert last.startswith("qworker: error: crash loop: worker processes exited 10 times")
    restarts = worker.events("supervisor.restarting")
    assert len(worker.events("supervisor.child_exited")) == 10
    assert restarts
    for slot in {e["slot"] for e in restarts}:  # slots back off independently
        delays = [e["delay"] for e in restarts if e["slot"] == slot]
        assert delays == sorted(delays) and delays[0] == 0.5  # exponential per slot


async def test_children_that_die_on_every_start_end_in_a_crash_loop_within_seconds(
    worker: WorkerProcess,
) -> None:
    """Children that crash as they start (exit 1, not a configuration error): restarted with
    backoff, then the supervisor gives up, saying none was ever ready, with exit code 1."""
    worker.env["QWORKER_APP_CHILD_DIES"] = "1"
    started = time.monotonic()
    worker.launch("--processes", "2")
    assert worker.wait(timeout=40) == 1, worker.output()
    assert time.monotonic() - started < 15
    last = worker.err.read_text().strip().splitlines()[-1]
    assert "crash loop" in last and "none of them ever ready" in last, last
    assert not worker.events("supervisor.ready")
