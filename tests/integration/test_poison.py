"""Poison messages (issue 12 point 2), on the real broker, in process.

"The worker died running it" is simulated by closing the worker's connection from the broker
while the handler runs: the broker gives the delivery back with ``redelivered`` set, exactly
as after a crash. (The same through a real ``kill -9`` of a supervised child is in
tests/ops.)
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable
from typing import Any

import aio_pika
import pytest

from qworker import App, Context, Observer, Outcome, OutcomeKind, RetryPolicy
from qworker import headers as h
from qworker.testing import running
from tests.support.broker import eventually, take

pytestmark = pytest.mark.rabbitmq


def _close_connections_of(app_name: str) -> int:
    """Close (broker side) the worker's connection(s), not the publisher's."""
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    closed = 0
    for line in listed.splitlines():
        pid, _, properties = line.partition("\t")
        if f'"connection_name","{app_name}"' in properties:
            subprocess.run(
                ["rabbitmqctl", "close_connection", pid, "test: the worker died"],
                capture_output=True,
                timeout=30,
                check=False,
            )
            closed += 1
    return closed


async def _reconnected_after_close(app: App, worker: Any) -> None:
    """Close the worker's connection from the broker, then wait until the worker has connected
    again: the old connection's channels are gone for sure."""
    connections = worker.connections
    assert await asyncio.to_thread(_close_connections_of, app.name) >= 1
    await eventually(lambda: worker.connections > connections, 20)


async def _handle_one(
    app: App, queue_name: str, workers: list[Any], done: Callable[[], bool]
) -> None:
    """Run ``app``'s worker (appended to ``workers``), publish one message, wait until
    ``done()``, then half a second more: a run on a dead channel would come at once."""
    async with running(app) as worker:
        workers.append(worker)
        await app.publish(queue_name, {"k": "v"}, message_id="m")
        await eventually(done, 30)
        await asyncio.sleep(0.5)


class _Outcomes(Observer):
    def __init__(self) -> None:
        self.seen: list[Outcome] = []

    def outcome(self, event: Outcome) -> None:
        self.seen.append(event)


