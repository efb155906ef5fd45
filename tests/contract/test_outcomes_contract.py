"""Outcomes: success, delayed retries through tiers, immediate retries, exhaustion, timeouts."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qworker import App, Context, Permanent, Retry
from qworker import headers as hd
from tests.contract.conftest import Run
from tests.contract.helpers import Order, fast, kinds


async def test_success_runs_each_message_once_with_its_context(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    """Three messages: each handled once, attempt 1, with its ids, headers and queue; no
    retries, no dead letters."""
    app = make_app()
    seen: list[tuple[str, str | None, str | None, int, str, Any]] = []

    @app.handler(queue, retry=fast())
    async def handle(order: Order, ctx: Context) -> None:
        seen.append(
            (
                order.order_id,
                ctx.message_id,
                ctx.correlation_id,
                ctx.attempt,
                ctx.queue,
                ctx.headers.get("tenant"),
            )
        )

    async with run(app) as h:
        for n in range(3):
            await h.publish(
                queue,
                Order(order_id=f"o-{n}", amount_cents=n + 1),
                headers={"tenant": "acme"},
                message_id=f"m-{n}",
                correlation_id=f"c-{n}",
            )
        await h.run_until_idle()
        assert sorted(seen) == [(f"o-{n}", f"m-{n}", f"c-{n}", 1, queue, "acme") for n in range(3)]
        assert sorted((o.message_id, o.attempt) for o in h.handled(queue)) == [
            ("m-0", 1),
            ("m-1", 1),
            ("m-2", 1),
        ]
        assert h.retried(queue) == []
        assert await h.dead_letters(queue) == []


async def test_transient_twice_then_success_goes_through_the_schedules_tiers(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    """ConnectionError on attempts 1 and 2: retried through the 50ms then 100ms tier, handled
    on attempt 3, with the same message id and the failure count in x-qworker-attempt."""
    app = make_app()
    seen: list[tuple[int, str | None, int]] = []

    @app.handler(queue, retry=fast(max_attempts=5, initial=0.05, multiplier=2.0))
    async def handle(payload: dict[str, int], ctx: Context) -> None:
        seen.append((ctx.attempt, ctx.message_id, hd.read_attempt(ctx.headers)))
        if ctx.attempt < 3:
            raise ConnectionError("database unavailable")

    async with run(app) as h:
        await h.publish(queue, {"n": 1}, message_id="m-1")
        await h.run_until_idle()
        assert seen == [(1, "m-1", 0), (2, "m-1", 1), (3, "m-1", 2)]
        assert kinds(h.outcomes, "m-1") == [
            ("retried", 1, "50ms"),
            ("retried", 2, "100ms"),
            ("succeeded", 3, None),
        ]
        retried = h.retried(queue)
        assert [(o.classification, o.error_type) for o in retried] == [
            ("transient", "builtins.ConnectionError"),
            ("transient", "builtins.ConnectionError"),
        ]
        assert await h.dead_letters(queue) == []


async def test_transient_on_every_attempt_is_dead_lettered_as_retries_exhausted(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    """max_attempts=3: three executions, two retries (50ms, 100ms), then the DLQ with reason
    retries_exhausted, x-qworker-attempt 3 and a history of the three failures."""
    app = make_app()
    attempts: list[int] = []

    @app.handler(queue, retry=fast(max_attempts=3))
    async def handle(payload: dict[str, int], ctx: Context) -> None:
        attempts.append(ctx.attempt)
        raise TimeoutError(f"upstream slow on attempt {ctx.attempt}")

    async with run(app) as h:
        await h.publish(queue, {"n": 1}, message_id="m-1")
        await h.run_until_idle()
        assert attempts == [1, 2, 3]
        assert kinds(h.outcomes, "m-1") == [
            ("retried", 1, "50ms"),
            ("retried", 2, "100ms"),
            ("dead_lettered", 3, "retries_exhausted"),
        ]
        dl = await h.assert_dead_lettered("m-1", queue=queue, reason="retries_exhausted")
        assert dl.attempt == 3
        assert dl.error_type == "builtins.TimeoutError"
        assert dl.error_message == "upstream slow on attempt 3"
        assert dl.headers[hd.CLASSIFICATION] == "transient"
        assert [(e["attempt"], e["error_message"]) for e in dl.headers[hd.HISTORY]] == [
            (1, "upstream slow on attempt 1"),
            (2, "upstream slow on attempt 2"),
            (3, "upstream slow on attempt 3"),
        ]
        assert dl.headers[hd.FIRST_FAILURE_AT] <= dl.headers[hd.LAST_FAILURE_AT]
        (dead,) = [o for o in h.outcomes if o.kind.value == "dead_lettered"]
        assert (dead.severity, dead.reason) == ("high", "retries_exhausted")


async def test_max_delay_caps_the_tiers(make_app: Callable[..., App], run: Run, queue: str) -> None:
    """initial 50ms, multiplier 3, max_delay 100ms: the retries wait 50ms, 100ms, 100ms."""
    app = make_app()

    @app.handler(queue, retry=fast(max_attempts=4, initial=0.05, multiplier=3.0, max_delay=0.1))
    async def handle(payload: dict[str, int]) -> None:
        raise ConnectionError("down")

    async with run(app) as h:
        await h.publish(queue, {"n": 1}, message_id="m-1")
        await h.run_until_idle()
        assert kinds(h.outcomes, "m-1") == [
            ("retried", 1, "50ms"),
            ("retried", 2, "100ms"),
            ("retried", 3, "100ms"),
            ("dead_lettered", 4, "retries_exhausted"),
        ]


async def test_max_attempts_1_dead_letters_the_first_transient_failure(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    """max_attempts=1 means no retry at all: the first transient failure is final."""
    app = make_app()
    calls = 0

    @app.handler(queue, retry=fast(max_attempts=1))
    async def handle(payload: dict[str, int]) -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError("down")

    async with run(app) as h:
        await h.publish(queue, {"n": 1}, message_id="m-1")
        await h.run_until_idle()
        assert calls == 1
        assert kinds(h.outcomes, "m-1") == [("dead_lettered", 1, "retries_exhausted")]
        dl = await h.assert_dead_lettered("m-1", queue=queue, reason="retries_exhausted")
        assert dl.attempt == 1


async def test_retry_with_a_delay_waits_in_the_tier_that_holds_it(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    """Retry(delay=0.05) goes to the policy's 100ms tier; Retry(delay=0.15), longer than
    every tier, to the 1-2-5 ladder's 200ms tier, declared at need; both come back."""
    app = make_app()
    seen: list[tuple[str, int]] = []

    @app.handler(queue, retry=fast(max_attempts=3, initial=0.1))
    async def handle(payload: dict[str, float], ctx: Context) -> None:
        seen.append((ctx.message_id or "?", ctx.attempt))
        if ctx.attempt == 1:
            raise Retry(delay=payload["delay"])

    async with run(app) as h:
        await h.publish(queue, {"delay": 0.05}, message_id="short")
        await h.publish(queue, {"delay": 0.15}, message_id="long")
        await h.run_until_idle()
        assert sorted(seen) == [("long", 1), ("long", 2), ("short", 1), ("short", 2)]
        assert kinds(h.outcomes, "short") == [("retried", 1, "100ms"), ("succeeded", 2, None)]
        assert kinds(h.outcomes, "long") == [("retried", 1, "200ms"), ("succeeded", 2, None)]
        retried = {o.message_id: o for o in h.retried(queue)}
        assert retried["short"].error_type == "qworker.errors.Retry"
        assert retried["short"].classification == "transient"
        assert await h.dead_letters(queue) == []


