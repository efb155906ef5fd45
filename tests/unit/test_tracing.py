"""Tracing's pure parts (qworker.tracing, the trace headers of qworker.headers, the log
processor): table-driven, with the SDK's in-memory exporter where a span is needed."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, cast

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from qworker import headers as h
from qworker import tracing
from qworker.classify import Action, Classification, Decision, Reason
from qworker.delivery import Delivery
from qworker.events import OutcomeKind
from qworker.failures import ErrorInfo
from qworker.logging import add_trace_ids, trace_ids_from
from qworker.verdict import (
    RETURNED_CIRCUIT_OPEN,
    RETURNED_ON_STOP,
    Ack,
    Move,
    Quarantine,
    Run,
    Verdict,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
ORIGIN = h.Origin(queue="q", handler="m:f", exchange="", routing_key="q", worker="w:1")


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def traced(exporter: InMemorySpanExporter) -> Iterator[tracing.Tracing]:
    """Tracing on, with a provider of the test's own (the global one is never set)."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    found = tracing.resolve(provider=provider)
    assert found is not None
    yield found
    provider.shutdown()


def delivery(headers: dict[str, Any], **kw: Any) -> Delivery:
    """What :meth:`Tracing.consuming` reads of a delivery."""
    fields = {"exchange": "", "routing_key": "q", "message_id": "m-1", "correlation_id": None}
    return cast(Delivery, SimpleNamespace(headers=headers, **{**fields, **kw}))


# Header readers: untrusted input, strict output.


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (TRACE, TRACE),
        (TRACE.encode(), TRACE),
        (TRACE.upper(), None),  # W3C ids are lowercase
        ("0" * 32, None),  # the invalid trace id
        (TRACE[:-1], None),
        (TRACE + "0", None),
        (f" {TRACE}", None),
        (12, None),
        (None, None),
        (["x"], None),
    ],
)
def test_read_trace_id_accepts_only_a_valid_w3c_trace_id(value: Any, expected: str | None) -> None:
    """``x-qworker-trace-id`` is 32 lowercase hex and not all zero, or it is not read."""
    assert h.read_trace_id({h.TRACE_ID: value} if value is not None else {}) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"00-{TRACE}-{SPAN}-01", (int(TRACE, 16), int(SPAN, 16), 1)),
        (f"00-{TRACE}-{SPAN}-00".encode(), (int(TRACE, 16), int(SPAN, 16), 0)),
        (f"ff-{TRACE}-{SPAN}-01", None),  # version ff is invalid
        (f"01-{TRACE}-{SPAN}-01", None),  # a later version: not ours
        (f"00-{'0' * 32}-{SPAN}-01", None),
        (f"00-{TRACE}-{'0' * 16}-01", None),
        (f"00-{TRACE}-{SPAN}-01-extra", None),
        (f"00-{TRACE.upper()}-{SPAN}-01", None),
        ("garbage", None),
        (7, None),
    ],
)
def test_read_span_ref_parses_only_well_formed_spans(
    value: Any, expected: tuple[int, int, int] | None
) -> None:
    """``x-qworker-previous-span`` is read as (trace, span, flags) or not at all."""
    assert h.read_span_ref({h.PREVIOUS_SPAN: value}, h.PREVIOUS_SPAN) == expected


def test_span_ref_is_read_back_as_written() -> None:
    """What the worker writes, the next attempt reads."""
    written = h.span_ref(int(TRACE, 16), int(SPAN, 16), 3)
    assert written == f"00-{TRACE}-{SPAN}-03"
    assert h.read_span_ref({h.PREVIOUS_SPAN: written}, h.PREVIOUS_SPAN) == (
        int(TRACE, 16),
        int(SPAN, 16),
        3,
    )


# What copies carry.


