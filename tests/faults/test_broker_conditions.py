"""Broker conditions a worker meets in production, each on one private node for this module.

A memory alarm while copies are being moved, a ``consumer_timeout`` that closes one queue's
channel, a user without ``configure`` permission, a small ``frame_max``, a ``delivery-limit``
policy on the work queue, and a circuit breaker that opens across a reconnect. The node's
runtime settings (see ``conditions.rabbit_env``), users, policies and alarms are restored by
each test; every queue has a fresh name and is deleted after its test.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog.testing

from qworker import App, CircuitBreaker, Context, Permanent, RetryPolicy
from qworker.errors import ConfigurationError
from qworker.testing import running
from qworker.worker import Worker
from tests.faults import conditions as c
from tests.faults.nodes import RabbitNode, ctl, free_port

pytestmark = [pytest.mark.faults, pytest.mark.rabbitmq, pytest.mark.timeout(120)]

LIMITED_USER = "qwf-limited"
LIMITED_PASSWORD = "qwf-limited-secret"


@pytest.fixture(scope="module")
def node() -> Iterator[RabbitNode]:
    """A private node for this module (never the shared one); halted and deleted after it."""
    directory = Path(tempfile.mkdtemp(prefix="qwf-cond-"))
    rabbit = RabbitNode(
        directory, f"qwfc{uuid.uuid4().hex[:6]}@localhost", free_port(), free_port()
    )
    try:
        rabbit.start()
        yield rabbit
    finally:
        rabbit.stop()
        shutil.rmtree(directory, ignore_errors=True)


def _queue(kind: str) -> str:
    return f"qwf.cond.{kind}.{uuid.uuid4().hex[:8]}"


def _queues(app: App) -> list[str]:
    return [spec.name for spec in app.topology()]


async def _publish(url: str, queue: str, ids: list[str], **kwargs: Any) -> None:
    """Publish one message per id (confirmed), all at once."""
    publisher = App(url, name=f"qwf-pub-{queue}")
    try:
        await asyncio.gather(
            *(publisher.publish(queue, {"id": i}, message_id=i, **kwargs) for i in ids)
        )
    finally:
        await publisher.close()


# 1. Memory alarm


async def test_memory_alarm_while_moving_copies_duplicates_and_loses_nothing(
    node: RabbitNode,
) -> None:
    """20 messages fail permanently; after the first 4 are dead-lettered a memory alarm
    (watermark 0) blocks the worker's copies of the other 16 to the DLQ for 3 s, longer than
    ``confirm_timeout``. Once it clears, each message is in the DLQ exactly once, none is left
    in the work queue, each was handled once, and the worker never reconnected."""
    queue = _queue("alarm")
    app = App(node.url, name=f"qwf-{queue}", confirm_timeout=1.0)
    calls: list[str | None] = []
    alarm_on = asyncio.Event()

    @app.handler(queue, retry=RetryPolicy(max_attempts=3, initial_delay=0.05, jitter=0))
    async def handle(payload: dict[str, str], ctx: Context) -> None:
        calls.append(ctx.message_id)
        if len(calls) > 4:  # the rest fail (and are copied) while the alarm is on
            await asyncio.wait_for(alarm_on.wait(), 20)
        await asyncio.sleep(0.05)
        raise Permanent("cannot handle")

    ids = [f"alarm-{n}" for n in range(20)]
    try:
        await app.declare()
        await app.close()
        await _publish(node.url, queue, ids)
        with structlog.testing.capture_logs() as logs:
            async with running(app, concurrency=3) as worker:
                assert await _until_depth(node.url, f"{queue}.dlq", 4, 20)
                async with c.memory_alarm(node):
                    assert "memory" in await c.alarms(node)
                    before = await c.depth(node.url, f"{queue}.dlq")
                    alarm_on.set()
                    await asyncio.sleep(3.0)  # past confirm_timeout: the copies keep waiting
                    during = await c.depth(node.url, f"{queue}.dlq")
                assert await _until_depth(node.url, f"{queue}.dlq", 20, 30)
                await asyncio.sleep(0.5)  # let any stray duplicate arrive before counting
                connections = worker.connections
        dead = await c.drain(node.url, f"{queue}.dlq")
        left = await c.drain(node.url, queue)
    finally:
        await c.delete(node.url, *_queues(app))
    dead_ids = [letter.message_id for letter in dead]
    assert sorted(dead_ids, key=str) == sorted(ids), (
        f"duplicated {c.duplicates(dead_ids)}, missing {sorted(set(ids) - set(dead_ids))}"
    )
    assert all(letter.headers.get("x-qworker-reason") == "permanent_error" for letter in dead)
    assert left == [], f"left in the work queue: {[m.message_id for m in left]}"
    assert c.duplicates(calls) == {}, f"handled more than once: {c.duplicates(calls)}"
    assert connections == 1, f"the worker reconnected during the alarm ({connections})"
    assert before == during == 4, f"copies went through during the alarm ({before} -> {during})"
    assert c.events(logs, "publish.confirm_slow"), "no copy was held by the alarm"
    assert not c.events(logs, "message.move_failed")


async def _until_depth(url: str, queue: str, at_least: int, timeout: float) -> bool:
    async def reached() -> bool:
        return await c.depth(url, queue) >= at_least

    return await c.until(reached, timeout, step=0.2)


# 2. consumer_timeout


async def test_consumer_timeout_reopens_the_hung_queues_channel_only(node: RabbitNode) -> None:
    """``consumer_timeout = 2000``: a handler of queue A hangs past it; the broker closes A's
    channel, the consumer logs ``channel.closed`` then ``channel.reopened`` and A's message is
    served again; queue B of the same app keeps handling (each message once, all acked) on the
    same single connection."""
    hung, busy = _queue("hung"), _queue("busy")
    app = App(node.url, name=f"qwf-{hung}")
    release = asyncio.Event()
    hung_calls: list[int] = []
    busy_calls: list[str | None] = []

    @app.handler(hung, retry=RetryPolicy(max_attempts=3, initial_delay=0.05, jitter=0))
    async def hang(payload: dict[str, str], ctx: Context) -> None:
        hung_calls.append(ctx.attempt)
        if len(hung_calls) == 1:  # only the first delivery hangs
            await asyncio.wait_for(release.wait(), 20)

    @app.handler(busy, retry=RetryPolicy(max_attempts=3, initial_delay=0.05, jitter=0))
    async def work(payload: dict[str, str], ctx: Context) -> None:
        busy_calls.append(ctx.message_id)

    busy_ids = [f"busy-{n}" for n in range(30)]
    try:
        # tick 500 ms: RabbitMQ 3.10 checks the timeout on the channel's tick (default 60 s)
        with (
            c.rabbit_env(node, consumer_timeout=2000, channel_tick_interval=500),
            structlog.testing.capture_logs() as logs,
        ):
            async with running(app, concurrency=2) as worker:
                await _publish(node.url, hung, ["stuck"])
                publisher = App(node.url, name=f"qwf-pub-{busy}")
                try:
                    for message_id in busy_ids:  # spread over ~4.5 s: across the timeout
                        await publisher.publish(busy, {"id": message_id}, message_id=message_id)
                        await asyncio.sleep(0.15)
                finally:
                    await publisher.close()
                reopened = await c.until(
                    lambda: bool(c.events(logs, "channel.reopened", queue=hung)), 15
                )
                release.set()
                served_again = await c.until(lambda: len(hung_calls) >= 2, 10)
                all_busy = await c.until(lambda: len(busy_calls) >= len(busy_ids), 10)
                await asyncio.sleep(0.5)  # the acks of the last deliveries
                connections = worker.connections
        # an unacked delivery went back to its queue when the worker stopped: it shows here
        left_busy = await c.drain(node.url, busy)
        left_hung = await c.drain(node.url, hung)
    finally:
        await c.delete(node.url, *_queues(app))
    closed = c.events(logs, "channel.closed", queue=hung)
    assert closed, "the broker's consumer_timeout did not close the hung queue's channel"
    assert "timed out" in str(closed[0].get("reason")), closed[0]
    assert reopened, "channel.closed was not followed by channel.reopened"
    order = [e["event"] for e in logs if e.get("queue") == hung and e["event"].startswith("chan")]
    assert order.index("channel.closed") < order.index("channel.reopened"), order
    assert not c.events(logs, "channel.closed", queue=busy), "the busy queue's channel closed"
    assert all_busy and sorted(busy_calls, key=str) == sorted(busy_ids), (
        f"busy queue: duplicated {c.duplicates(busy_calls)}, "
        f"missing {sorted(set(busy_ids) - set(busy_calls))}"
    )
    assert left_busy == []
    assert served_again, f"the hung queue's message was not served again ({hung_calls})"
    assert left_hung == [], "the hung queue's message was never acked"
    assert connections == 1, f"the worker reconnected ({connections} connections)"


# 3. A user without configure permission


@pytest.fixture
def limited_user(node: RabbitNode) -> Iterator[str]:
    """A user with write and read permission but no configure permission; its URL."""
    ctl(node.name, "add_user", LIMITED_USER, LIMITED_PASSWORD)
    try:
        ctl(node.name, "set_permissions", "-p", "/", LIMITED_USER, "", ".*", ".*")
        yield f"amqp://{LIMITED_USER}:{LIMITED_PASSWORD}@127.0.0.1:{node.port}/"
    finally:
        ctl(node.name, "delete_user", LIMITED_USER, check=False)


async def test_no_configure_permission_fails_fast_with_one_clear_error(
    node: RabbitNode, limited_user: str
) -> None:
    """``declare=True`` without configure permission: ``running(app)`` raises
    ConfigurationError naming the permission within 5 s, after at most 3 connections."""
    queue = _queue("noperm")
    app = App(limited_user, name=f"qwf-{queue}")

    @app.handler(queue)
    async def handle(payload: dict[str, str], ctx: Context) -> None:
        pass

    seen_before = c.authenticated(node, LIMITED_USER)
    started = time.monotonic()
    try:
        with pytest.raises(ConfigurationError) as raised:
            async with running(app, ready_timeout=15):
                pass
        elapsed = time.monotonic() - started
        await asyncio.sleep(1.0)  # a worker still retrying would connect again meanwhile
        attempts = c.authenticated(node, LIMITED_USER) - seen_before
    finally:
        await c.delete(node.url, *_queues(app))
    message = str(raised.value)
    assert "configure permission" in message and queue in message, message
    assert "\n" not in message
    assert elapsed < 5, f"took {elapsed:.1f}s to fail"
    assert 1 <= attempts <= 3, f"{attempts} connections for a permission error"


async def test_no_configure_permission_with_declare_false_uses_the_pre_declared_topology(
    node: RabbitNode, limited_user: str
) -> None:
    """The topology declared beforehand by an admin (guest): ``App(declare=False)`` as the
    limited user starts, handles a message and dead-letters a failing one."""
    queue = _queue("predeclared")
    app = App(limited_user, name=f"qwf-{queue}", declare=False)
    handled: list[str | None] = []

    @app.handler(queue, retry=RetryPolicy(max_attempts=2, initial_delay=0.05, jitter=0))
    async def handle(payload: dict[str, str], ctx: Context) -> None:
        if payload["id"] == "bad":
            raise Permanent("cannot handle")
        handled.append(ctx.message_id)

    admin = App(node.url, name=f"qwf-admin-{queue}")
    admin.handlers = app.handlers
    try:
        await admin.declare()
        await admin.close()
        async with running(app):
            await _publish(limited_user, queue, ["good", "bad"])
            assert await c.until(lambda: handled == ["good"], 10), handled
            assert await _until_depth(node.url, f"{queue}.dlq", 1, 10)
        dead = await c.drain(node.url, f"{queue}.dlq")
    finally:
        await c.delete(node.url, *_queues(app))
    assert [(d.message_id, d.headers.get("x-qworker-reason")) for d in dead] == [
        ("bad", "permanent_error")
    ]


async def test_declare_false_with_a_missing_queue_refuses_to_start_naming_it(
    node: RabbitNode, limited_user: str
) -> None:
    """``declare=False`` and no topology: the worker refuses to start, naming the queue."""
    queue = _queue("missing")
    app = App(limited_user, name=f"qwf-{queue}", declare=False)

    @app.handler(queue)
    async def handle(payload: dict[str, str], ctx: Context) -> None:
        pass

    started = time.monotonic()
    with pytest.raises(ConfigurationError) as raised:
        async with running(app, ready_timeout=15):
            pass
    assert time.monotonic() - started < 5
    assert f"'{queue}'" in str(raised.value) and "do not exist" in str(raised.value)


# 4. A small frame_max


async def test_small_frame_max_dead_letters_a_large_header_message_without_reconnects(
    node: RabbitNode,
) -> None:
    """``frame_max = 8192``: a message whose user header nearly fills a frame fails
    permanently; its dead letter (our context headers added) must still fit: it arrives with
    ``x-qworker-reason``, and with every user header or ``x-qworker-dropped-headers`` naming
    those dropped; the worker made at most 2 connections (no ``frame_too_large`` storm)."""
    queue = _queue("frame")
    app = App(node.url, name=f"qwf-{queue}")
    calls: list[int] = []

    @app.handler(queue, retry=RetryPolicy(max_attempts=2, initial_delay=0.05, jitter=0))
    async def handle(payload: dict[str, str], ctx: Context) -> None:
        calls.append(ctx.attempt)
        raise Permanent("cannot handle")

    user_headers = {"x-big": "b" * 7000, "tenant": "acme"}  # fits 8192 alone, not with ours
    try:
        with (
            c.rabbit_env(node, frame_max=8192),
            structlog.testing.capture_logs() as logs,
        ):
            async with running(app) as worker:
                await _publish(node.url, queue, ["large"], headers=user_headers)
                arrived = await _until_depth(node.url, f"{queue}.dlq", 1, 15)
                connections = worker.connections
        dead = await c.drain(node.url, f"{queue}.dlq")
    finally:
        await c.delete(node.url, *_queues(app))
    lost = len(c.events(logs, "worker.connection_lost"))
    assert arrived and len(dead) == 1, (
        f"no dead letter within 15 s: {len(calls)} attempts, {connections} connections, "
        f"{lost} connections lost"
    )
    headers = dead[0].headers
    assert headers.get("x-qworker-reason") == "permanent_error", headers.keys()
    kept = {k: v for k, v in user_headers.items() if headers.get(k) == v}
    dropped = set(user_headers) - set(kept)
    if dropped:
        named = headers.get("x-qworker-dropped-headers")
        assert named is not None and all(k in str(named) for k in dropped), (
            f"user headers {sorted(dropped)} vanished without x-qworker-dropped-headers"
        )
    assert connections <= 2, f"{connections} connections ({lost} lost)"


# 5. A delivery-limit policy


async def _reject_until_gone(url: str, queue: str, rounds: int = 20) -> int:
    """Get and reject (requeue) the queue's one message until the broker takes it away;
    returns how many times it was delivered."""
    deliveries = 0
    async with c.channel(url) as ch:
        q = await ch.get_queue(queue, ensure=False)
        for _ in range(rounds):
            message = await q.get(no_ack=False, fail=False)
            if message is None:
                break
            deliveries += 1
            await message.reject(requeue=True)
    return deliveries


def _broker_limited(letter: c.Letter) -> bool:
    deaths = letter.headers.get("x-death") or []
    return any(isinstance(d, dict) and d.get("reason") == "delivery_limit" for d in deaths)


async def test_delivery_limit_policy_does_not_cut_qworkers_retries_short(node: RabbitNode) -> None:
    """A policy ``{"delivery-limit": 3}`` on the work queue (the broker enforces it: a message
    rejected with requeue is dead-lettered by the broker, ``x-death`` reason ``delivery_limit``,
    after its 4th delivery); with ``max_attempts=5`` every transiently failing message is still
    tried 5 times through the tiers (each retry is a new message in the work queue, delivered
    once) and dead-lettered by qworker with ``retries_exhausted``."""
    queue = _queue("dlimit")
    app = App(node.url, name=f"qwf-{queue}")
    attempts: dict[str | None, list[int]] = {}
    delivery_counts: list[object] = []

    @app.handler(
        queue, retry=RetryPolicy(max_attempts=5, initial_delay=0.05, max_delay=0.2, jitter=0)
    )
    async def handle(payload: dict[str, str], ctx: Context) -> None:
        attempts.setdefault(ctx.message_id, []).append(ctx.attempt)
        delivery_counts.append(ctx.headers.get("x-delivery-count"))
        raise ConnectionError("dependency down")

    ids = [f"limit-{n}" for n in range(5)]
    policy = f"qwf-dlimit-{queue}"
    try:
        await app.declare()
        await app.close()
        await c.actl(
            node,
            "set_policy",
            policy,
            f"^{queue.replace('.', '[.]')}$",
            '{"delivery-limit": 3}',
            "--apply-to",
            "queues",
        )
        state = await c.queue_state(node, queue)
        assert state is not None and state.policy == policy, state
        # The control: without qworker, the broker's limit applies.
        await _publish(node.url, queue, ["control"])
        control_deliveries = await _reject_until_gone(node.url, queue)
        assert await _until_depth(node.url, f"{queue}.dlq", 1, 5), "the policy did nothing"
        async with running(app):
            await _publish(node.url, queue, ids)
            await _until_depth(node.url, f"{queue}.dlq", 1 + len(ids), 30)
            await asyncio.sleep(0.3)
        letters = await c.drain(node.url, f"{queue}.dlq")
        left = await c.drain(node.url, queue)
    finally:
        await c.actl(node, "clear_policy", policy, check=False)
        await c.delete(node.url, *_queues(app))
    control = [d for d in letters if d.message_id == "control"]
    dead = [d for d in letters if d.message_id != "control"]
    assert len(control) == 1 and _broker_limited(control[0]), control
    assert control_deliveries == 4, control_deliveries
    by_broker = [d.message_id for d in dead if _broker_limited(d)]
    assert by_broker == [], f"dead-lettered by the broker's delivery limit: {by_broker}"
    assert sorted((d.message_id for d in dead), key=str) == sorted(ids), (
        f"dead letters {[d.message_id for d in dead]}, left {[m.message_id for m in left]}"
    )
    reasons = Counter(d.headers.get("x-qworker-reason") for d in dead)
    assert reasons == {"retries_exhausted": len(ids)}, reasons
    assert all(attempts[i] == [1, 2, 3, 4, 5] for i in ids), attempts
    assert all(d.headers.get("x-qworker-attempt") == 5 for d in dead)
    # What the broker did: every delivery was a first delivery of its copy.
    assert set(delivery_counts) <= {None, 0}, Counter(map(str, delivery_counts))


# 6. Circuit breaker across a reconnect


async def test_breaker_opened_by_handlers_of_a_lost_connection_pauses_the_new_one(
    node: RabbitNode,
) -> None:
    """Slow, transiently failing handlers are running when the worker's connection is
    force-closed; they finish after the reconnect and open the breaker. 100 messages published
    then wait in the work queue with no consumer (none dead-lettered by the broker's delivery
    limit); after the cooldown the dependency is back, the probe succeeds and all are handled."""
    queue = _queue("breaker")
    app = App(node.url, name=f"qwf-{queue}")
    holder: dict[str, Worker] = {}
    failing = True
    reconnected = asyncio.Event()
    handled: list[str | None] = []
    opened_on: list[int] = []
    returns: dict[str | None, int] = {}

    @app.handler(
        queue,
        retry=RetryPolicy(max_attempts=10, initial_delay=0.2, max_delay=0.5, jitter=0),
        breaker=CircuitBreaker(min_calls=2, window=4, failure_ratio=0.5, cooldown=2),
    )
    async def handle(payload: dict[str, str], ctx: Context) -> None:
        if not failing:
            handled.append(ctx.message_id)
            # quorum queues count every return (basic.nack included on 3.10) in x-delivery-count
            returns[ctx.message_id] = int(ctx.headers.get("x-delivery-count") or 0)
            return
        if holder["worker"].connections <= 1:
            # started on the first connection: finish (fail) only after the reconnect
            await asyncio.wait_for(reconnected.wait(), 20)
            await asyncio.sleep(0.2)
        else:
            await asyncio.sleep(1.0)
        opened_on.append(holder["worker"].connections)
        raise ConnectionError("dependency down")

    warm = [f"warm-{n}" for n in range(4)]
    bulk = [f"bulk-{n}" for n in range(100)]
    try:
        with structlog.testing.capture_logs() as logs:
            async with running(app, concurrency=4) as worker:
                holder["worker"] = worker
                await _publish(node.url, queue, warm)
                assert await c.until(lambda: worker.in_flight == 4, 10), worker.in_flight
                assert await c.close_connections(node, app.name) == 1
                assert await c.until(lambda: worker.connections >= 2, 20), "no reconnect"
                reconnected.set()
                assert await c.until(lambda: bool(c.events(logs, "circuit.open")), 10), (
                    "the breaker did not open"
                )
                opened_at = time.monotonic()
                paused = await c.until(lambda: worker.health()["consumers"] == 0, 1, step=0.02)
                await _publish(node.url, queue, bulk)
                waiting = await c.depth(node.url, queue)
                consumers_open = await c.consumers(node, queue)
                checked_within = time.monotonic() - opened_at
                still_open = not c.events(logs, "circuit.half_open")
                failing = False
                all_done = await c.until(lambda: set(bulk) <= set(handled), 40, step=0.2)
                await c.until(lambda: set(warm) <= set(handled), 10, step=0.2)
                connections = worker.connections
        dead = await c.drain(node.url, f"{queue}.dlq")
        left = await c.drain(node.url, queue)
    finally:
        await c.delete(node.url, *_queues(app))
    broker_dead = [
        (d.message_id, d.headers.get("x-first-death-reason"))
        for d in dead
        if "x-qworker-reason" not in d.headers
    ]
    assert broker_dead == [], f"dead-lettered by the broker: {broker_dead}"
    assert dead == [], f"dead-lettered: {[(d.message_id, d.headers) for d in dead]}"
    assert still_open, f"checked {checked_within:.1f}s after opening: past the 2 s cooldown"
    assert paused and consumers_open == 0, "the queue was still consumed while open"
    assert waiting >= len(bulk), f"{waiting} messages waiting in the work queue while open"
    assert all_done, f"not handled: {sorted(set(bulk) - set(handled))[:10]}..."
    assert set(warm) <= set(handled)
    assert left == []
    assert opened_on and opened_on[0] >= 2, "the breaker opened before the reconnect"
    assert connections == 2, connections
    looped = {k: n for k, n in returns.items() if k in bulk and n > 2}
    assert looped == {}, f"returned to the broker more than twice while open: {looped}"
    # The messages caught in the reconnect: returned once by the lost connection, once (at most)
    # by the open breaker; each return counts one delivery on 3.10, never two.
    caught = {k: n for k, n in returns.items() if k in warm and n > 2}
    assert caught == {}, f"deliveries spent by the breaker on the caught messages: {caught}"
