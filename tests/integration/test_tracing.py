"""Tracing on the real broker: one trace from publish to handler, through retries, the DLQ
and replay, read from the OpenTelemetry SDK's in-memory exporter.

The global tracer provider can be set only once per process, and a set one would make every
other test of the session trace; so each test here gives qworker its own provider, through
the one function that finds the configured provider (``qworker.tracing.configured_provider``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Sequence
from typing import Any

import aio_pika
import pytest
import structlog
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from qworker import App, Context, Permanent, RetryPolicy, Transient, dlq, tracing
from qworker import headers as h
from qworker.logging import add_trace_ids
from qworker.testing import running
from tests.support.broker import eventually, take
from tests.support.dlq import invoke

pytestmark = pytest.mark.rabbitmq

FAST = RetryPolicy(max_attempts=3, initial_delay=0.05, jitter=0)


@pytest.fixture
def exporter(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """An SDK provider exporting to memory, used by qworker as if the app had configured it."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    monkeypatch.setattr(tracing, "configured_provider", lambda: provider)
    yield memory
    provider.shutdown()


def named(spans: Sequence[ReadableSpan], prefix: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name.startswith(prefix)]


async def spans_when(exporter: InMemorySpanExporter, prefix: str, count: int) -> list[ReadableSpan]:
    """The finished spans named ``prefix ...``, once there are ``count`` of them, by start."""
    found = await eventually(
        lambda: len(named(exporter.get_finished_spans(), prefix)) >= count,
        message=lambda: f"spans: {[s.name for s in exporter.get_finished_spans()]}",
    )
    assert found
    return sorted(named(exporter.get_finished_spans(), prefix), key=lambda s: s.start_time or 0)


def ids(span: ReadableSpan) -> tuple[int, int]:
    assert span.context is not None
    return span.context.trace_id, span.context.span_id


def ref(span: ReadableSpan) -> str:
    """``span`` as ``x-qworker-previous-span`` names it."""
    assert span.context is not None
    return h.span_ref(*ids(span), span.context.trace_flags)


async def test_publish_fail_twice_succeed_is_one_trace_with_linked_attempt_spans(
    broker_url: str,
    queue_name: str,
    cleanup: list[str],
    amqp: aio_pika.abc.AbstractConnection,
    exporter: InMemorySpanExporter,
) -> None:
    """Two transient failures, then success: the producer span and three ``process`` spans
    share one trace; every attempt is a child of the producer span and links to the previous
    attempt; retries record the exception as an event and leave the status unset; the
    handler's ``ctx.publish`` is a child of its attempt; log events carry the span's ids."""
    app = App(broker_url)
    out = f"{queue_name}.out"
    seen: list[dict[str, Any]] = []
    done = asyncio.Event()

    @app.handler(queue_name, retry=FAST)
    async def handle(payload: dict[str, Any], ctx: Context) -> None:
        seen.append(dict(ctx.headers))
        if ctx.attempt < 3:
            raise Transient("database unavailable")
        await ctx.publish(out, {"from": payload["n"]})
        done.set()

    cleanup.extend([*(s.name for s in app.topology()), out])
    channel = await amqp.channel()
    await channel.declare_queue(out)
    with structlog.testing.capture_logs(processors=[add_trace_ids]) as logs:
        async with running(app):
            await app.publish(queue_name, {"n": 1}, message_id="m-1")
            await asyncio.wait_for(done.wait(), 15)
            attempts = await spans_when(exporter, "process", 3)
    finished = exporter.get_finished_spans()
    producer = [s for s in finished if s.name == f"publish {queue_name}"]
    assert len(producer) == 1 and producer[0].kind is SpanKind.PRODUCER
    trace_id, producer_span = ids(producer[0])
    assert {ids(span)[0] for span in attempts} == {trace_id}  # one trace
    for number, span in enumerate(attempts, 1):
        assert span.kind is SpanKind.CONSUMER and span.name == f"process {queue_name}"
        assert span.parent is not None and span.parent.span_id == producer_span
        attributes = dict(span.attributes or {})
        assert attributes["messaging.system"] == "rabbitmq"
        assert attributes["messaging.message.id"] == "m-1"
        assert attributes["messaging.rabbitmq.destination.routing_key"] == queue_name
        assert (attributes["qworker.queue"], attributes["qworker.attempt"]) == (queue_name, number)
        assert span.status.status_code is StatusCode.UNSET
        if number == 1:
            assert not span.links
        else:
            assert [link.context.span_id for link in span.links] == [ids(attempts[number - 2])[1]]
    outcomes = [dict(s.attributes or {})["qworker.outcome"] for s in attempts]
    assert outcomes == ["retried", "retried", "succeeded"]
    for span in attempts[:2]:
        assert [event.name for event in span.events] == ["exception"]
        assert dict(span.attributes or {})["qworker.classification"] == "transient"
    assert not attempts[2].events
    # Every attempt saw the producer's traceparent: retry copies keep it as it was.
    assert len({headers["traceparent"] for headers in seen}) == 1
    assert seen[1][h.PREVIOUS_SPAN] == ref(attempts[0])
    child = [s for s in finished if s.name == f"publish {out}"]
    assert len(child) == 1 and child[0].parent is not None
    assert child[0].parent.span_id == ids(attempts[2])[1]
    retries = [e for e in logs if e["event"] == "message.retry_scheduled"]
    assert [(e["trace_id"], e["span_id"]) for e in retries] == [
        (f"{trace_id:032x}", f"{ids(span)[1]:016x}") for span in attempts[:2]
    ]


