"""Fallbacks and the circuit breaker (README "Operations"): a fallback spares dead letters
of exhausted retries and timeouts only; an open breaker stops consuming (messages wait in
the broker, no retries burnt) or, with a fallback, serves every message with it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from qworker import App, CircuitBreaker, CircuitState, Context
from tests.contract.conftest import Run
from tests.contract.helpers import Circuits, fast, kinds


async def test_the_fallback_spares_exhausted_retries_and_timeouts_only(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    """exhausted -> fallback (acked, reported as a success); timeout on the last attempt ->
    fallback; permanent and decode errors -> dead letter, no fallback; a failing fallback
    -> dead letter with the handler's error."""
    app = make_app()
    fallbacks: list[tuple[str, int]] = []

    async def fallback(payload: dict[str, str], ctx: Context) -> None:
        fallbacks.append((payload["kind"], ctx.attempt))
        if payload["kind"] == "fallback-fails":
            raise RuntimeError("the fallback is down too")

    @app.handler(queue, retry=fast(max_attempts=2), timeout=0.05, fallback=fallback)
    async def handle(payload: dict[str, str], ctx: Context) -> None:
        kind = payload["kind"]
        if kind == "timeout":
            await asyncio.sleep(5)
        if kind == "permanent":
            raise KeyError("no such customer")
        raise ConnectionError(f"{kind}: gateway down")

    async with run(app) as h:
        for kind in ("exhausted", "timeout", "fallback-fails"):
            await h.publish(queue, {"kind": kind}, message_id=kind)
        await h.publish_raw(queue, b"{not json", message_id="undecodable")
        await h.run_until_idle()
        assert sorted(fallbacks) == [("exhausted", 2), ("fallback-fails", 2), ("timeout", 2)]
        assert kinds(h.outcomes, "exhausted") == [("retried", 1, "50ms"), ("succeeded", 2, None)]
        assert kinds(h.outcomes, "timeout") == [("retried", 1, "50ms"), ("succeeded", 2, None)]
        assert kinds(h.outcomes, "fallback-fails") == [
            ("retried", 1, "50ms"),
            ("dead_lettered", 2, "retries_exhausted"),
        ]
        failed = await h.assert_dead_lettered("fallback-fails", queue=queue)
        assert failed.error_type == "builtins.ConnectionError"
        assert failed.error_message == "fallback-fails: gateway down"
        await h.assert_dead_lettered("undecodable", queue=queue, reason="decode_error")
        assert len(await h.dead_letters(queue)) == 2


async def test_a_permanent_error_never_reaches_the_fallback(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    app = make_app()
    fallbacks: list[str] = []

    async def fallback(payload: dict[str, str]) -> None:
        fallbacks.append(payload["kind"])

    @app.handler(queue, retry=fast(max_attempts=3), permanent=(KeyError,), fallback=fallback)
    async def handle(payload: dict[str, str]) -> None:
        raise KeyError("no such customer")

    async with run(app) as h:
        await h.publish(queue, {"kind": "permanent"}, message_id="m-1")
        await h.run_until_idle()
        assert fallbacks == []
        assert kinds(h.outcomes, "m-1") == [("dead_lettered", 1, "permanent_error")]


async def test_an_open_breaker_stops_consuming_until_a_probe_succeeds(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    """Two transient failures open the breaker (2 of 2 calls); nothing runs while it is
    open; after the 0.1 s cool-down one probe runs and closes it; every message is handled,
    those that never failed at attempt 1 (waiting burnt no retry)."""
    app = make_app()
    circuits = Circuits()
    app.add_observer(circuits)
    opened_at: list[float] = []
    calls: list[tuple[str, int, float]] = []

    class Recovers(Circuits):
        def circuit(self, queue: str, handler: str, state: CircuitState) -> None:
            if state is CircuitState.OPEN:
                opened_at.append(time.monotonic())

    app.add_observer(Recovers())
    breaker = CircuitBreaker(failure_ratio=1.0, window=2, min_calls=2, within=10, cooldown=0.1)

    @app.handler(queue, retry=fast(max_attempts=5), breaker=breaker)
    async def handle(payload: dict[str, int], ctx: Context) -> None:
        calls.append((ctx.message_id or "?", ctx.attempt, time.monotonic()))
        if not opened_at:  # the dependency is down until the breaker opens
            raise ConnectionError("dependency down")

    async with run(app, concurrency=1) as h:
        for n in range(4):
            await h.publish(queue, {"n": n}, message_id=f"m-{n}")
        await h.run_until_idle()
        assert circuits.states == [CircuitState.OPEN, CircuitState.HALF_OPEN, CircuitState.CLOSED]
        failed = [(m, a) for m, a, t in calls if t < opened_at[0]]
        assert failed == [("m-0", 1), ("m-1", 1)]
        after = [t for _, _, t in calls if t >= opened_at[0]]
        assert len(after) == 4
        assert min(after) - opened_at[0] >= 0.1  # nothing ran while the breaker was open
        handled = sorted((o.message_id, o.attempt) for o in h.handled(queue))
        assert handled == [("m-0", 2), ("m-1", 2), ("m-2", 1), ("m-3", 1)]
        assert await h.dead_letters(queue) == []


async def test_an_open_breaker_with_a_fallback_serves_every_message_with_it(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    """With a fallback, an open breaker keeps consuming and serves each message with the
    fallback (the handler is not called); the retried ones too, at their next attempt."""
    app = make_app()
    circuits = Circuits()
    app.add_observer(circuits)
    handler_calls: list[str] = []
    served: list[tuple[str, int]] = []

    async def fallback(payload: dict[str, int], ctx: Context) -> None:
        served.append((ctx.message_id or "?", ctx.attempt))

    breaker = CircuitBreaker(failure_ratio=1.0, window=2, min_calls=2, within=10, cooldown=30)

    @app.handler(queue, retry=fast(max_attempts=5), breaker=breaker, fallback=fallback)
    async def handle(payload: dict[str, int], ctx: Context) -> None:
        handler_calls.append(ctx.message_id or "?")
        raise ConnectionError("dependency down")

    async with run(app, concurrency=1) as h:
        await h.publish(queue, {"n": 0}, message_id="m-0")
        await h.publish(queue, {"n": 1}, message_id="m-1")
        await h.run_until_idle()
        assert circuits.states == [CircuitState.OPEN]
        await h.publish(queue, {"n": 2}, message_id="m-2")
        await h.publish(queue, {"n": 3}, message_id="m-3")
        await h.run_until_idle()
        assert handler_calls == ["m-0", "m-1"]
        assert sorted(served) == [("m-0", 2), ("m-1", 2), ("m-2", 1), ("m-3", 1)]
        handled = sorted((o.message_id, o.attempt) for o in h.handled(queue))
        assert handled == [("m-0", 2), ("m-1", 2), ("m-2", 1), ("m-3", 1)]
        assert circuits.states == [CircuitState.OPEN]
        assert await h.dead_letters(queue) == []