def test_failure_headers_write_the_trace_headers_within_the_total_limit() -> None:
    """A traced attempt's copy carries both trace headers, counted in the 64 KiB of ours,
    and keeps the producer's ``traceparent`` as it came."""
    trace_headers = {h.TRACE_ID: TRACE, h.PREVIOUS_SPAN: f"00-{TRACE}-{SPAN}-01"}
    incoming = {"traceparent": f"00-{TRACE}-{'1' * 16}-01", h.TRACE_ID: "forged"}
    huge = ErrorInfo("builtins.ValueError", "boom", "x" * (h.TOTAL_LIMIT * 2))
    out = h.failure_headers(
        incoming,
        error=huge,
        attempt=1,
        classification="transient",
        origin=ORIGIN,
        trace=trace_headers,
    )
    assert out["traceparent"] == incoming["traceparent"]
    assert (out[h.TRACE_ID], out[h.PREVIOUS_SPAN]) == (TRACE, trace_headers[h.PREVIOUS_SPAN])
    ours = {k: v for k, v in out.items() if k.startswith(h.PREFIX)}
    assert sum(len(k) + 1 + h.encoded_size(v) for k, v in ours.items()) <= h.TOTAL_LIMIT


def test_untraced_copies_drop_forged_trace_headers() -> None:
    """Without tracing, a producer's ``x-qworker-trace-id`` does not survive into a copy."""
    out = h.failure_headers(
        {h.TRACE_ID: TRACE, h.PREVIOUS_SPAN: f"00-{TRACE}-{SPAN}-01"},
        error=ErrorInfo("builtins.ValueError", "boom", ""),
        attempt=1,
        classification="permanent",
        origin=ORIGIN,
    )
    assert h.TRACE_ID not in out and h.PREVIOUS_SPAN not in out


@pytest.mark.parametrize(
    ("previous", "kept"),
    [
        (f"00-{TRACE}-{SPAN}-01", f"00-{TRACE}-{SPAN}-01"),
        (f"00-{TRACE}-{SPAN}-01".encode(), f"00-{TRACE}-{SPAN}-01"),
        ("00-forged", None),
        (None, None),
    ],
)
def test_replay_keeps_a_well_formed_previous_span_and_resets_the_trace_id(
    previous: Any, kept: str | None
) -> None:
    """The replayed attempt links to the one that died; the trace id is a failure header."""
    incoming: dict[str, Any] = {h.TRACE_ID: TRACE, "traceparent": "00-x"}
    if previous is not None:
        incoming[h.PREVIOUS_SPAN] = previous
    out = h.replay_headers(incoming)
    assert out.get(h.PREVIOUS_SPAN) == kept
    assert h.TRACE_ID not in out
    assert out["traceparent"] == "00-x"  # a user header: replay keeps it as it was


# Outcomes, names, attributes.

_ERROR = ErrorInfo("builtins.ValueError", "boom", "")
_RETRY = Decision(Action.RETRY, Classification.TRANSIENT)
_DEAD = Decision(Action.DEAD_LETTER, Classification.PERMANENT, Reason.PERMANENT_ERROR)


def _move(kind: OutcomeKind) -> Move:
    decision = _RETRY if kind is OutcomeKind.RETRIED else _DEAD
    return Move("t", {}, None, kind, None, 0.0, _ERROR, decision)


@pytest.mark.parametrize(
    ("verdict", "done", "outcome"),
    [
        (Ack("message.succeeded"), True, "succeeded"),
        (Ack("message.fallback_served"), True, "fallback_served"),
        (_move(OutcomeKind.RETRIED), True, "retried"),
        (_move(OutcomeKind.DEAD_LETTERED), True, "dead_lettered"),
        (Quarantine("q.quarantine", {}, 1), True, "quarantined"),
        (RETURNED_ON_STOP, True, "returned"),
        (RETURNED_CIRCUIT_OPEN, True, "returned"),
        (_move(OutcomeKind.DEAD_LETTERED), False, "returned"),
        (Ack("message.succeeded"), False, "returned"),
    ],
)
def test_outcome_of_names_what_happened(verdict: Verdict, done: bool, outcome: str) -> None:
    """``qworker.outcome``: the verdict carried out, else ``returned``."""
    assert tracing.outcome_of(verdict, done) == outcome


@pytest.mark.parametrize(
    ("exchange", "routing_key", "name"),
    [("", "orders", "orders"), ("shop", "order.placed.42", "shop")],
)
def test_destination_is_the_exchange_or_the_queue_of_the_default_exchange(
    exchange: str, routing_key: str, name: str
) -> None:
    """Span names stay low-cardinality: never a routing key of a named exchange."""
    assert tracing.destination(exchange, routing_key) == name


