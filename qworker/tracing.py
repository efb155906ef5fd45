"""OpenTelemetry tracing: every decision qworker makes about traces, in one place.

Optional (``pip install 'qworker[otel]'``, which is ``opentelemetry-api`` only): the
application brings the SDK and an exporter and configures the tracer provider; qworker
never configures one. Tracing is on when the API imports, a provider is configured and
``App(tracing=True)`` (the default). That is decided once (:func:`resolve`: when a worker
starts, at an app's first publish, when a replay starts); the result is a
:class:`Tracing` or None, and the serving path tests that one attribute per delivery.
Off costs nothing else: no provider lookup, no header parsing, no span; and a worker whose
application never imported ``opentelemetry.trace`` decides "off" without importing
OpenTelemetry at all (:meth:`qworker.App.start_tracing`).

What is traced (span names and attributes follow OpenTelemetry's messaging conventions:
``messaging.system=rabbitmq``, ``messaging.destination.name`` is the exchange, empty for
the default one, with the routing key beside it):

- ``publish <queue or exchange>`` (PRODUCER): ``app.publish`` and ``ctx.publish``; injects
  the W3C ``traceparent``/``tracestate`` headers. Inside a handler it is a child of the
  delivery's span.
- ``process <queue>`` (CONSUMER): one per delivery, a child of the producer's context.
  Retry copies keep the producer's ``traceparent`` (it is a user header, kept as it was),
  so every attempt is a child of the same producer span, in one trace; each attempt's span
  links to the previous attempt's (``x-qworker-previous-span``). A message published
  without trace context gets its first attempt's span as parent of the later ones. Only
  a dead letter sets the status to ERROR; a scheduled retry records the exception as an
  event and leaves the status unset. Attributes: ``qworker.queue``, ``qworker.handler``,
  ``qworker.attempt``, ``qworker.outcome``, ``qworker.classification``.
- ``replay <dlq>`` (PRODUCER): one per replayed dead letter, linked to the dead attempt's
  span; the copy carries the replay span's ``traceparent``, and keeps
  ``x-qworker-previous-span``, so the replayed attempt is a child of the replay span and
  links to the attempt that died.

Copies written by a traced attempt carry ``x-qworker-trace-id`` (the DLQ tool prints it)
and ``x-qworker-previous-span``; both are named in :mod:`qworker.headers`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from contextvars import Token
from typing import Any

from qworker import headers as h
from qworker.delivery import Delivery
from qworker.events import OutcomeKind
from qworker.failures import ErrorInfo
from qworker.logging import trace_ids_from
from qworker.verdict import Ack, Move, Quarantine, Run, Verdict

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.propagators.textmap import Getter
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    AVAILABLE = True
except ImportError:  # pragma: no cover - the otel extra is not installed: tracing stays off
    AVAILABLE = False

#: The instrumentation scope of qworker's spans.
SCOPE = "qworker"
SYSTEM = "rabbitmq"
#: ``qworker.outcome`` of a delivery whose verdict could not be carried out (the copy was
#: refused, the channel closed): the broker has the message back.
RETURNED = "returned"
#: Longest attribute value taken from a message (ids are producer-controlled).
ATTRIBUTE_LIMIT = 255


def configured_provider() -> trace.TracerProvider | None:
    """The tracer provider the application configured, or None.

    ``opentelemetry.trace.get_tracer_provider()`` answers a proxy until a provider is set
    (in code, or with ``OTEL_PYTHON_TRACER_PROVIDER``); the proxy means "not configured".
    """
    provider = trace.get_tracer_provider()
    return None if isinstance(provider, trace.ProxyTracerProvider) else provider


def resolve(enabled: bool = True, provider: trace.TracerProvider | None = None) -> Tracing | None:
    """Decide whether to trace: a :class:`Tracing`, or None when tracing is off.

    Called once per worker start, app (first publish) or replay, never per message.

    Args:
        enabled: ``App(tracing=...)``; False is off whatever is configured.
        provider: A ``TracerProvider`` to use instead of the configured global one (tests).
    """
    if not enabled or not AVAILABLE:
        return None
    if provider is None:
        provider = configured_provider()
        if provider is None:
            return None
    trace_ids_from(current_ids)  # log events carry the ids of the active span from now on
    return Tracing(provider.get_tracer(SCOPE))


def current_ids() -> tuple[str, str] | None:
    """The (trace id, span id) of the active span as hex, for log events; None without one."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return trace.format_trace_id(context.trace_id), trace.format_span_id(context.span_id)


# Pure helpers: headers in, names and attributes out.


def destination(exchange: str, routing_key: str) -> str:
    """The span name's destination: the exchange, or the queue for the default exchange."""
    return exchange or routing_key