async def test_dead_letter_trace_id_matches_its_header_and_dlq_show_prints_it(
    broker_url: str,
    queue_name: str,
    cleanup: list[str],
    amqp: aio_pika.abc.AbstractConnection,
    exporter: InMemorySpanExporter,
) -> None:
    """A permanent failure: the attempt's span has status ERROR and the exception event, the
    dead letter's ``x-qworker-trace-id`` is its trace id, and ``qworker dlq show`` (table and
    ``--json``) prints it."""
    app = App(broker_url)

    @app.handler(queue_name, retry=FAST)
    async def handle(payload: dict[str, Any]) -> None:
        raise Permanent("unknown customer")

    cleanup.extend(s.name for s in app.topology())
    async with running(app):
        await app.publish(queue_name, {"n": 1}, message_id="m-dead")
        (span,) = await spans_when(exporter, "process", 1)
    trace_id, _ = ids(span)
    assert span.status.status_code is StatusCode.ERROR
    assert dict(span.attributes or {})["qworker.outcome"] == "dead_lettered"
    assert [event.name for event in span.events] == ["exception"]
    shown = await invoke("dlq", "show", f"{queue_name}.dlq", "--json", "--url", broker_url)
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output.splitlines()[0])["trace_id"] == f"{trace_id:032x}"
    table = await invoke("dlq", "show", f"{queue_name}.dlq", "--url", broker_url)
    assert "TRACE" in table.output.splitlines()[0] and f"{trace_id:032x}" in table.output
    (dead,) = await take(amqp, f"{queue_name}.dlq", 1)
    headers = dict(dead.headers or {})
    assert headers[h.TRACE_ID] == f"{trace_id:032x}"
    assert headers[h.PREVIOUS_SPAN] == ref(span)


async def test_replay_links_back_to_the_dead_attempt_and_the_replayed_attempt_joins_it(
    broker_url: str,
    queue_name: str,
    cleanup: list[str],
    amqp: aio_pika.abc.AbstractConnection,
    exporter: InMemorySpanExporter,
) -> None:
    """A traced replay: a ``replay`` span linked to the attempt that died; the replayed copy
    carries the replay span's context, so the replayed attempt is its child and also links
    to the dead attempt: found from either trace."""
    app = App(broker_url)
    fixed = False
    done = asyncio.Event()

    @app.handler(queue_name, retry=FAST)
    async def handle(payload: dict[str, Any]) -> None:
        if not fixed:
            raise Permanent("bug")
        done.set()

    cleanup.extend(s.name for s in app.topology())
    async with running(app):
        await app.publish(queue_name, {"n": 1}, message_id="m-replay")
        (dead_attempt,) = await spans_when(exporter, "process", 1)
        fixed = True
        result = await dlq.replay(amqp, f"{queue_name}.dlq")
        assert result.replayed == 1
        await asyncio.wait_for(done.wait(), 15)
        attempts = await spans_when(exporter, "process", 2)
    (replay,) = named(exporter.get_finished_spans(), "replay")
    assert replay.name == f"replay {queue_name}.dlq" and replay.kind is SpanKind.PRODUCER
    assert [link.context.span_id for link in replay.links] == [ids(dead_attempt)[1]]
    assert [link.context.trace_id for link in replay.links] == [ids(dead_attempt)[0]]
    replayed = attempts[1]
    assert replayed.parent is not None and replayed.parent.span_id == ids(replay)[1]
    assert ids(replayed)[0] == ids(replay)[0] != ids(dead_attempt)[0]
    assert [link.context.span_id for link in replayed.links] == [ids(dead_attempt)[1]]
    assert dict(replayed.attributes or {})["qworker.outcome"] == "succeeded"


