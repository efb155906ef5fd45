"""``qworker run --processes N``: restarts, graceful drain, start failures and crash loops."""

from __future__ import annotations

import os
import signal
import time

import aio_pika
import pytest

from tests.helpers import depth
from tests.ops.conftest import OpsProcess, publish

pytestmark = pytest.mark.rabbitmq


def wait_ledger(process: OpsProcess, ids: set[str], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not ids <= set(process.ledger()):
        assert time.monotonic() < deadline, f"missing {ids - set(process.ledger())}"
        time.sleep(0.05)


async def test_a_killed_worker_process_is_replaced_and_messages_keep_flowing(
    ops: OpsProcess, queue_name: str, amqp: aio_pika.abc.AbstractConnection
) -> None:
    """kill -9 of one child: the other keeps consuming, a new child takes the slot, health
    dips to 503 and returns to 200, and every message is handled."""
    ops.start("--log-format", "json", "--processes", "2", "--metrics-port", "0")
    ops.wait_log("supervisor.ready")
    first = ops.children()
    assert len(first) == 2 and ops.get("/healthz")[0] == 200 and ops.get("/readyz")[0] == 200
    for n in range(10):
        await publish(amqp, queue_name, f"a{n}")
    wait_ledger(ops, {f"a{n}" for n in range(10)})

    victim, survivor = first
    os.kill(victim, signal.SIGKILL)
    for n in range(10):  # handled by the survivor while the victim's slot restarts
        await publish(amqp, queue_name, f"b{n}")
    statuses = set()
    deadline = time.monotonic() + 5
    while 503 not in statuses and time.monotonic() < deadline:
        statuses.add(ops.get("/healthz")[0])
    assert 503 in statuses
    ops.wait_log("supervisor.child_started", count=3)
    ops.wait_log("supervisor.ready", count=2)
    now = ops.children()
    assert victim not in now and survivor in now and len(now) == 2
    for n in range(10):
        await publish(amqp, queue_name, f"c{n}")
    wait_ledger(ops, {f"{p}{n}" for p in "abc" for n in range(10)})
    assert ops.get("/healthz")[0] == 200 and ops.get("/readyz")[0] == 200
    assert ops.metric("qworker_process_restarts_total") == 1
    exited = ops.events("supervisor.child_exited")
    assert [(e["pid"], e["signal"]) for e in exited] == [(victim, "SIGKILL")]


async def test_sigterm_drains_every_process_and_loses_nothing(
    ops: OpsProcess, queue_name: str, amqp: aio_pika.abc.AbstractConnection
) -> None:
    """SIGTERM to the supervisor with handlers running: they finish, the rest stays queued,
    handled + queued = published, and the supervisor exits 0."""
    ops.start("--log-format", "json", "--processes", "2", "--concurrency", "2", "--grace", "20")
    ops.wait_log("supervisor.ready")
    published = {f"s{n}" for n in range(10)}
    for ident in sorted(published):
        await publish(amqp, queue_name, ident, "slow", seconds=1.5)
    deadline = time.monotonic() + 10
    while len(ops.started()) < 4:
        assert time.monotonic() < deadline, ops.output()
        time.sleep(0.02)
    assert ops.proc is not None
    ops.proc.send_signal(signal.SIGTERM)
    assert ops.wait(timeout=40) == 0, ops.output()
    handled = ops.ledger()
    assert len(handled) >= 4 and len(set(handled)) == len(handled)
    assert sorted(handled) == sorted(ops.started())  # every handler that started finished
    assert len(handled) + await depth(amqp, queue_name) == len(published)
    assert ops.events("supervisor.stopped") == [
        {**ops.events("supervisor.stopped")[0], "clean": True}
    ]


async def test_a_worker_that_fails_on_start_stops_the_supervisor(
    ops: OpsProcess, queue_name: str, amqp: aio_pika.abc.AbstractConnection
) -> None:
    """The work queue exists with conflicting arguments: the children exit 3 before they are
    ready, and the supervisor stops at once (no restart) with one clear line and exit code 3."""
    channel = await amqp.channel()
    await channel.declare_queue(queue_name, durable=True)  # classic: the app wants quorum
    await channel.close()
    ops.start("--log-format", "json", "--processes", "2")
    assert ops.wait(timeout=30) == 3, ops.output()
    errors = ops.err.read_text().strip().splitlines()
    assert errors[-1].startswith("qworker: error: worker process ")
    assert "exited with code 3 before it was ready" in errors[-1]
    assert any("already exists with different arguments" in line for line in errors)
    assert not ops.events("supervisor.restarting")


async def test_children_that_keep_crashing_stop_the_supervisor(
    ops: OpsProcess, queue_name: str, amqp: aio_pika.abc.AbstractConnection
) -> None:
    """Messages that kill their worker: restarts with backoff until 5 exits within 60 s,
    then the supervisor gives up with a 'crash loop' line and exit code 1."""
    ops.start("--log-format", "json", "--processes", "2")
    ops.wait_log("supervisor.ready")
    await publish(amqp, queue_name, "die1", "die")
    await publish(amqp, queue_name, "die2", "die")
    assert ops.wait(timeout=40) == 1, ops.output()
    last = ops.err.read_text().strip().splitlines()[-1]
    assert last.startswith("qworker: error: crash loop: worker processes exited 5 times")
    restarts = ops.events("supervisor.restarting")
    assert len(ops.events("supervisor.child_exited")) == 5
    assert restarts
    for slot in {e["slot"] for e in restarts}:  # slots back off independently
        delays = [e["delay"] for e in restarts if e["slot"] == slot]
        assert delays == sorted(delays) and delays[0] == 0.5  # exponential per slot


async def test_children_that_die_on_every_start_end_in_a_crash_loop_within_seconds(
    ops: OpsProcess,
) -> None:
    """Children that crash as they start (exit 1, not a configuration error): restarted with
    backoff, then the supervisor gives up, saying none was ever ready, with exit code 1."""
    ops.env["QWORKER_OPS_CHILD_DIES"] = "1"
    started = time.monotonic()
    ops.start("--log-format", "json", "--processes", "2")
    assert ops.wait(timeout=40) == 1, ops.output()
    assert time.monotonic() - started < 15
    last = ops.err.read_text().strip().splitlines()[-1]
    assert "crash loop" in last and "none of them ever ready" in last, last
    assert not ops.events("supervisor.ready")
