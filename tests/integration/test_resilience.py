"""Hooks, rate alerts, the circuit breaker and fallbacks, on the real broker."""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
import pytest

from qworker import App, Context, Permanent, RetryPolicy
from qworker.alerts import Alert
from qworker.breaker import CircuitBreaker
from qworker.events import CircuitState, Observer, Outcome, OutcomeKind, Severity
from qworker.testing import running
from tests.support.broker import depth, eventually, take

pytestmark = pytest.mark.rabbitmq


def quick(max_attempts: int = 2) -> RetryPolicy:
    return RetryPolicy(max_attempts=max_attempts, initial_delay=0.05, jitter=0)


async def test_hooks_fire_once_per_event_and_a_raising_hook_changes_nothing(
    broker_url: str, queue_name: str, cleanup: list[str], amqp: aio_pika.abc.AbstractConnection
) -> None:
    """on_retry/on_dead_letter get one typed record per event; a failing hook is only logged."""
    app = App(broker_url)
    retries: list[Outcome] = []
    dead: list[Outcome] = []
    done = asyncio.Event()

    @app.handler(queue_name, retry=quick())
    async def handle(payload: dict[str, str], ctx: Context) -> None:
        if payload["kind"] == "bad":
            raise Permanent("no such customer")
        if ctx.attempt == 1:
            raise ConnectionError("flaky")
        done.set()

    @app.on_retry
    async def record_retry(outcome: Outcome) -> None:
        retries.append(outcome)

    @app.on_dead_letter
    async def record_dead(outcome: Outcome) -> None:
        dead.append(outcome)

    @app.on_retry
    @app.on_dead_letter
    async def broken(outcome: Outcome) -> None:
        raise RuntimeError("the pager is down")

    cleanup.extend(s.name for s in app.topology())
    async with running(app):
        await app.publish(queue_name, {"kind": "flaky"}, message_id="m-flaky")
        await app.publish(queue_name, {"kind": "bad"}, message_id="m-bad")
        await asyncio.wait_for(done.wait(), 10)
        (dead_message,) = await take(amqp, f"{queue_name}.dlq", 1)

        async def hooks_ran() -> bool:
            return len(retries) == 1 and len(dead) == 1

        await eventually(hooks_ran)
        await asyncio.sleep(0.2)  # no late duplicates
    assert dead_message.message_id == "m-bad"
    (retry,) = retries
    assert (retry.kind, retry.message_id, retry.attempt) == (OutcomeKind.RETRIED, "m-flaky", 1)
    assert retry.severity is Severity.LOW and retry.tier == "50ms"
    assert retry.error_type == "builtins.ConnectionError" and retry.queue == queue_name
    (letter,) = dead
    assert (letter.reason, letter.severity) == ("permanent_error", Severity.HIGH)
    assert letter.error_message == "no such customer"
    assert letter.handler.endswith(".handle")


async def test_rate_alert_fires_once_per_burst_and_again_after_the_cooldown(
    broker_url: str, queue_name: str, cleanup: list[str], amqp: aio_pika.abc.AbstractConnection
) -> None:
    """3 dead letters within 5 s fire one alert; a later burst after the cool-down fires again."""
    app = App(broker_url)
    alerts: list[Alert] = []

    @app.handler(queue_name)
    async def handle(payload: dict[str, int]) -> None:
        raise Permanent("always")

    async def notify(alert: Alert) -> None:
        alerts.append(alert)

    app.alert(notify=notify, count=3, within=5, cooldown=1.5, severity="high")
    cleanup.extend(s.name for s in app.topology())
    async with running(app):
        for n in range(6):
            await app.publish(queue_name, {"n": n})
        await take(amqp, f"{queue_name}.dlq", 6)
        await asyncio.sleep(0.1)
        assert len(alerts) == 1
        assert len(alerts[0].outcomes) == 3
        await asyncio.sleep(1.6)
        for n in range(3):
            await app.publish(queue_name, {"n": n})
        await take(amqp, f"{queue_name}.dlq", 3)
        await asyncio.sleep(0.1)
    assert len(alerts) == 2
    assert "3 dead_lettered" in alerts[1].rule


class CircuitLog(Observer):
    def __init__(self) -> None:
        self.states: list[CircuitState] = []

    def circuit(self, queue: str, handler: str, state: CircuitState) -> None:
        self.states.append(state)


