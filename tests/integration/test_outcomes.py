"""Outcomes on the real broker: success, retry, dead letter, decode errors, timeouts."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Any

import aio_pika
import pytest
from pydantic import BaseModel

from qworker import App, Context, Permanent, Retry, RetryPolicy
from qworker import headers as h
from qworker.testing import running
from tests.support.broker import depth, eventually, publish_raw, take

pytestmark = pytest.mark.rabbitmq


class Order(BaseModel):
    order_id: str
    amount_cents: int


def fast(max_attempts: int = 3, initial: float = 0.1, **kw: Any) -> RetryPolicy:
    return RetryPolicy(max_attempts=max_attempts, initial_delay=initial, jitter=0, **kw)


async def test_transient_twice_then_success_sees_attempt_3_and_waits_as_scheduled(
    broker_url: str, queue_name: str, cleanup: list[str]
) -> None:
    """Two transient failures, then success: attempts 1..3, same message_id, delays honoured."""
    app = App(broker_url)
    seen: list[tuple[int, str | None, float]] = []
    done = asyncio.Event()

    @app.handler(queue_name, retry=fast(initial=0.2, multiplier=2.0))
    async def handle(order: Order, ctx: Context) -> None:
        seen.append((ctx.attempt, ctx.message_id, time.monotonic()))
        if ctx.attempt < 3:
            raise ConnectionError("database unavailable")
        done.set()

    cleanup.extend(s.name for s in app.topology())
    async with running(app):
        await app.publish(queue_name, Order(order_id="o-1", amount_cents=5), message_id="m-1")
        await asyncio.wait_for(done.wait(), 10)
    assert [a for a, _, _ in seen] == [1, 2, 3]
    assert {m for _, m, _ in seen} == {"m-1"}
    assert seen[1][2] - seen[0][2] >= 0.2  # first retry waits the 200ms tier
    assert seen[2][2] - seen[1][2] >= 0.4  # second retry waits the 400ms tier


async def test_permanent_error_dead_letters_after_one_delivery_with_full_context(
    broker_url: str, queue_name: str, cleanup: list[str], amqp: aio_pika.abc.AbstractConnection
) -> None:
    """A Permanent error goes straight to Q.dlq with every SPEC section 4 header."""
    app = App(broker_url)
    calls = 0

    @app.handler(queue_name, retry=fast())
    async def handle(order: Order) -> None:
        nonlocal calls
        calls += 1
        try:
            raise KeyError("customer 42")
        except KeyError as exc:
            raise Permanent("unknown customer; dsn=postgres://app:hunter2@db/x") from exc

    cleanup.extend(s.name for s in app.topology())
    body = b'{"order_id": "o-2", "amount_cents": 7}'
    async with running(app):
        await publish_raw(
            amqp,
            queue_name,
            aio_pika.Message(
                body,
                content_type="application/json",
                message_id="m-2",
                correlation_id="c-2",
                headers={"tenant": "acme", "x-qworker-bogus": "x" * 1000},
                app_id="shop",
                type="OrderPlaced",
            ),
        )
        (dead,) = await take(amqp, f"{queue_name}.dlq", 1)
    assert calls == 1
    assert dead.body == body
    assert (dead.message_id, dead.correlation_id) == ("m-2", "c-2")
    assert (dead.app_id, dead.type, dead.content_type) == (
        "shop",
        "OrderPlaced",
        "application/json",
    )
    hd = dead.headers
    assert hd["tenant"] == "acme"
    assert "x-qworker-bogus" not in hd
    assert hd[h.ATTEMPT] == 1
    assert hd[h.REASON] == "permanent_error"
    assert hd[h.CLASSIFICATION] == "permanent"
    assert hd[h.ERROR_TYPE] == "qworker.errors.Permanent"
    assert "hunter2" not in hd[h.ERROR_MESSAGE] and "***" in hd[h.ERROR_MESSAGE]
    assert "KeyError" in hd[h.ERROR_TRACEBACK]  # chained cause included
    assert "hunter2" not in hd[h.ERROR_TRACEBACK]
    assert hd[h.QUEUE] == queue_name
    assert hd[h.HANDLER].endswith(
        ":test_permanent_error_dead_letters_after_one_delivery_with_full_context.<locals>.handle"
    )
    assert hd[h.ORIGINAL_EXCHANGE] == ""
    assert hd[h.ORIGINAL_ROUTING_KEY] == queue_name
    assert ":" in hd[h.WORKER]
    for name in (h.FIRST_FAILURE_AT, h.LAST_FAILURE_AT):
        assert datetime.fromisoformat(hd[name]).utcoffset() is not None
    (entry,) = hd[h.HISTORY]
    assert entry["attempt"] == 1 and entry["error_type"] == "qworker.errors.Permanent"


async def test_retries_exhausted_dead_letters_with_history(
    broker_url: str, queue_name: str, cleanup: list[str], amqp: aio_pika.abc.AbstractConnection
) -> None:
    """Transient on every attempt: dead-lettered as retries_exhausted after max_attempts."""
    app = App(broker_url)
    attempts: list[int] = []

    @app.handler(queue_name, retry=fast(max_attempts=3, initial=0.05))
    async def handle(payload: dict[str, Any], ctx: Context) -> None:
        attempts.append(ctx.attempt)
        raise TimeoutError(f"upstream slow on attempt {ctx.attempt}")

    cleanup.extend(s.name for s in app.topology())
    async with running(app):
        await app.publish(queue_name, {"n": 1})
        (dead,) = await take(amqp, f"{queue_name}.dlq", 1)
    assert attempts == [1, 2, 3]
    assert dead.headers[h.REASON] == "retries_exhausted"
    assert dead.headers[h.ATTEMPT] == 3
    assert dead.headers[h.CLASSIFICATION] == "transient"
    assert [e["attempt"] for e in dead.headers[h.HISTORY]] == [1, 2, 3]
    assert dead.headers[h.FIRST_FAILURE_AT] <= dead.headers[h.LAST_FAILURE_AT]


@pytest.mark.parametrize(
    ("body", "content_type", "expected"),
    [
        (b"{not json", "application/json", "Invalid JSON"),
        (b'{"order_id": "o"}', "application/json", "amount_cents"),
        (b"\xff\xfe\x00binary", None, "Invalid JSON"),
        (b'{"order_id": "o", "amount_cents": 1}', "text/plain", "not JSON"),
    ],
    ids=["invalid-json", "schema-mismatch", "binary", "wrong-content-type"],
)
async def test_undecodable_bodies_are_dead_lettered_as_decode_error(
    broker_url: str,
    queue_name: str,
    cleanup: list[str],
    amqp: aio_pika.abc.AbstractConnection,
    body: bytes,
    content_type: str | None,
    expected: str,
) -> None:
    """Bodies that cannot become the handler's model land in the DLQ with reason decode_error."""
    app = App(broker_url)
    called = False

    @app.handler(queue_name, retry=fast())
    async def handle(order: Order) -> None:
        nonlocal called
        called = True

    cleanup.extend(s.name for s in app.topology())
    async with running(app):
        await publish_raw(amqp, queue_name, aio_pika.Message(body, content_type=content_type))
        (dead,) = await take(amqp, f"{queue_name}.dlq", 1)
    assert not called
    assert dead.body == body
    assert dead.headers[h.REASON] == "decode_error"
    assert dead.headers[h.ERROR_TYPE] == "qworker.errors.DecodeError"
    assert expected in dead.headers[h.ERROR_MESSAGE]