async def test_retry_on_the_last_attempt_is_retries_exhausted(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    """Retry(delay=...) asks for a retry, but not beyond max_attempts."""
    app = make_app()

    @app.handler(queue, retry=fast(max_attempts=2))
    async def handle(payload: dict[str, int]) -> None:
        raise Retry(delay=0.05)

    async with run(app) as h:
        await h.publish(queue, {"n": 1}, message_id="m-1")
        await h.run_until_idle()
        assert kinds(h.outcomes, "m-1") == [
            ("retried", 1, "50ms"),
            ("dead_lettered", 2, "retries_exhausted"),
        ]
        dl = await h.assert_dead_lettered("m-1", queue=queue, reason="retries_exhausted")
        assert dl.error_type == "qworker.errors.Retry"


async def test_immediate_retries_run_in_process_and_count_as_attempts(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    """immediate=2: attempts 1-3 in the first delivery, one delayed retry, attempts 4-5 in
    the second (handled on 5); the retried copy says 3 failed attempts."""
    app = make_app()
    seen: list[tuple[int, int]] = []

    @app.handler(queue, retry=fast(max_attempts=6, immediate=2))
    async def handle(payload: dict[str, int], ctx: Context) -> None:
        seen.append((ctx.attempt, hd.read_attempt(ctx.headers)))
        if ctx.attempt < 5:
            raise ConnectionError("flaky")

    async with run(app) as h:
        await h.publish(queue, {"n": 1}, message_id="m-1")
        await h.run_until_idle()
        assert seen == [(1, 0), (2, 0), (3, 0), (4, 3), (5, 3)]
        assert kinds(h.outcomes, "m-1") == [("retried", 3, "50ms"), ("succeeded", 5, None)]
        assert await h.dead_letters(queue) == []


async def test_immediate_retries_exhausted_keep_every_failure_in_the_history(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    """immediate=1, max_attempts=4: two deliveries of two executions, one delayed retry;
    the dead letter's history lists all four failures."""
    app = make_app()
    attempts: list[int] = []

    @app.handler(queue, retry=fast(max_attempts=4, immediate=1))
    async def handle(payload: dict[str, int], ctx: Context) -> None:
        attempts.append(ctx.attempt)
        raise ConnectionError(f"flaky {ctx.attempt}")

    async with run(app) as h:
        await h.publish(queue, {"n": 1}, message_id="m-1")
        await h.run_until_idle()
        assert attempts == [1, 2, 3, 4]
        assert kinds(h.outcomes, "m-1") == [
            ("retried", 2, "50ms"),
            ("dead_lettered", 4, "retries_exhausted"),
        ]
        dl = await h.assert_dead_lettered("m-1", queue=queue, reason="retries_exhausted")
        assert dl.attempt == 4
        assert [e["attempt"] for e in dl.headers[hd.HISTORY]] == [1, 2, 3, 4]
        assert dl.error_message == "flaky 4"


async def test_immediate_retries_stop_at_a_permanent_failure(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    """A permanent failure is never retried in process: one execution, dead letter."""
    app = make_app()
    attempts: list[int] = []

    @app.handler(queue, retry=fast(max_attempts=5, immediate=3), permanent=(KeyError,))
    async def handle(payload: dict[str, int], ctx: Context) -> None:
        attempts.append(ctx.attempt)
        raise KeyError("customer 42")

    async with run(app) as h:
        await h.publish(queue, {"n": 1}, message_id="m-1")
        await h.run_until_idle()
        assert attempts == [1]
        assert kinds(h.outcomes, "m-1") == [("dead_lettered", 1, "permanent_error")]


async def test_handler_timeout_is_retried_then_dead_lettered_as_timeout(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    """A handler past its time limit fails with HandlerTimeout (transient), is retried, and
    on the last attempt is dead-lettered with reason timeout (not retries_exhausted)."""
    app = make_app()
    attempts: list[int] = []

    @app.handler(queue, retry=fast(max_attempts=2), timeout=0.05)
    async def handle(payload: dict[str, int], ctx: Context) -> None:
        attempts.append(ctx.attempt)
        await asyncio.sleep(5)

    async with run(app) as h:
        await h.publish(queue, {"n": 1}, message_id="m-1")
        await h.run_until_idle()
        assert attempts == [1, 2]
        assert kinds(h.outcomes, "m-1") == [("retried", 1, "50ms"), ("dead_lettered", 2, "timeout")]
        dl = await h.assert_dead_lettered("m-1", queue=queue, reason="timeout")
        assert dl.error_type == "qworker.errors.HandlerTimeout"
        assert dl.error_message == "handler exceeded its 0.05s timeout"
        assert dl.headers[hd.CLASSIFICATION] == "transient"


async def test_a_timeout_then_a_quick_attempt_succeeds(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    """The handler hangs on attempt 1 only: retried after the timeout, handled on attempt 2."""
    app = make_app()

    @app.handler(queue, retry=fast(max_attempts=3), timeout=0.05)
    async def handle(payload: dict[str, int], ctx: Context) -> None:
        if ctx.attempt == 1:
            await asyncio.sleep(5)

    async with run(app) as h:
        await h.publish(queue, {"n": 1}, message_id="m-1")
        await h.run_until_idle()
        assert kinds(h.outcomes, "m-1") == [("retried", 1, "50ms"), ("succeeded", 2, None)]
        (retried,) = h.retried(queue)
        assert retried.error_type == "qworker.errors.HandlerTimeout"


class _Loaded:
    """Something a handler loaded (a local of its frame)."""


async def test_a_moved_failure_releases_the_handlers_frames_and_keeps_its_traceback_text(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    """Once the failure is captured as text, the exception (and its chained cause) lets go of
    the handler's frames, so their locals do not wait for the copy's confirm; the text keeps
    them: the dead letter's traceback names the handler's line and the cause's."""
    app = make_app()
    raised: list[BaseException] = []
    loaded: list[weakref.ref[_Loaded]] = []

    @app.handler(queue, retry=fast())
    async def handle(payload: dict[str, int], ctx: Context) -> None:
        held = _Loaded()
        loaded.append(weakref.ref(held))
        try:
            raise KeyError("row-7")
        except KeyError as cause:
            error = Permanent("bad row")
            raised.append(error)
            raise error from cause

    async with run(app) as h:
        await h.publish(queue, {"n": 1}, message_id="m-1")
        await h.run_until_idle()
        dl = await h.assert_dead_lettered("m-1", queue=queue, reason="permanent_error")
        text = dl.headers[hd.ERROR_TRACEBACK]
        assert 'raise KeyError("row-7")' in text and "raise error from cause" in text, text
        assert "The above exception was the direct cause" in text
    (error,) = raised
    assert error.__traceback__ is None and error.__cause__ is not None
    assert error.__cause__.__traceback__ is None
    assert [ref() for ref in loaded] == [None]


@dataclass(frozen=True)
class _FrozenError(Exception):
    """An exception whose attributes cannot be set (a frozen dataclass, as some code bases
    define their errors): ``exc.__traceback__ = None`` raises ``FrozenInstanceError``."""

    order_id: str


async def test_a_frozen_exception_is_dead_lettered_like_any_other(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    """Releasing the frames must not depend on the exception's own ``__setattr__``."""
    app = make_app()
    raised: list[BaseException] = []

    @app.handler(queue, retry=fast(max_attempts=1))
    async def handle(payload: dict[str, int]) -> None:
        error = _FrozenError("o-7")
        raised.append(error)
        raise error

    async with run(app) as h:
        await h.publish(queue, {"n": 1}, message_id="m-1")
        await h.run_until_idle()
        dl = await h.assert_dead_lettered("m-1", queue=queue)
        assert dl.error_type is not None and dl.error_type.endswith("_FrozenError")
        assert "raise error" in dl.headers[hd.ERROR_TRACEBACK]
    assert kinds(h.outcomes, "m-1") == [("dead_lettered", 1, dl.reason)]
    assert raised[0].__traceback__ is None
