"""Faults on the real broker: kill -9, SIGTERM, forced disconnects, a missing or full DLQ."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
from typing import Any

import aio_pika
import pamqp.encode
import pytest

from qworker import App, Context, Permanent, RetryPolicy
from qworker import headers as h
from qworker.testing import running
from tests.support.broker import depth, eventually, take
from tests.support.workers import WorkerProcess

pytestmark = pytest.mark.rabbitmq


async def publish_many(app: App, queue: str, items: list[dict[str, Any]]) -> None:
    for item in items:
        await app.publish(queue, item, message_id=item["id"])


async def test_kill_9_while_retries_wait_in_the_broker_loses_nothing(
    broker_url: str,
    queue_name: str,
    worker: WorkerProcess,
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    """Retries scheduled in the broker survive kill -9 of the worker and run after a restart."""
    queue = queue_name
    worker.env["QWORKER_APP_DELAY"] = "2"
    worker.start()
    app = App(broker_url)
    ids = [f"k-{i}" for i in range(30)]
    async with app:
        await publish_many(app, queue, [{"id": i, "mode": "fail_once"} for i in ids])

        async def all_waiting() -> bool:
            return await depth(amqp, f"{queue}.retry.2s") == len(ids)

        await eventually(all_waiting, timeout=15)
    worker.signal(signal.SIGKILL)
    worker.wait(10)
    assert worker.ledger() == []
    worker.start()
    await eventually(
        lambda: len(set(worker.ledger())) >= len(ids), 20, 0.1, "retries lost after kill -9"
    )
    assert sorted(set(worker.ledger())) == sorted(ids)
    assert await depth(amqp, f"{queue}.dlq") == 0


async def test_sigterm_lets_in_flight_handlers_finish_and_returns_the_rest(
    broker_url: str,
    queue_name: str,
    worker: WorkerProcess,
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    """SIGTERM: running handlers finish, waiting deliveries go back, exit 0, nothing runs twice."""
    queue = queue_name
    worker.args = ["--concurrency", "4", "--prefetch", "8", "--grace", "10"]
    worker.start()
    ids = [f"t-{i}" for i in range(8)]
    async with App(broker_url) as app:
        await publish_many(app, queue, [{"id": i, "mode": "slow", "seconds": 1.5} for i in ids])
    await eventually(lambda: len(worker.started()) >= 4, 10, 0.02)
    worker.signal(signal.SIGTERM)
    assert worker.wait(20) == 0
    started = worker.started()
    finished = worker.ledger()
    assert len(started) == 4 and sorted(finished) == sorted(started)
    assert await depth(amqp, queue) == 4  # the four that never started are back in the queue
    log = worker.text()
    assert "worker.stopped" in log
    assert ":guest@" not in log  # the URL's password is masked in every line


async def test_worker_survives_forced_connection_close_and_keeps_consuming(
    broker_url: str, queue_name: str, cleanup: list[str]
) -> None:
    """The broker closes the worker's connection: it reconnects, re-declares and goes on."""
    app = App(broker_url, name=f"closeme-{queue_name}")
    handled: list[int] = []

    @app.handler(queue_name)
    async def handle(payload: dict[str, int]) -> None:
        handled.append(payload["n"])

    cleanup.extend(s.name for s in app.topology())
    async with running(app) as worker:
        for n in range(10):
            await app.publish(queue_name, {"n": n})
        await eventually(lambda: _at_least(handled, 10))
        closed = _close_connections_named(app.name)
        assert closed >= 1
        await eventually(lambda: _reconnected(worker), timeout=30)
        for n in range(10, 20):
            await app.publish(queue_name, {"n": n})
        await eventually(lambda: _at_least(handled, 20), timeout=15)
    assert set(handled) == set(range(20))


async def _at_least(items: list[int], n: int) -> bool:
    return len(set(items)) >= n


async def _reconnected(worker: Any) -> bool:
    return bool(worker.connections >= 2 and worker.ready.is_set())


def _close_connections_named(name: str) -> int:
    """Close (broker side) every connection whose client gave ``name`` as connection_name."""
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    closed = 0
    for line in out.splitlines():
        pid, _, properties = line.partition("\t")
        if name in properties:
            subprocess.run(
                ["rabbitmqctl", "-q", "close_connection", pid, "test: forced close"],
                check=True,
                capture_output=True,
            )
            closed += 1
    return closed


