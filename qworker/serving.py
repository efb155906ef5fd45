"""Serving one delivery: decode it, pass the breaker, run the handler (and its fallback).

No acking and no publishing here: :func:`qworker.verdict.judge` says what the result means
and :meth:`qworker.consumer.Consumer.apply` carries it out. Each failed execution is
classified exactly once (:meth:`Server.decide`, the only call of the user's classifier).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from qworker import headers as h
from qworker.classify import Classification, Classifier, Decision, classify, decide
from qworker.context import PublishFunc
from qworker.delivery import Delivery, message_fields
from qworker.events import Observer
from qworker.failures import ErrorInfo, error_type_name
from qworker.gate import CircuitControl
from qworker.handler import Handler
from qworker.runner import Runner
from qworker.verdict import Fallback, Route, Run, wants_fallback

if TYPE_CHECKING:
    from qworker.tracing import Tracing


@dataclass(frozen=True, slots=True)
class Policy:
    """App-wide settings the consumer applies to every handler.

    Args:
        classifier: The app's classifier (see :func:`qworker.classify.classify`).
        default: The classification of exceptions no rule recognises.
        worker_id: ``host:pid``, written to ``x-qworker-worker``.
        observers: Receive every outcome and state change.
        runbooks: Runbook links by error code (``App(runbooks=...)``).
        confirm_timeout: Seconds after which a copy still waiting for its confirm is
            logged (``message.confirm_slow``); the wait itself goes on (see :meth:`Consumer.apply`).
        tracing: Spans for deliveries (see :mod:`qworker.tracing`); None when tracing is off.
    """

    classifier: Classifier | None
    default: Classification
    worker_id: str
    observers: Sequence[Observer] = ()
    confirm_timeout: float = 10.0
    runbooks: Mapping[str, str] = field(default_factory=dict)
    tracing: Tracing | None = None


class Server:
    """Serves the deliveries of one handler (for a :class:`~qworker.consumer.Consumer`).

    Args:
        handler: The handler and its options.
        policy: The app-wide settings.
        publish: What ``ctx.publish`` calls.
        log: The consumer's logger.
        circuit: The handler's circuit breaker control, if it has one.
    """

    def __init__(
        self,
        handler: Handler,
        policy: Policy,
        publish: PublishFunc,
        log: structlog.typing.FilteringBoundLogger,
        circuit: CircuitControl | None,
    ) -> None:
        self.handler = handler
        self._policy = policy
        self._log = log
        self._circuit = circuit
        self._runner = Runner(handler, self.decide, publish, log)

    async def serve(self, message: Delivery) -> tuple[Route, Run | None]:
        """Decode, pass the gate, run the handler (and its fallback when it applies)."""
        handler = self.handler
        failed_before = h.read_attempt(message.headers)
        attempt = failed_before + 1
        try:
            payload = handler.decode(message.body, message.content_type, message.content_encoding)
        except Exception as exc:
            return Route.PRIMARY, Run(attempt, exc, 0.0, self.decide(exc, attempt))
        circuit = self._circuit
        route = circuit.route() if circuit is not None else Route.PRIMARY
        if route is Route.RETURN:
            assert circuit is not None
            await circuit.paused()
            return route, None
        if route is Route.FALLBACK:
            return route, await self._fallback(payload, message, Run(attempt, None, 0.0))
        run = await self._runner.run(payload, message, failed_before)
        if circuit is not None:
            self._count_for_breaker(circuit, run, probe=route is Route.PROBE)
        # Not once the delivery's channel closed: the broker has the message back, and its
        # redelivery will run the handler (and, if it fails again, the fallback) once more.
        if wants_fallback(run, handler) and message.channel_open:
            run = await self._fallback(payload, message, run)
        return route, run

    async def _fallback(self, payload: object, message: Delivery, run: Run) -> Run:
        """Serve with the fallback; a failure of a breaker-sent one fails like the handler."""
        fallback = self.handler.options.fallback
        assert fallback is not None
        try:
            await self._runner.call(fallback, payload, message, run.attempt)
        except Exception as exc:
            self._log.error(
                "message.fallback_failed",
                **message_fields(message),
                error=f"{error_type_name(exc)}: {ErrorInfo.from_exception(exc).message}",
            )
            if run.error is None:  # the breaker sent it here
                decision = self.decide(exc, run.attempt)
                return Run(run.attempt, exc, run.duration, decision, fallback=Fallback.FAILED)
            run.fallback = Fallback.FAILED
            return run
        run.fallback = Fallback.SERVED
        return run

    def decide(self, exc: Exception, attempt: int) -> Decision:
        """Classify a failure: the only call of the user's classifier."""
        handler = self.handler
        classification = classify(
            exc,
            permanent=handler.options.permanent,
            transient=handler.options.transient,
            classifier=self._policy.classifier,
            default=self._policy.default,
        )
        return decide(exc, classification, attempt, handler.options.retry.max_attempts)

    def origin(self, message: Delivery) -> h.Origin:
        return h.Origin(
            queue=self.handler.queue,
            handler=self.handler.name,
            exchange=message.exchange,
            routing_key=message.routing_key,
            worker=self._policy.worker_id,
        )

    # Circuit breaker

    def _count_for_breaker(self, circuit: CircuitControl, run: Run, *, probe: bool) -> None:
        if run.error is None:
            circuit.record(True, probe=probe)
        elif run.decision is not None and run.decision.classification is Classification.TRANSIENT:
            circuit.record(False, probe=probe)
        elif probe:
            circuit.probe_settled()