async def test_an_edit_is_a_replay_span_linked_to_the_dead_attempt(
    broker_url: str,
    queue_name: str,
    cleanup: list[str],
    amqp: aio_pika.abc.AbstractConnection,
    exporter: InMemorySpanExporter,
) -> None:
    """``dlq edit`` (``replace``) replays one message with a new body: the same ``replay``
    span, linked to the attempt that died, parent of the attempt that handles the edit."""
    app = App(broker_url)
    done = asyncio.Event()

    @app.handler(queue_name, retry=FAST)
    async def handle(payload: dict[str, Any]) -> None:
        if payload.get("fixed") is not True:
            raise Permanent("bug")
        done.set()

    cleanup.extend(s.name for s in app.topology())
    async with running(app):
        await app.publish(queue_name, {"n": 1}, message_id="m-edit")
        (dead_attempt,) = await spans_when(exporter, "process", 1)
        original = await dlq.find(amqp, f"{queue_name}.dlq", "m-edit")
        assert original is not None
        await dlq.replace(amqp, original, b'{"n": 1, "fixed": true}')
        await asyncio.wait_for(done.wait(), 15)
        attempts = await spans_when(exporter, "process", 2)
    (replay,) = named(exporter.get_finished_spans(), "replay")
    assert [link.context.span_id for link in replay.links] == [ids(dead_attempt)[1]]
    assert attempts[1].parent is not None and attempts[1].parent.span_id == ids(replay)[1]


async def test_tracing_false_produces_no_spans_and_no_trace_headers(
    broker_url: str,
    queue_name: str,
    cleanup: list[str],
    amqp: aio_pika.abc.AbstractConnection,
    exporter: InMemorySpanExporter,
) -> None:
    """``App(tracing=False)`` with a provider configured: no span, no trace header anywhere."""
    app = App(broker_url, tracing=False)
    seen: list[dict[str, Any]] = []

    @app.handler(queue_name, retry=FAST)
    async def handle(payload: dict[str, Any], ctx: Context) -> None:
        seen.append(dict(ctx.headers))
        raise Permanent("no")

    cleanup.extend(s.name for s in app.topology())
    async with running(app):
        await app.publish(queue_name, {"n": 1})
        (dead,) = await take(amqp, f"{queue_name}.dlq", 1)
    assert exporter.get_finished_spans() == ()
    assert seen == [{}]
    assert not {"traceparent", h.TRACE_ID, h.PREVIOUS_SPAN} & set(dead.headers or {})


async def test_no_configured_provider_produces_no_spans_and_adds_no_headers(
    broker_url: str, queue_name: str, cleanup: list[str], amqp: aio_pika.abc.AbstractConnection
) -> None:
    """``App(tracing=True)`` (the default) while the application configured no tracer
    provider: tracing is off, and the messages carry no trace header."""
    assert tracing.configured_provider() is None
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    app = App(broker_url)
    seen: list[dict[str, Any]] = []

    @app.handler(queue_name, retry=FAST)
    async def handle(payload: dict[str, Any], ctx: Context) -> None:
        seen.append(dict(ctx.headers))
        raise Permanent("no")

    cleanup.extend(s.name for s in app.topology())
    async with running(app) as worker:
        assert app.start_tracing() is None
        assert all(consumer._tracing is None for consumer in worker._consumers)
        await app.publish(queue_name, {"n": 1})
        (dead,) = await take(amqp, f"{queue_name}.dlq", 1)
    assert seen == [{}]
    assert not {"traceparent", h.TRACE_ID, h.PREVIOUS_SPAN} & set(dead.headers or {})