def outcome_of(verdict: Verdict, done: bool) -> str:
    """``qworker.outcome`` of a delivery: ``succeeded``, ``fallback_served``, ``retried``,
    ``dead_lettered``, ``quarantined`` or ``returned`` (also when the verdict could not be
    carried out: the broker has the message back)."""
    if not done:
        return RETURNED
    if isinstance(verdict, Ack):
        return verdict.event.removeprefix("message.")
    if isinstance(verdict, Move):
        return verdict.kind.value
    if isinstance(verdict, Quarantine):
        return "quarantined"
    return RETURNED


def text(value: Any) -> str | None:
    """A producer-controlled id as an attribute value: str, capped; None otherwise."""
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("utf-8", "replace")
    return value[:ATTRIBUTE_LIMIT] if isinstance(value, str) else None


def message_attributes(
    operation: str, exchange: str, routing_key: str, message_id: Any, correlation_id: Any
) -> dict[str, Any]:
    """The messaging attributes of a span: system, operation, destination, ids."""
    attributes: dict[str, Any] = {
        "messaging.system": SYSTEM,
        "messaging.operation.name": operation,
        "messaging.operation.type": "process" if operation == "process" else "send",
        "messaging.destination.name": exchange,
    }
    if routing_key:
        attributes["messaging.rabbitmq.destination.routing_key"] = routing_key[:ATTRIBUTE_LIMIT]
    if (mid := text(message_id)) is not None:
        attributes["messaging.message.id"] = mid
    if (cid := text(correlation_id)) is not None:
        attributes["messaging.message.conversation_id"] = cid
    return attributes


def exception_event(error: ErrorInfo, outcome: str | None = None) -> dict[str, str]:
    """The ``exception`` event's attributes for a failure, as the headers have it (redacted,
    capped): never ``str(exc)`` nor the raw traceback, which the SDK's ``record_exception``
    would write (secrets included).

    Args:
        error: The failure, captured.
        outcome: What became of the delivery (``qworker.outcome``), for a ``process`` span.
    """
    attributes = {
        "exception.type": error.error_type,
        "exception.message": error.message,
        "exception.stacktrace": error.traceback,
        "exception.escaped": "False",
    }
    if outcome is not None:
        attributes["qworker.outcome"] = outcome
    return attributes


if AVAILABLE:

    class _HeaderGetter(Getter[Mapping[str, Any]]):
        """Reads ``traceparent``/``tracestate`` from AMQP headers (str or bytes; else absent)."""

        def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
            value = text(carrier.get(key)) if key in carrier else None
            return [value] if value is not None else None

        def keys(self, carrier: Mapping[str, Any]) -> list[str]:
            return list(carrier)

    # W3C trace context only (not the global propagator): the header names are documented
    # and counted in the header caps, whatever else the application propagates.
    _W3C = TraceContextTextMapPropagator()
    _GETTER = _HeaderGetter()


class ConsumerSpan:
    """The span of one delivery, current while it is served (see :meth:`Tracing.consuming`)."""

    __slots__ = ("_token", "span")

    def __init__(self, span: trace.Span, token: Token[otel_context.Context]) -> None:
        self.span = span
        self._token = token

    def copy_headers(self) -> dict[str, str]:
        """``x-qworker-trace-id`` and ``x-qworker-previous-span`` for a copy this attempt
        writes (none when the span is not sampled into a real context, e.g. a no-op one)."""
        context = self.span.get_span_context()
        if not context.is_valid:
            return {}
        return {
            h.TRACE_ID: trace.format_trace_id(context.trace_id),
            h.PREVIOUS_SPAN: h.span_ref(context.trace_id, context.span_id, context.trace_flags),
        }

    def settled(self, verdict: Verdict, run: Run | None, done: bool) -> None:
        """Record how the delivery ended: outcome and classification; the exception as an
        event; status ERROR only for a dead letter (a retry is not a failure yet).

        Args:
            verdict: What the consumer was to do with the delivery.
            run: How the handler ran (None when it did not run).
            done: The verdict was carried out (False: the broker has the message back).
        """
        span = self.span
        if not span.is_recording():
            return
        outcome = outcome_of(verdict, done)
        span.set_attribute("qworker.outcome", outcome)
        if run is None:
            return
        span.set_attribute("qworker.attempt", run.attempt)
        if run.decision is not None:
            span.set_attribute("qworker.classification", run.decision.classification.value)
        if run.error is None:
            return
        # A moved delivery's failure was captured by judge, and its frames are released by now
        # (qworker.failures.release_frames).
        error = verdict.error if isinstance(verdict, Move) else ErrorInfo.from_exception(run.error)
        span.add_event("exception", exception_event(error, outcome))
        if outcome == OutcomeKind.DEAD_LETTERED.value:
            span.set_attribute("error.type", error.error_type)
            reason = run.decision.reason.value if run.decision and run.decision.reason else None
            span.set_status(trace.StatusCode.ERROR, f"dead-lettered ({reason})")

    def end(self) -> None:
        """Stop being the current span, and end it."""
        otel_context.detach(self._token)
        self.span.end()