async def test_short_retry_does_not_wait_behind_a_long_one(
    broker_url: str, queue_name: str, cleanup: list[str]
) -> None:
    """A 100 ms retry scheduled after a 5 s retry comes back first (one queue per tier)."""
    app = App(broker_url)
    back: dict[str, float] = {}
    start = time.monotonic()
    both = asyncio.Event()

    @app.handler(queue_name, retry=fast(max_attempts=2))
    async def handle(payload: dict[str, str], ctx: Context) -> None:
        if ctx.attempt == 1:
            raise Retry(delay=float(payload["delay"]))
        back[payload["name"]] = time.monotonic() - start
        if len(back) == 2:
            both.set()

    cleanup.extend([*(s.name for s in app.topology()), f"{queue_name}.retry.5s"])
    async with running(app):
        await app.publish(queue_name, {"name": "slow", "delay": "5"})
        await asyncio.sleep(0.2)
        await app.publish(queue_name, {"name": "fast", "delay": "0.1"})
        await asyncio.wait_for(both.wait(), 15)
    assert back["fast"] < 1.5
    assert back["slow"] >= 5.0


async def test_handler_timeout_is_retried_then_dead_lettered_as_timeout(
    broker_url: str, queue_name: str, cleanup: list[str], amqp: aio_pika.abc.AbstractConnection
) -> None:
    """A handler past its time limit is cancelled, retried, and finally dead-lettered as timeout."""
    app = App(broker_url)
    attempts: list[int] = []

    @app.handler(queue_name, retry=fast(max_attempts=2, initial=0.05), timeout=0.2)
    async def handle(payload: dict[str, int], ctx: Context) -> None:
        attempts.append(ctx.attempt)
        await asyncio.sleep(10)

    cleanup.extend(s.name for s in app.topology())
    async with running(app):
        await app.publish(queue_name, {"n": 1})
        (dead,) = await take(amqp, f"{queue_name}.dlq", 1)
    assert attempts == [1, 2]
    assert dead.headers[h.REASON] == "timeout"
    assert dead.headers[h.ERROR_TYPE] == "qworker.errors.HandlerTimeout"