async def test_a_message_that_keeps_killing_its_worker_is_dead_lettered_as_poison_others_handled(
    broker_url: str,
    queue_name: str,
    cleanup: list[str],
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    """The poison message "kills" the worker each time it runs (here: its connection dies).
    Its neighbours in flight come back too, are quarantined, run alone and are handled; the
    poison one is dead-lettered by qworker after max_deliveries, with reason poison, error
    type PoisonMessage, a critical outcome, and never run again."""
    app = App(broker_url, name=f"poison-{queue_name}")
    outcomes = _Outcomes()
    app.add_observer(outcomes)
    entered = asyncio.Event()
    runs: dict[str, int] = {}
    handled: set[str] = set()

    @app.handler(queue_name, max_deliveries=3)
    async def handle(payload: dict[str, str], ctx: Context) -> None:
        message_id = ctx.message_id or "?"
        runs[message_id] = runs.get(message_id, 0) + 1
        if payload["kind"] == "poison":
            entered.set()
            await asyncio.sleep(60)  # "dies" here: the test closes the connection
        await asyncio.sleep(0.2)
        handled.add(message_id)

    cleanup.extend(s.name for s in app.topology())
    neighbours = [f"ok-{n}" for n in range(8)]
    async with running(app, concurrency=4) as worker:
        await app.publish(queue_name, {"kind": "poison"}, message_id="poison")
        for message_id in neighbours:
            await app.publish(queue_name, {"kind": "ok"}, message_id=message_id)
        for crash in range(3):
            await asyncio.wait_for(entered.wait(), 20)
            entered.clear()
            assert await asyncio.to_thread(_close_connections_of, app.name) >= 1, crash
            await eventually(lambda n=crash: worker.connections >= n + 2, 20)
        await eventually(lambda: set(neighbours) <= handled, 30)
        (dead,) = await take(amqp, f"{queue_name}.dlq", 1)

    headers: dict[str, Any] = dead.headers or {}
    assert dead.message_id == "poison"
    assert headers[h.REASON] == "poison"
    assert headers[h.ERROR_TYPE] == "qworker.errors.PoisonMessage"
    assert "without an outcome" in headers[h.ERROR_MESSAGE]
    assert runs["poison"] == 3  # condemned before a fourth run
    poison = [o for o in outcomes.seen if o.kind is OutcomeKind.DEAD_LETTERED]
    assert [(o.message_id, o.reason, o.severity) for o in poison] == [
        ("poison", "poison", "critical")
    ]
    # No neighbour was condemned, and all of them were handled.
    assert all(o.message_id == "poison" for o in poison)
    channel = await amqp.channel()
    for name in (queue_name, f"{queue_name}.dlq", f"{queue_name}.quarantine"):
        declared = await channel.declare_queue(name, passive=True)
        assert declared.declaration_result.message_count == 0, name
    await channel.close()


async def test_a_delivery_given_back_once_is_quarantined_run_alone_and_handled(
    broker_url: str, queue_name: str, cleanup: list[str]
) -> None:
    """A delivery that came back once (its worker's connection died) goes through the
    quarantine with x-qworker-crashes 1 and runs with no other message of its handler
    running (its own old run, orphaned on the dead channel, may still be there), then
    succeeds; the other messages are all handled."""
    app = App(broker_url, name=f"quarantine-{queue_name}")
    first = asyncio.Event()
    running_ids: list[str] = []
    alone_check: list[list[str]] = []
    handled: set[str] = set()

    @app.handler(queue_name)
    async def handle(payload: dict[str, str], ctx: Context) -> None:
        message_id = ctx.message_id or "?"
        crashes = h.read_int(ctx.headers, h.CRASHES)
        running_ids.append(message_id)
        try:
            if message_id == "slow" and crashes == 0:
                first.set()
                await asyncio.sleep(60)  # its worker "dies" meanwhile
            if message_id == "slow" and crashes == 1:
                alone_check.append([m for m in running_ids if m != "slow"])
                await asyncio.sleep(0.3)
                alone_check.append([m for m in running_ids if m != "slow"])
            await asyncio.sleep(0.05)
            handled.add(message_id)
        finally:
            running_ids.remove(message_id)

    cleanup.extend(s.name for s in app.topology())
    others = [f"other-{n}" for n in range(6)]
    async with running(app, concurrency=4) as worker:
        await app.publish(queue_name, {"k": "v"}, message_id="slow")
        await asyncio.wait_for(first.wait(), 10)
        for message_id in others:
            await app.publish(queue_name, {"k": "v"}, message_id=message_id)
        assert await asyncio.to_thread(_close_connections_of, app.name) >= 1
        await eventually(lambda: worker.connections >= 2, 20)
        await eventually(lambda: {"slow", *others} <= handled, 30)
    assert alone_check == [[], []]


async def test_deliveries_waiting_for_a_quarantined_run_are_not_run_after_their_channel_closed(
    broker_url: str,
    queue_name: str,
    cleanup: list[str],
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    """While a quarantined delivery runs alone, the handler's other deliveries wait. When the
    connection dies then, the quarantined run is cancelled and the wait ends; a waiting
    delivery must not run on its dead channel (the broker has it back: it would run twice, a
    duplicate the fault suite counted by the dozen). Each runs once, after its redelivery."""
    app = App(broker_url, name=f"waiting-{queue_name}")
    alone = asyncio.Event()
    runs: dict[str, int] = {}

    @app.handler(queue_name)
    async def handle(payload: dict[str, str], ctx: Context) -> None:
        message_id = ctx.message_id or "?"
        runs[message_id] = runs.get(message_id, 0) + 1
        if message_id == "alone" and runs[message_id] == 1:
            alone.set()
            await asyncio.sleep(60)  # its worker's connection dies meanwhile

    cleanup.extend(s.name for s in app.topology())
    waiting = [f"waiting-{n}" for n in range(4)]
    async with running(app, concurrency=4) as worker:
        # A delivery that came back once already: the quarantine runs it alone.
        channel = await amqp.channel()
        await channel.default_exchange.publish(
            aio_pika.Message(b"{}", message_id="alone", headers={h.CRASHES: 1}),
            routing_key=f"{queue_name}.quarantine",
        )
        await asyncio.wait_for(alone.wait(), 20)
        for message_id in waiting:
            await app.publish(queue_name, {"k": "v"}, message_id=message_id)

        async def all_delivered() -> bool:  # to the worker, which holds them unstarted
            declared = await channel.declare_queue(queue_name, passive=True)
            return declared.declaration_result.message_count == 0

        for _ in range(100):
            if await all_delivered():
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.2)
        assert all(m not in runs for m in waiting), runs  # they wait for the quarantined run
        assert await asyncio.to_thread(_close_connections_of, app.name) >= 1
        await eventually(lambda: worker.connections >= 2, 20)
        await eventually(lambda: all(m in runs for m in waiting) and runs["alone"] >= 2, 30)
        await asyncio.sleep(0.5)  # a second run on the dead channel would come at once
        await channel.close()
    assert {m: runs[m] for m in waiting} == dict.fromkeys(waiting, 1)


async def test_no_immediate_retry_runs_once_the_channel_closed(
    broker_url: str, queue_name: str, cleanup: list[str]
) -> None:
    """An immediate (in-process) retry is not run once the delivery's channel closed: the
    broker has the message back, and the retry would duplicate the run its redelivery gets.
    The failure's copy is not published either (``message.settle_lost``); the redelivered
    message runs again from the same attempt and succeeds."""
    app = App(broker_url, name=f"immediate-{queue_name}")
    attempts: list[int] = []
    workers: list[Any] = []  # the running worker, for its connection count

    @app.handler(
        queue_name, retry=RetryPolicy(max_attempts=5, immediate=2), transient=(ConnectionError,)
    )
    async def handle(payload: dict[str, str], ctx: Context) -> None:
        attempts.append(ctx.attempt)
        if len(attempts) == 1:
            await _reconnected_after_close(app, workers[0])
            raise ConnectionError("downstream refused (the worker's connection died meanwhile)")

    cleanup.extend(s.name for s in app.topology())
    await _handle_one(app, queue_name, workers, lambda: len(attempts) >= 2)
    assert attempts == [1, 1]


async def test_no_fallback_runs_once_the_channel_closed(
    broker_url: str, queue_name: str, cleanup: list[str]
) -> None:
    """The fallback of a delivery whose channel closed while its handler ran is not run: the
    broker has the message back, and its redelivery runs the handler, then the fallback,
    once more. The fallback runs once in all."""
    app = App(broker_url, name=f"fallback-{queue_name}")
    runs: list[str] = []
    workers: list[Any] = []

    async def fallback(payload: dict[str, str], ctx: Context) -> None:
        runs.append("fallback")

    @app.handler(queue_name, retry=RetryPolicy(max_attempts=1), fallback=fallback)
    async def handle(payload: dict[str, str], ctx: Context) -> None:
        runs.append("handler")
        if len(runs) == 1:
            await _reconnected_after_close(app, workers[0])
        raise ConnectionError("downstream refused")

    cleanup.extend(s.name for s in app.topology())
    await _handle_one(app, queue_name, workers, lambda: "fallback" in runs)
    assert runs == ["handler", "handler", "fallback"]