def _linked(headers: Mapping[str, Any]) -> trace.SpanContext | None:
    """The span an earlier step wrote into ``x-qworker-previous-span``, if well formed."""
    found = h.read_span_ref(headers, h.PREVIOUS_SPAN)
    if found is None:
        return None
    trace_id, span_id, flags = found
    return trace.SpanContext(
        trace_id, span_id, is_remote=True, trace_flags=trace.TraceFlags(flags & 0x01)
    )


class Tracing:
    """Tracing is on: starts qworker's spans with one tracer (see the module docstring).

    Args:
        tracer: The tracer of qworker's instrumentation scope.
    """

    __slots__ = ("tracer",)

    def __init__(self, tracer: trace.Tracer) -> None:
        self.tracer = tracer

    @contextmanager
    def publishing(
        self,
        headers: MutableMapping[str, Any],
        routing_key: str,
        exchange: str,
        message_id: str | None,
        correlation_id: str | None,
    ) -> Iterator[None]:
        """A producer span around one publish; ``headers`` get its ``traceparent``.

        An exception (``PublishFailed``) is recorded, redacted, and sets the status to ERROR.

        Args:
            headers: The message's headers, written to before the block runs.
            routing_key: The queue (default exchange) or the routing key.
            exchange: The exchange (``""``: the default exchange).
            message_id: The message id.
            correlation_id: The correlation id, if any.
        """
        attributes = message_attributes(
            "publish", exchange, routing_key, message_id, correlation_id
        )
        with self._producer(f"publish {destination(exchange, routing_key)}", attributes):
            _W3C.inject(headers)
            yield

    @contextmanager
    def _producer(
        self, name: str, attributes: dict[str, Any], links: list[trace.Link] | None = None
    ) -> Iterator[None]:
        """A PRODUCER span, current for the block. An exception that leaves the block is
        recorded redacted (:func:`exception_event`) and sets the status to ERROR with the
        redacted text; the SDK's own recording (``str(exc)``) is off."""
        with self.tracer.start_as_current_span(
            name,
            kind=trace.SpanKind.PRODUCER,
            attributes=attributes,
            links=links,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield
            except Exception as exc:
                error = ErrorInfo.from_exception(exc)
                span.add_event("exception", exception_event(error))
                span.set_status(trace.StatusCode.ERROR, f"{error.error_type}: {error.message}")
                raise

    def consuming(self, message: Delivery, queue: str, handler: str) -> ConsumerSpan:
        """Start the ``process`` span of a delivery and make it current (until ``end()``).

        Its parent is the producer's context (``traceparent``), or, for a message published
        without one, the previous attempt's span; it links to the previous attempt's span.

        Args:
            message: The delivery (its headers are untrusted: garbage is ignored).
            queue: The handler's queue.
            handler: The handler's name (``module:function``).
        """
        headers = message.headers
        parent = _W3C.extract(headers, getter=_GETTER)
        previous = _linked(headers)
        links = None
        if previous is not None:
            links = [trace.Link(previous, {"qworker.link": "previous_attempt"})]
            if not trace.get_current_span(parent).get_span_context().is_valid:
                parent = trace.set_span_in_context(trace.NonRecordingSpan(previous))
        attributes = message_attributes(
            "process",
            message.exchange,
            message.routing_key,
            message.message_id,
            message.correlation_id,
        )
        attributes["qworker.queue"] = queue
        attributes["qworker.handler"] = handler
        attributes["qworker.attempt"] = h.read_attempt(headers) + 1
        span = self.tracer.start_span(
            f"process {queue}",
            context=parent,
            kind=trace.SpanKind.CONSUMER,
            attributes=attributes,
            links=links,
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        return ConsumerSpan(span, token)

    @contextmanager
    def replaying(
        self,
        dead: Mapping[str, Any],
        headers: MutableMapping[str, Any],
        dlq: str,
        target: str,
        message_id: str | None,
        replay_id: str | None,
    ) -> Iterator[None]:
        """A ``replay`` span around the publish of one replayed copy.

        It links to the dead letter's last attempt (``x-qworker-previous-span``, else its
        ``traceparent``), and its context replaces the copy's ``traceparent``.

        Args:
            dead: The dead letter's headers (untrusted).
            headers: The copy's headers, written to before the block runs.
            dlq: The DLQ replayed from.
            target: The queue the copy goes to (default exchange).
            message_id: The message id.
            replay_id: The replay's id in the audit trail.
        """
        origin = _linked(dead)
        if origin is None:
            origin = trace.get_current_span(_W3C.extract(dead, getter=_GETTER)).get_span_context()
        links = [trace.Link(origin, {"qworker.link": "dead_letter"})] if origin.is_valid else None
        attributes = message_attributes("replay", "", target, message_id, None)
        attributes["qworker.dlq"] = dlq
        if replay_id:
            attributes["qworker.replay_id"] = replay_id
        with self._producer(f"replay {dlq}", attributes, links):
            for name in (h.TRACEPARENT, h.TRACESTATE):
                headers.pop(name, None)  # the dead letter's: the copy carries the replay's
            _W3C.inject(headers)
            yield
