"""What qworker relies on the broker for, seen through the worker: per-message TTL only at
the head of a tier, FIFO order, prefetch, classic queues, bodies of any size, unroutable
publishes and copies."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from qworker import App, Context, PublishFailed, Retry
from qworker import headers as hd
from tests.contract.conftest import Run
from tests.contract.helpers import fast, kinds


async def test_a_shorter_wait_in_a_tier_still_waits_behind_the_head(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    """RabbitMQ expires a per-message TTL only at the head of a queue. "first" waits the
    whole 200ms tier; "second" enters the same tier ~30 ms later asking for 150 ms (its own
    expiration): its time is up first, but it comes back only after "first"."""
    app = make_app()
    back: list[str] = []

    @app.handler(queue, retry=fast(max_attempts=2, initial=0.2))
    async def handle(payload: dict[str, str], ctx: Context) -> None:
        name = payload["name"]
        if ctx.attempt == 2:
            back.append(name)
            return
        if name == "first":
            raise ConnectionError("plain retry: the tier's own TTL")
        await asyncio.sleep(0.03)  # "first" is in the tier by now
        raise Retry(delay=0.15)

    async with run(app, concurrency=2) as h:
        await h.publish(queue, {"name": "first"}, message_id="first")
        await h.publish(queue, {"name": "second"}, message_id="second")
        await h.run_until_idle()
        assert kinds(h.outcomes, "first") == [("retried", 1, "200ms"), ("succeeded", 2, None)]
        assert kinds(h.outcomes, "second") == [("retried", 1, "200ms"), ("succeeded", 2, None)]
    assert back == ["first", "second"]


async def test_messages_are_handled_in_order_and_a_retry_comes_back_behind_them(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    """concurrency 1: m-0..m-4 run in publish order; m-0 fails once and its retry (200ms)
    joins the back of the queue."""
    app = make_app()
    order: list[tuple[str, int]] = []

    @app.handler(queue, retry=fast(max_attempts=2, initial=0.2))
    async def handle(payload: dict[str, int], ctx: Context) -> None:
        order.append((ctx.message_id or "?", ctx.attempt))
        if ctx.message_id == "m-0" and ctx.attempt == 1:
            raise ConnectionError("once")

    async with run(app, concurrency=1) as h:
        for n in range(5):
            await h.publish(queue, {"n": n}, message_id=f"m-{n}")
        await h.run_until_idle()
    assert order == [("m-0", 1), ("m-1", 1), ("m-2", 1), ("m-3", 1), ("m-4", 1), ("m-0", 2)]


async def test_concurrency_bounds_the_handlers_running_at_once(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    """concurrency=3, prefetch=3, eight 20 ms handlers: three at once, never more."""
    app = make_app()
    running = 0
    peak = 0

    @app.handler(queue, retry=fast())
    async def handle(payload: dict[str, int]) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.02)
        running -= 1

    async with run(app, concurrency=3, prefetch=3) as h:
        for n in range(8):
            await h.publish(queue, {"n": n})
        await h.run_until_idle()
        assert len(h.handled(queue)) == 8
    assert peak == 3


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
async def test_retries_and_dead_letters_on_either_queue_type(
    make_app: Callable[..., App], run: Run, queue: str, queue_type: str
) -> None:
    """The same story on classic and quorum queues: two retries through the 50ms and 100ms
    tiers (the broker's x-death seen by the next attempt), a dead letter with the history."""
    app = make_app()
    deaths: list[list[tuple[str, str, int]]] = []

    @app.handler(queue, retry=fast(max_attempts=3), queue_type=queue_type)  # type: ignore[arg-type]
    async def handle(payload: dict[str, int], ctx: Context) -> None:
        deaths.append(
            [(d["queue"], d["reason"], d["count"]) for d in ctx.headers.get("x-death", [])]
        )
        raise ConnectionError("down")

    async with run(app) as h:
        await h.publish(queue, {"n": 1}, message_id="m-1")
        await h.run_until_idle()
        assert kinds(h.outcomes, "m-1") == [
            ("retried", 1, "50ms"),
            ("retried", 2, "100ms"),
            ("dead_lettered", 3, "retries_exhausted"),
        ]
        dl = await h.assert_dead_lettered("m-1", queue=queue, reason="retries_exhausted")
    assert deaths == [
        [],
        [(f"{queue}.retry.50ms", "expired", 1)],
        [(f"{queue}.retry.100ms", "expired", 1)],
    ]
    assert [e["attempt"] for e in dl.headers[hd.HISTORY]] == [1, 2, 3]
    assert "x-death" not in dl.headers


async def test_bodies_larger_than_a_frame_and_empty_ones_survive_every_copy(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    """A 300,000-byte body (three body frames) and an empty one: retried, replayed from the
    DLQ and handled, byte for byte."""
    app = make_app()
    big = bytes(range(256)) * 1172  # 300,032 bytes
    seen: list[tuple[str, int, bytes]] = []

    @app.handler(queue, retry=fast(max_attempts=2))
    async def handle(payload: bytes, ctx: Context) -> None:
        seen.append((ctx.message_id or "?", ctx.attempt, payload))
        if not ctx.headers.get(hd.REPLAY_COUNT):
            raise ConnectionError("once more")

    async with run(app) as h:
        await h.publish_raw(queue, big, message_id="big")
        await h.publish_raw(queue, b"", message_id="empty")
        await h.run_until_idle()
        dead = {dl.message_id: dl.body for dl in await h.dead_letters(queue)}
        assert dead == {"big": big, "empty": b""}
        assert (await h.replay(queue)).replayed == 2
        await h.run_until_idle()
    assert sorted((m, a, len(b)) for m, a, b in seen) == [
        ("big", 1, len(big)),
        ("big", 1, len(big)),
        ("big", 2, len(big)),
        ("empty", 1, 0),
        ("empty", 1, 0),
        ("empty", 2, 0),
    ]
    assert all(b == (big if m == "big" else b"") for m, _, b in seen)


async def test_publishing_to_no_queue_fails_and_ctx_publish_carries_the_correlation(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    """app.publish to a queue that does not exist raises PublishFailed (unroutable); a
    handler's ctx.publish carries its message id on as the correlation id."""
    app = make_app()
    downstream: list[tuple[str | None, dict[str, Any]]] = []

    @app.handler(queue, retry=fast())
    async def first(payload: dict[str, int], ctx: Context) -> None:
        await ctx.publish(f"{queue}.next", {"from": ctx.message_id})

    @app.handler(f"{queue}.next", retry=fast())
    async def second(payload: dict[str, Any], ctx: Context) -> None:
        downstream.append((ctx.correlation_id, payload))

    async with run(app) as h:
        with pytest.raises(PublishFailed, match="unroutable"):
            await app.publish(f"{queue}.missing", {"n": 1})
        await h.publish(queue, {"n": 1}, message_id="origin")
        await h.run_until_idle()
    assert downstream == [("origin", {"from": "origin"})]


async def test_a_copy_with_nowhere_to_go_leaves_the_original_with_the_broker(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    """The retry tier was deleted behind the worker's back: the retry copy is unroutable,
    so no retry is reported, the original is given back (counted), comes back redelivered
    through the quarantine, and is handled there; nothing is lost, nothing dead-lettered."""
    app = make_app()
    runs: list[tuple[int, int]] = []

    @app.handler(queue, retry=fast(max_attempts=3))
    async def handle(payload: dict[str, int], ctx: Context) -> None:
        runs.append((ctx.attempt, hd.read_int(ctx.headers, hd.CRASHES)))
        if len(runs) == 1:
            raise ConnectionError("down once")

    async with run(app) as h:
        channel = await h.connection.channel()
        await channel.queue_delete(f"{queue}.retry.50ms")
        await channel.close()
        await h.publish(queue, {"n": 1}, message_id="m-1")
        await h.run_until_idle()
        assert runs == [(1, 0), (1, 1)]
        assert kinds(h.outcomes, "m-1") == [("succeeded", 1, None)]
        assert await h.dead_letters(queue) == []