def test_message_attributes_follow_the_messaging_conventions_and_cap_ids() -> None:
    """System, operation, destination (the exchange), routing key, ids; producer-controlled
    ids are capped, and ids that are not text are left out."""
    attributes = tracing.message_attributes("process", "", "q", "m" * 1000, b"corr")
    assert attributes == {
        "messaging.system": "rabbitmq",
        "messaging.operation.name": "process",
        "messaging.operation.type": "process",
        "messaging.destination.name": "",
        "messaging.rabbitmq.destination.routing_key": "q",
        "messaging.message.id": "m" * tracing.ATTRIBUTE_LIMIT,
        "messaging.message.conversation_id": "corr",
    }
    sent = tracing.message_attributes("publish", "shop", "", 42, None)
    assert sent["messaging.operation.type"] == "send"
    assert "messaging.message.id" not in sent
    assert "messaging.rabbitmq.destination.routing_key" not in sent


# Deciding.


def test_resolve_is_off_when_disabled_without_the_api_or_without_a_provider(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Off for tracing=False, a missing API, or no configured provider; on otherwise."""
    provider = TracerProvider()
    assert tracing.resolve(False, provider) is None
    assert tracing.configured_provider() is None  # this process never sets the global one
    assert tracing.resolve() is None
    assert isinstance(tracing.resolve(provider=provider), tracing.Tracing)
    monkeypatch.setattr(tracing, "AVAILABLE", False)
    assert tracing.resolve(provider=provider) is None


def test_a_no_op_provider_turns_tracing_on_but_writes_no_trace_headers() -> None:
    """A configured no-op provider is a provider: the traced path runs, with spans that
    carry no context, so copies get no trace headers."""
    found = tracing.resolve(provider=trace.NoOpTracerProvider())
    assert found is not None
    span = found.consuming(delivery({}), "q", "m:f")
    try:
        assert span.copy_headers() == {}
    finally:
        span.end()


# Spans.


def test_consuming_is_a_child_of_the_producer_and_links_the_previous_attempt(
    traced: tracing.Tracing, exporter: InMemorySpanExporter
) -> None:
    """Parent from ``traceparent``, link from ``x-qworker-previous-span``; current until end."""
    previous = "1" * 16
    headers = {
        "traceparent": f"00-{TRACE}-{SPAN}-01",
        h.PREVIOUS_SPAN: f"00-{TRACE}-{previous}-01",
        h.ATTEMPT: 2,
    }
    span = traced.consuming(delivery(headers), "q", "m:f")
    assert trace.get_current_span() is span.span
    copy = span.copy_headers()
    span.end()
    assert trace.get_current_span() is not span.span
    (finished,) = exporter.get_finished_spans()
    assert finished.parent is not None and f"{finished.parent.span_id:016x}" == SPAN
    assert [f"{link.context.span_id:016x}" for link in finished.links] == [previous]
    assert dict(finished.attributes or {})["qworker.attempt"] == 3
    assert copy[h.TRACE_ID] == TRACE
    assert h.read_span_ref(copy, h.PREVIOUS_SPAN) is not None


@pytest.mark.parametrize(
    "headers",
    [
        {"traceparent": "garbage", "tracestate": 12},
        {"traceparent": b"\xff\xfe", h.PREVIOUS_SPAN: ["no"]},
        {"traceparent": None},
        {},
    ],
)
def test_garbage_trace_headers_start_a_new_trace(
    traced: tracing.Tracing, exporter: InMemorySpanExporter, headers: dict[str, Any]
) -> None:
    """Untrusted headers never break serving: a root span, no link."""
    traced.consuming(delivery(headers), "q", "m:f").end()
    (finished,) = exporter.get_finished_spans()
    assert finished.parent is None and not finished.links


def test_a_message_without_trace_context_keeps_its_attempts_in_one_trace(
    traced: tracing.Tracing, exporter: InMemorySpanExporter
) -> None:
    """Without a producer's ``traceparent`` the previous attempt is the parent."""
    headers = {h.PREVIOUS_SPAN: f"00-{TRACE}-{SPAN}-01"}
    traced.consuming(delivery(headers), "q", "m:f").end()
    (finished,) = exporter.get_finished_spans()
    assert finished.context is not None and f"{finished.context.trace_id:032x}" == TRACE
    assert finished.parent is not None and f"{finished.parent.span_id:016x}" == SPAN


@pytest.mark.parametrize(
    ("verdict", "decision", "status", "events"),
    [
        (_move(OutcomeKind.RETRIED), _RETRY, trace.StatusCode.UNSET, ["exception"]),
        (_move(OutcomeKind.DEAD_LETTERED), _DEAD, trace.StatusCode.ERROR, ["exception"]),
        (Ack("message.fallback_served"), _DEAD, trace.StatusCode.UNSET, ["exception"]),
    ],
)
def test_only_a_dead_letter_sets_status_error(
    traced: tracing.Tracing,
    exporter: InMemorySpanExporter,
    verdict: Verdict,
    decision: Decision,
    status: trace.StatusCode,
    events: list[str],
) -> None:
    """A retry (or a fallback that served) records the exception as an event only."""
    span = traced.consuming(delivery({}), "q", "m:f")
    span.settled(verdict, Run(1, ValueError("boom"), 0.0, decision), True)
    span.end()
    (finished,) = exporter.get_finished_spans()
    assert finished.status.status_code is status
    assert [event.name for event in finished.events] == events
    assert dict(finished.attributes or {})["qworker.classification"] == (
        decision.classification.value
    )


def _raised(exc: Exception) -> Exception:
    """``exc`` with a traceback, as a handler leaves it."""
    try:
        raise exc
    except Exception as caught:
        return caught


@pytest.mark.parametrize("moved", [True, False])
def test_the_exception_event_has_the_redacted_text_of_the_headers_never_the_raw_one(
    traced: tracing.Tracing, exporter: InMemorySpanExporter, moved: bool
) -> None:
    """A span is exported like a log line: the exception event carries the failure as the
    dead letter's headers have it (type, redacted message, redacted traceback), whether the
    verdict captured it (a move) or not (a fallback that served)."""
    exc = _raised(ConnectionError("cannot reach amqp://orders:hunter2@db.internal/x"))
    error = ErrorInfo.from_exception(exc)
    verdict: Verdict = (
        Move("t", {}, None, OutcomeKind.DEAD_LETTERED, None, 0.0, error, _DEAD)
        if moved
        else Ack("message.fallback_served")
    )
    span = traced.consuming(delivery({}), "q", "m:f")
    span.settled(verdict, Run(1, exc, 0.0, _DEAD), True)
    span.end()
    (finished,) = exporter.get_finished_spans()
    (event,) = finished.events
    attributes = dict(event.attributes or {})
    assert "hunter2" not in repr(attributes)
    assert attributes["exception.type"] == "builtins.ConnectionError"
    assert attributes["exception.message"] == error.message
    assert "hunter2" not in error.message and "db.internal" in error.message
    assert attributes["exception.stacktrace"] == error.traceback
    assert "in _raised" in error.traceback


def test_publishing_injects_the_producer_span_context(
    traced: tracing.Tracing, exporter: InMemorySpanExporter
) -> None:
    """``traceparent`` of the producer span; a failed publish is an error span."""
    headers: dict[str, Any] = {}
    with traced.publishing(headers, "q", "", "m-1", None):
        pass
    with pytest.raises(RuntimeError), traced.publishing({}, "q", "", "m-2", None):
        raise RuntimeError("no confirm from amqp://orders:hunter2@rabbit.internal/")
    ok, failed = exporter.get_finished_spans()
    assert ok.context is not None and ok.kind is trace.SpanKind.PRODUCER
    assert headers["traceparent"].split("-")[1:3] == [
        f"{ok.context.trace_id:032x}",
        f"{ok.context.span_id:016x}",
    ]
    assert failed.status.status_code is trace.StatusCode.ERROR
    # Redacted, like everything else qworker exports: status text and the exception event.
    (event,) = failed.events
    assert "hunter2" not in f"{failed.status.description} {dict(event.attributes or {})}"
    assert "rabbit.internal" in str(failed.status.description)
    assert dict(event.attributes or {})["exception.type"] == "builtins.RuntimeError"


def test_replaying_links_the_dead_attempt_and_replaces_the_traceparent(
    traced: tracing.Tracing, exporter: InMemorySpanExporter
) -> None:
    """The replay span links to ``x-qworker-previous-span`` (else the dead letter's
    ``traceparent``); the copy carries the replay span's context instead."""
    dead = {"traceparent": f"00-{TRACE}-{'2' * 16}-01", h.PREVIOUS_SPAN: f"00-{TRACE}-{SPAN}-01"}
    copy = dict(dead)
    with traced.replaying(dead, copy, "q.dlq", "q", "m-1", "r-1"):
        pass
    with traced.replaying({"traceparent": dead["traceparent"]}, {}, "q.dlq", "q", "m-2", None):
        pass
    first, second = exporter.get_finished_spans()
    assert [f"{link.context.span_id:016x}" for link in first.links] == [SPAN]
    assert [f"{link.context.span_id:016x}" for link in second.links] == ["2" * 16]
    assert first.context is not None
    assert copy["traceparent"].split("-")[2] == f"{first.context.span_id:016x}"


# Logs.


def test_add_trace_ids_adds_the_active_span_ids_and_nothing_without_one(
    traced: tracing.Tracing,
) -> None:
    """Log events join traces: ``trace_id``/``span_id`` while a span is active."""
    trace_ids_from(tracing.current_ids)
    assert add_trace_ids(None, "info", {"event": "x"}) == {"event": "x"}
    span = traced.consuming(delivery({}), "q", "m:f")
    try:
        event = dict(add_trace_ids(None, "info", {"event": "x"}))
    finally:
        span.end()
    context = span.span.get_span_context()
    assert event == {
        "event": "x",
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
    }


# Header caps: the trace headers are small and never what gives way first.


@pytest.mark.parametrize("budget", [4088, 8184])
def test_a_traced_copy_fits_the_frame_and_keeps_its_trace_headers(budget: int) -> None:
    """Fitting a traced copy to the smallest frames cuts user headers and texts first: the
    trace id, the previous span and the producer's ``traceparent`` stay."""
    from pamqp.commands import Basic

    from qworker.publish import _header_frame_size

    size = _header_frame_size(Basic.Properties(message_id="m-1"))
    trace_headers = {h.TRACE_ID: TRACE, h.PREVIOUS_SPAN: f"00-{TRACE}-{SPAN}-01"}
    copy = h.failure_headers(
        {"traceparent": f"00-{TRACE}-{SPAN}-01", "big": "x" * 50_000},
        error=ErrorInfo("builtins.ValueError", "e" * 2000, "t" * 16_000),
        attempt=1,
        classification="transient",
        origin=ORIGIN,
        trace=trace_headers,
    )
    fitted = h.fit_frame(copy, size, budget)
    assert size(fitted) <= budget
    assert "big" not in fitted and fitted["traceparent"] == f"00-{TRACE}-{SPAN}-01"
    assert {k: fitted[k] for k in trace_headers} == trace_headers


def test_an_app_that_never_imported_opentelemetry_decides_off_without_importing_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No ``opentelemetry.trace`` imported and no ``OTEL_PYTHON_TRACER_PROVIDER``: no provider
    can be configured, so a worker decides "off" without importing OpenTelemetry."""
    import sys

    from qworker import App
    from qworker.app import _provider_possible

    monkeypatch.delenv("OTEL_PYTHON_TRACER_PROVIDER", raising=False)
    monkeypatch.delitem(sys.modules, "opentelemetry.trace")
    assert not _provider_possible()
    resolved: list[bool] = []
    monkeypatch.setattr(tracing, "resolve", lambda *a: resolved.append(True))
    assert App().start_tracing() is None and not resolved
    monkeypatch.setenv("OTEL_PYTHON_TRACER_PROVIDER", "sdk_tracer_provider")
    assert _provider_possible()
