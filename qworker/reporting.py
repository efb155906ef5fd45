"""Telling observers (metrics, hooks, alerts) what happened to a handler's deliveries.

One :class:`Reporter` per consumer. Observers are called synchronously on the event loop;
one that raises is logged and never changes a message's outcome (see :mod:`qworker.events`).
"""

from __future__ import annotations

from collections.abc import Sequence

import structlog

from qworker import headers as h
from qworker.delivery import Delivery
from qworker.events import CircuitState, Observer, Outcome, OutcomeKind, severity_of
from qworker.handler import Handler
from qworker.verdict import Move, Run, tier_label


class Reporter:
    """Reports one handler's outcomes, in-flight count and circuit changes.

    Args:
        handler: The handler reported on (its queue, name and severity overrides).
        observers: Who hears about it; with none, every report costs one truth test.
        log: The consumer's logger (observer failures are logged there).
    """

    def __init__(
        self,
        handler: Handler,
        observers: Sequence[Observer],
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self._handler = handler
        self._observers = tuple(observers)
        self._log = log
        self.active = bool(self._observers)

    def succeeded(self, message: Delivery, run: Run) -> None:
        """The delivery was handled (or served by the fallback)."""
        if self.active:
            handler = self._handler
            self._emit(
                Outcome(
                    OutcomeKind.SUCCEEDED,
                    handler.queue,
                    handler.name,
                    message.message_id,
                    run.attempt,
                    run.duration,
                )
            )

    def moved(self, message: Delivery, run: Run, move: Move) -> None:
        """A retry was scheduled or a dead letter written (the copy is confirmed)."""
        if not self.active:
            return
        handler = self._handler
        reason = move.decision.reason.value if move.decision.reason else None
        self._emit(
            Outcome(
                move.kind,
                handler.queue,
                handler.name,
                message.message_id,
                run.attempt,
                run.duration,
                severity=severity_of(move.kind, reason, handler.options.severity),
                error_type=move.error.error_type,
                error_message=move.error.message,
                classification=move.decision.classification.value,
                reason=reason,
                tier=tier_label(move),
                fingerprint=move.error.fingerprint or None,
                error_code=move.error.code,
                runbook=h.read_str(move.headers, h.RUNBOOK, 1024),
            )
        )

    def in_flight(self, count: int) -> None:
        """The number of running handlers changed."""
        for observer in self._observers:
            try:
                observer.in_flight(self._handler.queue, count)
            except Exception:
                self._log.exception("observer.failed", observer=type(observer).__name__)

    def circuit(self, state: CircuitState) -> None:
        """The handler's circuit breaker changed state (also logged: ``circuit.<state>``)."""
        self._log.warning(f"circuit.{state.value}", state=state.value)
        for observer in self._observers:
            try:
                observer.circuit(self._handler.queue, self._handler.name, state)
            except Exception:
                self._log.exception("observer.failed", observer=type(observer).__name__)

    def _emit(self, outcome: Outcome) -> None:
        for observer in self._observers:
            try:
                observer.outcome(outcome)
            except Exception:
                self._log.exception("observer.failed", observer=type(observer).__name__)
