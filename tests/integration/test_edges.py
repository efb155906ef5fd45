"""Edges of the worker on the real broker (issue 9): cancellation, frame size, declare=False."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aio_pika
import pytest

from qworker import App, Context, Permanent, RetryPolicy
from qworker import headers as h
from qworker.errors import ConfigurationError
from qworker.testing import running
from qworker.worker import Worker

pytestmark = pytest.mark.rabbitmq


async def _ready_count(amqp: aio_pika.abc.AbstractConnection, queue: str) -> int:
    channel = await amqp.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)
    finally:
        await channel.close()


async def _until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_a_cancelled_handler_is_never_retried_and_the_grace_bound_holds(
    broker_url: str, queue_name: str, cleanup: list[str], amqp: aio_pika.abc.AbstractConnection
) -> None:
    """With immediate retries and a 1 s grace, SIGTERM-like stop cancels the hung handler once:
    it ran once, the worker stopped within the grace (plus settling), the message is back."""
    app = App(broker_url)
    calls = 0

    @app.handler(queue_name, retry=RetryPolicy(max_attempts=5, immediate=2), timeout=60)
    async def handle(payload: dict[str, str]) -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(30)

    cleanup.extend(s.name for s in app.topology())
    worker = Worker(app, grace=1.0)
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(worker.ready.wait(), 15)
    await app.publish(queue_name, {"k": "v"}, message_id="m-hung")

    async def started() -> bool:
        return calls == 1

    await _until(started)
    stopped_at = time.monotonic()
    worker.stop()
    await asyncio.wait_for(task, 15)
    assert time.monotonic() - stopped_at < 4.0
    assert calls == 1

    async def back() -> bool:
        return await _ready_count(amqp, queue_name) == 1

    await _until(back)


async def test_a_copy_with_a_user_header_larger_than_the_frame_is_dead_lettered_with_context(
    broker_url: str, queue_name: str, cleanup: list[str], amqp: aio_pika.abc.AbstractConnection
) -> None:
    """A 130 KB user header fits the producer's 128 KiB frame but not a copy that adds qworker's
    context: the largest user header gives way, is named in x-qworker-dropped-headers, the
    others stay, and the worker keeps its one connection (no frame_too_large close)."""
    app = App(broker_url)

    @app.handler(queue_name)
    async def handle(payload: dict[str, str]) -> None:
        raise Permanent("unknown customer")

    cleanup.extend(s.name for s in app.topology())
    async with running(app) as worker:
        channel = await amqp.channel()
        big = "x" * 130_000
        await channel.default_exchange.publish(
            aio_pika.Message(
                b'{"k": "v"}',
                content_type="application/json",
                message_id="m-big",
                headers={"trace": big, "tenant": "acme"},
            ),
            routing_key=queue_name,
        )
        dlq = await channel.declare_queue(f"{queue_name}.dlq", passive=True)
        message = None
        for _ in range(200):
            message = await dlq.get(no_ack=False, fail=False)
            if message is not None:
                break
            await asyncio.sleep(0.05)
        assert message is not None, "no dead letter"
        headers = message.headers or {}
        assert headers[h.REASON] == "permanent_error"
        assert "trace" not in headers and headers["tenant"] == "acme"
        assert any(str(item).startswith("trace (") for item in headers[h.DROPPED_HEADERS])
        await message.ack()
        assert worker.connections == 1


async def test_declare_false_refuses_to_start_when_a_queue_is_missing_and_names_it(
    broker_url: str, queue_name: str, cleanup: list[str]
) -> None:
    """Without declaring, a missing queue is a one-line configuration error naming it."""
    app = App(broker_url, declare=False)

    @app.handler(queue_name)
    async def handle(payload: dict[str, str]) -> None:
        return None

    with pytest.raises(ConfigurationError, match=f"'{queue_name}.dlq'"):
        async with running(app):
            pass


async def test_declare_false_consumes_a_pre_declared_topology(
    broker_url: str, queue_name: str, cleanup: list[str]
) -> None:
    """Pre-declared by someone else (qworker topology), the worker only checks and consumes."""
    handled = asyncio.Event()
    setup = App(broker_url)
    app = App(broker_url, declare=False)

    for target in (setup, app):

        @target.handler(queue_name)
        async def handle(payload: dict[str, str]) -> None:
            handled.set()

    cleanup.extend(s.name for s in app.topology())
    await setup.declare()
    await setup.close()
    async with running(app):
        await app.publish(queue_name, {"k": "v"})
        await asyncio.wait_for(handled.wait(), 10)


async def test_a_replayed_broker_delivery_limit_dead_letter_that_fails_once_comes_back(
    broker_url: str, queue_name: str, cleanup: list[str], amqp: aio_pika.abc.AbstractConnection
) -> None:
    """Issue 11 item 1: the broker dead-letters a message (delivery_limit, x-death names the
    work queue); replayed, it fails once transiently and goes through a retry tier. Carrying the
    broker's x-death on the copy made RabbitMQ 3.x see a dead-letter cycle and keep it in the
    tier's at-least-once buffer for ever; now it comes back and is handled."""
    from qworker import dlq

    app = App(broker_url)
    attempts: list[int] = []
    handled = asyncio.Event()

    @app.handler(
        queue_name, delivery_limit=1, retry=RetryPolicy(max_attempts=3, initial_delay=0.2, jitter=0)
    )
    async def handle(payload: dict[str, str]) -> None:
        attempts.append(len(attempts) + 1)
        if len(attempts) == 1:
            raise ConnectionError("flaky downstream")
        handled.set()

    cleanup.extend(s.name for s in app.topology())
    await app.declare()
    await app.publish(queue_name, {"k": "v"}, message_id="m-limit")
    # A raw consumer returns it until the broker's delivery limit dead-letters it.
    channel = await amqp.channel()
    queue = await channel.get_queue(queue_name)
    dlq_queue = await channel.get_queue(f"{queue_name}.dlq")
    for _ in range(100):
        message = await queue.get(no_ack=False, fail=False)
        if message is not None:
            await message.reject(requeue=True)
        if await _ready_count(amqp, f"{queue_name}.dlq") == 1:
            break
        await asyncio.sleep(0.05)
    dead = await dlq_queue.get(no_ack=False, fail=True)
    assert dead.headers["x-death"][0]["reason"] == "delivery_limit"  # type: ignore[index]
    await dead.nack(requeue=True)
    await channel.close()

    result = await dlq.replay(amqp, f"{queue_name}.dlq")
    assert result.replayed == 1
    async with running(app):
        await asyncio.wait_for(handled.wait(), 15)
    assert attempts == [1, 2]


