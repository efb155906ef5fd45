"""Outcome events: what happened to a delivery, for hooks, alerts and metrics.

The consumer reports every outcome to the app's observers. Observers are
called synchronously on the event loop, so they must be quick and must not
block; an observer that raises is logged and never changes a message's outcome.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from qworker.classify import Reason


class Severity(StrEnum):
    """How urgently a person should look at an outcome."""

    CRITICAL = "critical"
    HIGH = "high"
    MEDIUM = "medium"
    LOW = "low"


class OutcomeKind(StrEnum):
    """What happened to a delivery."""

    SUCCEEDED = "succeeded"
    RETRIED = "retried"
    DEAD_LETTERED = "dead_lettered"


class CircuitState(StrEnum):
    """A handler's circuit breaker state."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


#: The severity key of a scheduled retry (the other keys are dead-letter reasons).
RETRY = "retry"

#: Severity of each dead-letter reason (:class:`qworker.classify.Reason`), and of a retry.
DEFAULT_SEVERITY: Mapping[str, Severity] = {
    RETRY: Severity.LOW,
    Reason.DECODE_ERROR: Severity.MEDIUM,
    Reason.PERMANENT_ERROR: Severity.HIGH,
    Reason.RETRIES_EXHAUSTED: Severity.HIGH,
    Reason.TIMEOUT: Severity.HIGH,
    Reason.POISON: Severity.CRITICAL,
    Reason.DELIVERY_LIMIT: Severity.CRITICAL,
    Reason.REJECTED: Severity.HIGH,
    Reason.EXPIRED: Severity.MEDIUM,
    Reason.MAXLEN: Severity.HIGH,
}
assert set(DEFAULT_SEVERITY) == {RETRY, *Reason}, "every reason has a default severity"


def severity_of(
    kind: OutcomeKind, reason: str | None, overrides: Mapping[str, Severity] | None = None
) -> Severity | None:
    """The severity of an outcome: none for successes, else by reason (``"retry"`` for retries).

    ``overrides`` (a handler's ``severity=`` option) maps the same keys to other severities.
    """
    if kind is OutcomeKind.SUCCEEDED:
        return None
    key = RETRY if kind is OutcomeKind.RETRIED else (reason or Reason.PERMANENT_ERROR)
    if overrides and key in overrides:
        return overrides[key]
    return DEFAULT_SEVERITY.get(key, Severity.HIGH)


@dataclass(slots=True)  # not frozen: frozen dataclasses cost ~1 us more to build
class Outcome:
    """One delivery's outcome, as hooks, alert rules and metrics see it."""

    kind: OutcomeKind
    queue: str
    handler: str
    message_id: str | None
    attempt: int
    """1-based number of the last execution."""
    duration: float
    """Seconds the handler ran (its last execution); 0 when the body could not be decoded."""
    severity: Severity | None = None
    error_type: str | None = None
    error_message: str | None = None
    """Redacted and capped, like the ``x-qworker-error-message`` header."""
    classification: str | None = None
    reason: str | None = None
    """Dead letters only: why (``permanent_error``, ``retries_exhausted``, ...)."""
    tier: str | None = None
    """Retries only: the tier the message waits in, e.g. ``2s``."""
    fingerprint: str | None = None
    """The failure kind (``x-qworker-fingerprint``, see :mod:`qworker.fingerprint`)."""
    error_code: str | None = None
    """The exception's error code (``Permanent(..., code=...)``), if it has one."""
    runbook: str | None = None
    """The runbook link for this failure: the handler's ``runbook=``, else the app's
    ``runbooks[error_code]``."""


class Observer:
    """Receives outcomes and state changes; override what you need (the defaults do nothing)."""

    def outcome(self, event: Outcome) -> None:
        """A delivery ended (succeeded, retry scheduled, or dead-lettered)."""

    def in_flight(self, queue: str, count: int) -> None:
        """The number of handlers running for ``queue`` changed."""

    def circuit(self, queue: str, handler: str, state: CircuitState) -> None:
        """The circuit breaker of ``queue`` changed state."""