async def test_immediate_retries_run_in_process_and_count_as_attempts(
    broker_url: str, queue_name: str, cleanup: list[str], amqp: aio_pika.abc.AbstractConnection
) -> None:
    """RetryPolicy(immediate=2): three executions in one delivery, then a delayed retry."""
    app = App(broker_url)
    attempts: list[int] = []
    done = asyncio.Event()

    @app.handler(queue_name, retry=fast(max_attempts=6, initial=0.05, immediate=2))
    async def handle(payload: dict[str, int], ctx: Context) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt < 5:
            raise ConnectionError("flaky")
        done.set()

    cleanup.extend(s.name for s in app.topology())
    async with running(app):
        await app.publish(queue_name, {"n": 1})
        await asyncio.wait_for(done.wait(), 10)
        assert await depth(amqp, f"{queue_name}.dlq") == 0
    assert attempts == [1, 2, 3, 4, 5]


async def test_success_acks_and_leaves_no_copies(
    broker_url: str, queue_name: str, cleanup: list[str], amqp: aio_pika.abc.AbstractConnection
) -> None:
    """100 successes: every handler ran once and the work queue and DLQ end empty."""
    app = App(broker_url)
    ids: list[str] = []

    @app.handler(queue_name)
    async def handle(payload: str, ctx: Context) -> None:
        ids.append(payload)

    cleanup.extend(s.name for s in app.topology())
    async with running(app, concurrency=8):
        for i in range(100):
            await app.publish(queue_name, f"msg-{i}")

        async def all_done() -> bool:
            return len(ids) == 100

        await eventually(all_done)
        await eventually(lambda: _empty(amqp, queue_name))
    assert sorted(ids) == sorted(f"msg-{i}" for i in range(100))
    assert await depth(amqp, f"{queue_name}.dlq") == 0


async def _empty(amqp: aio_pika.abc.AbstractConnection, queue: str) -> bool:
    return await depth(amqp, queue) == 0


async def test_concurrency_runs_that_many_handlers_at_once(
    broker_url: str, queue_name: str, cleanup: list[str]
) -> None:
    """With concurrency 5, five slow handlers overlap (and never more than five)."""
    app = App(broker_url)
    running_now = 0
    peak = 0
    finished = 0

    @app.handler(queue_name)
    async def handle(payload: dict[str, int]) -> None:
        nonlocal running_now, peak, finished
        running_now += 1
        peak = max(peak, running_now)
        await asyncio.sleep(0.3)
        running_now -= 1
        finished += 1

    cleanup.extend(s.name for s in app.topology())
    async with running(app, concurrency=5, prefetch=20):
        for i in range(15):
            await app.publish(queue_name, {"i": i})

        async def all_done() -> bool:
            return finished == 15

        await eventually(all_done, timeout=10)
    assert peak == 5


async def test_correlation_id_propagates_through_ctx_publish(
    broker_url: str, queue_name: str, cleanup: list[str], amqp: aio_pika.abc.AbstractConnection
) -> None:
    """ctx.publish carries the incoming correlation id to the next message."""
    app = App(broker_url)
    out = f"{queue_name}.out"

    @app.handler(queue_name)
    async def handle(payload: dict[str, int], ctx: Context) -> None:
        await ctx.publish(out, {"next": payload["n"] + 1})

    cleanup.extend([*(s.name for s in app.topology()), out])
    channel = await amqp.channel()
    await channel.declare_queue(out, durable=True)
    async with running(app):
        await app.publish(queue_name, {"n": 1}, correlation_id="corr-9")
        (message,) = await take(amqp, out, 1)
    assert message.correlation_id == "corr-9"
    assert message.body == b'{"next":2}'