async def test_missing_dlq_keeps_the_original_until_the_dlq_is_back(
    broker_url: str, queue_name: str, cleanup: list[str], amqp: aio_pika.abc.AbstractConnection
) -> None:
    """DLQ deleted: the dead letter's publish is unroutable, so the original stays in the queue."""
    app = App(broker_url)
    calls = 0

    @app.handler(queue_name, retry=RetryPolicy(max_attempts=2, initial_delay=0.05, jitter=0))
    async def handle(payload: dict[str, int]) -> None:
        nonlocal calls
        calls += 1
        raise Permanent("cannot handle")

    cleanup.extend(s.name for s in app.topology())
    async with running(app):
        channel = await amqp.channel()
        await channel.queue_delete(f"{queue_name}.dlq")
        await app.publish(queue_name, {"n": 1}, message_id="keep-me")
        # Delivered again after the failed move: the broker still had the original.
        await eventually(lambda: _called(lambda: calls, 2), timeout=10)
        await app.declare()
        dead = await take(amqp, f"{queue_name}.dlq", 1, timeout=20)
    assert dead[0].message_id == "keep-me"
    assert dead[0].headers[h.REASON] == "permanent_error"
    assert await depth(amqp, queue_name) == 0


async def test_full_dlq_rejecting_publishes_keeps_the_original(
    broker_url: str, queue_name: str, cleanup: list[str], amqp: aio_pika.abc.AbstractConnection
) -> None:
    """A DLQ at max-length with reject-publish nacks the copy: the original is held and the copy
    published again once the DLQ has room; the handler is not run again for it."""
    app = App(broker_url)
    calls = 0

    # Classic queues apply max-length exactly; quorum queues overshoot by one message.
    @app.handler(queue_name, queue_type="classic")
    async def handle(payload: dict[str, int]) -> None:
        nonlocal calls
        calls += 1
        raise Permanent("cannot handle")

    cleanup.extend(s.name for s in app.topology())
    policy = f"full-{queue_name}"
    await app.declare()
    _refuse_publishes(policy, f"{queue_name}.dlq")
    try:
        await asyncio.sleep(0.5)  # policies apply asynchronously
        async with running(app):
            await app.publish(queue_name, {"n": 1}, message_id="full-1")
            await eventually(lambda: _called(lambda: calls, 1), timeout=10)
            await asyncio.sleep(1.0)  # the copy, and the first one published again, refused
            _rabbitmqctl("clear_policy", policy)
            dead = await take(amqp, f"{queue_name}.dlq", 1, timeout=20)
    finally:
        subprocess.run(["rabbitmqctl", "-q", "clear_policy", policy], capture_output=True)
    assert "full-1" in [d.message_id for d in dead]
    assert calls == 1
    assert h.CRASHES not in dead[0].headers
    assert await depth(amqp, queue_name) == 0


async def test_a_retry_tier_refusing_for_seconds_does_not_make_a_transient_failure_poison(
    broker_url: str, queue_name: str, cleanup: list[str], amqp: aio_pika.abc.AbstractConnection
) -> None:
    """The retry tier refuses copies for 2 s (a quorum tier electing a leader after a node
    stopped does the same): the original is held and its copy published again, so the retry
    happens as planned. Before, each refusal gave the original back, each return counted as a
    crash, and with ``max_deliveries=2`` the message was a ``poison`` dead letter in a second."""
    app = App(broker_url)
    attempts: list[int] = []
    retry = RetryPolicy(max_attempts=3, initial_delay=0.05, jitter=0)

    @app.handler(queue_name, queue_type="classic", retry=retry, max_deliveries=2)
    async def handle(payload: dict[str, int], ctx: Context) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise ConnectionError("downstream refused the connection")

    cleanup.extend(s.name for s in app.topology())
    tier = next(s.name for s in app.topology() if s.role == "retry")
    policy = f"refusing-{queue_name}"
    await app.declare()
    _refuse_publishes(policy, tier)
    try:
        await asyncio.sleep(0.5)  # policies apply asynchronously
        async with running(app):
            await app.publish(queue_name, {"n": 1}, message_id="refused-1")
            await eventually(lambda: _called(lambda: len(attempts), 1), timeout=10)
            await asyncio.sleep(2.0)
            _rabbitmqctl("clear_policy", policy)
            await eventually(lambda: _called(lambda: len(attempts), 2), timeout=20)
            await asyncio.sleep(0.5)  # a wrong extra run would show here
    finally:
        subprocess.run(["rabbitmqctl", "-q", "clear_policy", policy], capture_output=True)
    assert attempts == [1, 2]
    assert await depth(amqp, f"{queue_name}.dlq") == 0
    assert await depth(amqp, f"{queue_name}.quarantine") == 0
    assert await depth(amqp, queue_name) == 0


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True)