async def test_publishing_a_nan_header_fails_one_publish_and_keeps_the_connection(
    broker_url: str, queue_name: str, cleanup: list[str]
) -> None:
    """A handler that publishes a NaN header gets PublishFailed; the worker's connection (shared
    with every consumer) is not closed by the broker, which refuses non-finite floats with 541."""
    from qworker.errors import PublishFailed

    app = App(broker_url)
    outcome: list[str] = []
    done = asyncio.Event()

    @app.handler(queue_name)
    async def handle(payload: dict[str, str], ctx: Context) -> None:
        try:
            await ctx.publish(queue_name + ".out", {"k": "v"}, headers={"ratio": float("nan")})
        except PublishFailed as exc:
            outcome.append(str(exc))
        done.set()

    cleanup.extend(s.name for s in app.topology())
    async with running(app) as worker:
        await app.publish(queue_name, {"k": "v"})
        await asyncio.wait_for(done.wait(), 10)
        await asyncio.sleep(0.5)
        assert worker.connections == 1 and worker.health()["ready"]
    assert outcome and "non-finite" in outcome[0]


def test_a_worker_started_in_code_logs_with_qworkers_configuration_not_structlogs_default(
    broker_url: str, queue_name: str, cleanup: list[str]
) -> None:
    """Consumers bind their loggers when the worker is built; logging must be configured by
    then, or every success prints a debug line in structlog's default format (it cost about a
    third of the success path's CPU before this was fixed)."""
    from tests.support.cli import run_python

    names = App(broker_url)
    names.handler(queue_name)(_any_payload)
    cleanup.extend(s.name for s in names.topology())
    code = f"""
import asyncio
from qworker import App
from qworker.testing import running

app = App({broker_url!r})
done = asyncio.Event()

@app.handler({queue_name!r})
async def handle(payload: dict) -> None:
    done.set()

async def main() -> None:
    async with running(app):
        await app.publish({queue_name!r}, {{"k": "v"}}, message_id="m-quiet")
        await asyncio.wait_for(done.wait(), 10)

asyncio.run(main())
"""
    done = run_python(code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "worker.consuming" in done.stdout  # qworker's own logging ran
    assert "message.succeeded" not in done.stdout + done.stderr


async def _any_payload(payload: dict[str, str]) -> None:
    """A handler for naming the topology."""


def test_log_events_carry_service_environment_and_the_message_fields_operators_expect(
    broker_url: str, queue_name: str, cleanup: list[str]
) -> None:
    """Issue 12 point 8: every event names the service and environment; message events carry
    message_id, correlation_id (and request_id), queue, handler, attempt; a dead letter's
    event carries severity, error_code, runbook, fingerprint and the redacted stack_trace."""
    import json

    from tests.support.cli import run_python

    names = App(broker_url)
    names.handler(queue_name)(_any_payload)
    cleanup.extend(s.name for s in names.topology())
    code = f"""
import asyncio
from qworker import App, Permanent
from qworker.logging import configure_logging
from qworker.testing import running

configure_logging("json", "DEBUG")
app = App({broker_url!r}, name="billing", runbooks={{"CARD_DECLINED": "https://runbooks/card"}})
done = asyncio.Event()

@app.handler({queue_name!r})
async def handle(payload: dict) -> None:
    if payload["k"] == "bad":
        done.set()
        raise Permanent("card declined, token=s3cr3t-value", code="CARD_DECLINED")

async def main() -> None:
    async with running(app):
        q = {queue_name!r}
        await app.publish(q, {{"k": "good"}}, message_id="m-good", correlation_id="c-1")
        await app.publish(q, {{"k": "bad"}}, message_id="m-bad", correlation_id="c-2")
        await asyncio.wait_for(done.wait(), 10)
        await asyncio.sleep(0.5)

asyncio.run(main())
"""
    done = run_python(code, env={"QWORKER_ENV": "staging"})
    assert done.returncode == 0, done.stderr[-2000:]
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert events and all(
        e.get("service") == "billing" and e.get("environment") == "staging" for e in events
    ), [e for e in events if e.get("service") != "billing"][:3]
    (good,) = [e for e in events if e["event"] == "message.succeeded"]
    assert good["message_id"] == "m-good" and good["correlation_id"] == good["request_id"] == "c-1"
    assert good["queue"] == queue_name and good["handler"].endswith(":handle")
    assert good["attempt"] == 1
    (bad,) = [e for e in events if e["event"] == "message.dead_lettered"]
    assert bad["message_id"] == "m-bad" and bad["request_id"] == "c-2" and bad["attempt"] == 1
    assert bad["severity"] == "high" and bad["error_code"] == "CARD_DECLINED"
    assert bad["runbook"] == "https://runbooks/card"
    assert len(bad["fingerprint"]) == 12
    assert "Permanent: card declined" in bad["stack_trace"]
    assert "s3cr3t-value" not in done.stdout