async def test_breaker_opens_holds_messages_in_the_broker_and_closes_after_a_probe(
    broker_url: str, queue_name: str, cleanup: list[str], amqp: aio_pika.abc.AbstractConnection
) -> None:
    """A failing dependency opens the breaker: consumption stops, messages wait unretried in the
    queue; after the cool-down one probe succeeds, the breaker closes and everything is handled."""
    app = App(broker_url)
    log = CircuitLog()
    app.add_observer(log)
    dependency_up = False
    calls = 0
    handled: set[int] = set()

    @app.handler(
        queue_name,
        retry=RetryPolicy(max_attempts=10, initial_delay=0.05, jitter=0),
        breaker=CircuitBreaker(failure_ratio=0.5, window=4, min_calls=4, within=10, cooldown=1.5),
    )
    async def handle(payload: dict[str, int]) -> None:
        nonlocal calls
        calls += 1
        if not dependency_up:
            raise ConnectionError("dependency down")
        handled.add(payload["n"])

    cleanup.extend(s.name for s in app.topology())
    async with running(app, concurrency=1):
        for n in range(4):
            await app.publish(queue_name, {"n": n})

        async def opened() -> bool:
            return CircuitState.OPEN in log.states

        await eventually(opened)
        calls_when_open = calls
        for n in range(4, 14):
            await app.publish(queue_name, {"n": n})
        await asyncio.sleep(0.8)
        assert calls == calls_when_open  # nothing runs while open
        assert await depth(amqp, queue_name) == 14  # all waiting in the broker
        dependency_up = True

        async def all_handled() -> bool:
            return len(handled) == 14

        await eventually(all_handled, timeout=15)
    assert log.states == [CircuitState.OPEN, CircuitState.HALF_OPEN, CircuitState.CLOSED]
    assert await depth(amqp, f"{queue_name}.dlq") == 0


async def test_fallback_serves_messages_whose_retries_are_exhausted(
    broker_url: str, queue_name: str, cleanup: list[str], amqp: aio_pika.abc.AbstractConnection
) -> None:
    """Retries exhausted: the fallback runs instead of dead-lettering; if it fails too, the
    message is dead-lettered with the handler's error as usual."""
    app = App(broker_url)
    served: list[tuple[str, int]] = []

    async def cached_answer(payload: dict[str, Any], ctx: Context) -> None:
        if payload["cache"] == "miss":
            raise KeyError("not cached")
        served.append((payload["id"], ctx.attempt))

    @app.handler(queue_name, retry=quick(max_attempts=2), fallback=cached_answer)
    async def handle(payload: dict[str, Any], ctx: Context) -> None:
        raise TimeoutError("upstream slow")

    cleanup.extend(s.name for s in app.topology())
    async with running(app):
        await app.publish(queue_name, {"id": "hit", "cache": "hit"})
        await app.publish(queue_name, {"id": "miss", "cache": "miss"}, message_id="m-miss")
        (dead,) = await take(amqp, f"{queue_name}.dlq", 1)

        async def served_once() -> bool:
            return len(served) == 1

        await eventually(served_once)
    assert served == [("hit", 2)]
    assert dead.message_id == "m-miss"
    assert dead.headers["x-qworker-reason"] == "retries_exhausted"
    assert dead.headers["x-qworker-error-type"] == "builtins.TimeoutError"


async def test_fallback_serves_every_message_while_the_breaker_is_open(
    broker_url: str, queue_name: str, cleanup: list[str]
) -> None:
    """With a fallback, an open breaker does not stop consumption: the fallback answers."""
    app = App(broker_url)
    primary: list[int] = []
    fallback: list[int] = []

    async def degraded(payload: dict[str, int]) -> None:
        fallback.append(payload["n"])

    @app.handler(
        queue_name,
        retry=quick(max_attempts=5),
        breaker=CircuitBreaker(failure_ratio=1.0, window=2, min_calls=2, cooldown=60),
        fallback=degraded,
    )
    async def handle(payload: dict[str, int]) -> None:
        primary.append(payload["n"])
        raise ConnectionError("down")

    cleanup.extend(s.name for s in app.topology())
    async with running(app, concurrency=1):
        for n in range(2):
            await app.publish(queue_name, {"n": n})

        async def two_failures() -> bool:
            return len(primary) == 2

        await eventually(two_failures)
        for n in range(2, 8):
            await app.publish(queue_name, {"n": n})

        async def all_served() -> bool:
            return set(fallback) == set(range(8))

        await eventually(all_served, timeout=10)
    assert primary == [0, 1]  # after opening, the handler is not called again