def _refuse_publishes(policy: str, queue: str) -> None:
    """Make ``queue`` nack every publish, as a full ``reject-publish`` queue does, through the
    policy ``policy`` (cleared with ``rabbitmqctl clear_policy``; it applies asynchronously)."""
    pattern = "^" + re.escape(queue) + "$"
    limits = '{"max-length": 0, "overflow": "reject-publish"}'
    _rabbitmqctl("set_policy", policy, pattern, limits, "--apply-to", "queues")


async def _called(count: Any, n: int) -> bool:
    return bool(count() >= n)


@pytest.mark.parametrize(
    "forged",
    [
        {h.ATTEMPT: "three"},
        {h.ATTEMPT: -5},
        {h.ATTEMPT: 10**12},
        {h.ATTEMPT: 1.5, h.HISTORY: "not a list"},
        {h.HISTORY: [{"attempt": "x", "at": 5}, 7, None, "x" * 100_000]},
        {h.ERROR_MESSAGE: "y" * 100_000, h.FIRST_FAILURE_AT: 12, h.QUEUE: "\x1b[31m" + "é" * 300},
        {h.ORIGINAL_EXCHANGE: ["nested", {"deep": [1, 2]}], "x-qworker-unknown": "z" * 50_000},
    ],
    ids=["str", "negative", "huge", "float", "history-garbage", "huge-strings", "nested"],
)
async def test_forged_qworker_headers_never_crash_the_worker(
    broker_url: str,
    queue_name: str,
    cleanup: list[str],
    amqp: aio_pika.abc.AbstractConnection,
    forged: dict[str, Any],
) -> None:
    """Garbage x-qworker-* values: the message is handled, dead letters stay small and sane."""
    app = App(broker_url)
    attempts: list[int] = []

    @app.handler(queue_name, retry=RetryPolicy(max_attempts=2, initial_delay=0.05, jitter=0))
    async def handle(payload: dict[str, str], ctx: Context) -> None:
        attempts.append(ctx.attempt)
        if payload["mode"] == "fail":
            raise ConnectionError("always")

    cleanup.extend(s.name for s in app.topology())
    async with running(app):
        for mode in ("ok", "fail"):
            channel = await amqp.channel()
            await channel.default_exchange.publish(
                aio_pika.Message(json.dumps({"mode": mode}).encode(), headers=forged),
                routing_key=queue_name,
            )
        (dead,) = await take(amqp, f"{queue_name}.dlq", 1, timeout=15)
    assert all(1 <= a <= h.ATTEMPT_LIMIT + 1 for a in attempts)
    assert dead.headers[h.REASON] == "retries_exhausted"
    assert isinstance(dead.headers[h.ATTEMPT], int)
    assert dead.headers[h.QUEUE] == queue_name
    assert "x-qworker-unknown" not in dead.headers
    ours = {k: v for k, v in dead.headers.items() if k.startswith(h.PREFIX)}
    assert sum(len(k) + h.encoded_size(v) for k, v in ours.items()) < h.TOTAL_LIMIT
    assert await depth(amqp, queue_name) == 0


async def test_binary_header_strings_do_not_make_a_message_unmovable(
    broker_url: str,
    queue_name: str,
    cleanup: list[str],
    amqp: aio_pika.abc.AbstractConnection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A non-UTF-8 header string (pamqp decodes it to bytes, which it cannot encode) still
    reaches the DLQ with the same octets, instead of failing every move forever."""
    app = App(broker_url)

    @app.handler(queue_name)
    async def handle(payload: dict[str, int]) -> None:
        raise Permanent("bad")

    cleanup.extend(s.name for s in app.topology())
    encode = pamqp.encode.encode_table_value

    def long_string(value: Any) -> bytes:
        # How another client sends binary in a header: an AMQP long string.
        if isinstance(value, bytes):
            return b"S" + len(value).to_bytes(4, "big") + value
        return encode(value)

    async with running(app):
        monkeypatch.setattr(pamqp.encode, "encode_table_value", long_string)
        channel = await amqp.channel()
        await channel.default_exchange.publish(
            aio_pika.Message(b"{}", headers={"blob": b"\xff\xfe\x00"}), routing_key=queue_name
        )
        monkeypatch.undo()
        (dead,) = await take(amqp, f"{queue_name}.dlq", 1)
    assert bytes(dead.headers["blob"]) == b"\xff\xfe\x00"
    assert dead.headers[h.REASON] == "permanent_error"
