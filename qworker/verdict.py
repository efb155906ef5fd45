"""The verdict: what the consumer does with a delivery once its handler has run. Pure.

:func:`judge` turns (delivery, run, handler options) into one of three verdicts, and
:meth:`qworker.consumer.Consumer.apply` is the only code that carries them out:

- :class:`Ack`: the delivery is done (handled, or served by the fallback);
- :class:`Return`: give the delivery back to the broker untouched (breaker open,
  worker stopping, a copy that could not be published);
- :class:`Move`: publish a copy with failure headers to a retry tier or the DLQ,
  wait for the broker's confirm, then ack the original.

The run arrives already classified (:attr:`Run.decision`): the user's classifier is
called once per failed execution, never again here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from qworker import headers as h
from qworker.classify import Action, Classification, Decision, Reason
from qworker.errors import PoisonMessage
from qworker.events import OutcomeKind
from qworker.failures import ErrorInfo, Failure
from qworker.handler import Handler
from qworker.retry import plan_retry, tier_name
from qworker.topology import dlq_name, quarantine_name, retry_queue_name

#: Dead-letter reasons for which a handler's fallback is tried first.
FALLBACK_REASONS = frozenset({Reason.RETRIES_EXHAUSTED, Reason.TIMEOUT})


class Route(Enum):
    """How the gate lets one delivery through (see :mod:`qworker.gate`)."""

    PRIMARY = "primary"
    """Run the handler."""
    PROBE = "probe"
    """Run the handler as the half-open breaker's single probe."""
    FALLBACK = "fallback"
    """Breaker open, fallback configured: serve with the fallback."""
    RETURN = "return"
    """Breaker open, no fallback: give the message back to the broker."""


class Fallback(Enum):
    """Whether the handler's fallback ran for a delivery, and how it went."""

    NOT_RUN = "not_run"
    SERVED = "served"
    FAILED = "failed"


@dataclass(slots=True)
class Run:
    """What happened when a delivery was served."""

    attempt: int
    """1-based number of the last execution."""
    error: Exception | None
    """The last execution's error; None on success."""
    duration: float
    decision: Decision | None = None
    """The classification of ``error`` (None on success)."""
    earlier: list[Failure] = field(default_factory=list)
    """In-process (immediate) failures before the last execution."""
    fallback: Fallback = Fallback.NOT_RUN


@dataclass(frozen=True, slots=True)
class Ack:
    """Ack the delivery: it is done."""

    event: str
    """The log event: ``message.succeeded`` or ``message.fallback_served``."""


@dataclass(frozen=True, slots=True)
class Return:
    """Give the delivery back to the broker as it is.

    ``counted`` returns it with ``basic.reject``, which counts as a failed delivery
    on every RabbitMQ version, so that a message whose copy can never be published
    ends in the broker's delivery limit instead of looping; an uncounted return
    (``basic.nack``: not counted on RabbitMQ 4.3+) is for returns that say nothing
    about the message (worker stopping, breaker open).
    """

    event: str
    counted: bool


@dataclass(frozen=True, slots=True)
class Move:
    """Publish a copy to ``target`` (confirmed), then ack the original."""

    target: str
    headers: dict[str, Any]
    expiration_ms: int | None
    """The copy's per-message TTL (``expiration``); None for none."""
    kind: OutcomeKind
    """``RETRIED`` or ``DEAD_LETTERED``."""
    tier_ms: int | None
    """The retry tier (None for the DLQ); a tier outside the policy is declared first."""
    wait_seconds: float
    """How long a retry waits (0 for a dead letter)."""
    error: ErrorInfo
    decision: Decision


@dataclass(frozen=True, slots=True)
class Quarantine:
    """Move the delivery to its handler's quarantine (a confirmed copy, then ack the original).

    It came back without an outcome ``crashes`` times; there it runs alone.
    """

    target: str
    headers: dict[str, Any]
    crashes: int


Verdict = Ack | Return | Move | Quarantine

RETURNED_CIRCUIT_OPEN = Return("message.returned_circuit_open", counted=False)
RETURNED_ON_STOP = Return("message.returned_on_stop", counted=False)


def admit(redelivered: bool, handler: Handler, incoming: dict[str, Any]) -> Quarantine | Run | None:
    """Whether a delivery may run, before anything runs: None to run it.

    A delivery the broker gives out again (``redelivered``) came back without an outcome:
    the worker that had it died, lost its channel, or gave it back when stopping. Such a
    delivery goes to the quarantine, where it runs alone, so that a crash points at the
    message that caused it and not at the ones that were in flight beside it. Its crashes
    are counted in ``x-qworker-crashes`` (every queue type; quorum counts would also count
    the siblings). At ``max_deliveries`` it is not run again: the returned :class:`Run`
    failed with :class:`~qworker.errors.PoisonMessage` (reason ``poison``), for
    :func:`judge` to turn into its dead letter.

    Args:
        redelivered: The broker's redelivered flag.
        handler: The handler (its ``max_deliveries`` and queue).
        incoming: The delivery's headers, as received (untrusted).
    """
    if not redelivered:
        return None
    crashes = h.read_int(incoming, h.CRASHES) + 1
    limit = handler.options.max_deliveries
    if crashes < limit:
        return Quarantine(
            quarantine_name(handler.queue), h.quarantine_headers(incoming, crashes), crashes
        )
    poison = PoisonMessage(
        f"delivered {crashes} times without an outcome (max_deliveries={limit}): the worker "
        "running it died each time (a crash, an OOM kill, kill -9), lost its connection or was "
        "stopped before it finished; not run again"
    )
    decision = Decision(Action.DEAD_LETTER, Classification.PERMANENT, Reason.POISON)
    return Run(h.read_attempt(incoming) + 1, poison, 0.0, decision)


def wants_fallback(run: Run, handler: Handler) -> bool:
    """The handler has a fallback and ``run`` ended in a dead letter it may spare."""
    decision = run.decision
    return (
        handler.options.fallback is not None
        and run.fallback is Fallback.NOT_RUN
        and decision is not None
        and decision.reason in FALLBACK_REASONS
    )


def judge(
    route: Route,
    run: Run | None,
    handler: Handler,
    delivery: h.Origin,
    incoming: dict[str, Any],
    *,
    random_fraction: float,
    at: str | None = None,
    runbooks: Mapping[str, str] | None = None,
    trace: Mapping[str, str] | None = None,
) -> Verdict:
    """The verdict for a delivery that came through ``route`` and was served as ``run``.

    Args:
        route: How the gate let the delivery through; ``RETURN`` needs no ``run``.
        run: The served delivery, classified; None only with ``Route.RETURN``.
        handler: The handler's options (queue, retry policy, fallback).
        delivery: Where the delivery came from and who handled it (for the headers).
        incoming: The delivery's headers, as received (untrusted).
        random_fraction: A number in [0, 1) for the retry jitter.
        at: The failure time (ISO 8601); now when None.
        runbooks: The app's runbook links by error code (the handler's own ``runbook``
            comes first).
        trace: The trace headers a copy carries when the delivery is traced (see
            :func:`qworker.headers.failure_headers`); None when it is not.
    """
    if route is Route.RETURN or run is None:
        return RETURNED_CIRCUIT_OPEN
    if run.fallback is Fallback.SERVED:
        return Ack("message.fallback_served")
    if run.error is None:
        return Ack("message.succeeded")
    decision = run.decision
    assert decision is not None, "a failed run is classified before it is judged"
    error = ErrorInfo.from_exception(run.error)
    if run.earlier:
        incoming = {
            **incoming,
            h.HISTORY: [
                *(f.to_header() for f in h.read_history(incoming)),
                *(f.to_header() for f in run.earlier),
            ],
        }
    reason = decision.reason.value if decision.reason else None
    runbook = runbook_of(handler, error.code, runbooks)
    headers = h.failure_headers(
        incoming,
        error=error,
        attempt=run.attempt,
        classification=decision.classification.value,
        origin=delivery,
        reason=reason,
        at=at,
        runbook=runbook,
        trace=trace,
    )
    if decision.action is Action.RETRY:
        plan = plan_retry(
            handler.options.retry,
            run.attempt,
            requested_delay=decision.requested_delay,
            random_fraction=random_fraction,
        )
        return Move(
            retry_queue_name(handler.queue, plan.tier_ms),
            headers,
            plan.expiration_ms,
            OutcomeKind.RETRIED,
            plan.tier_ms,
            plan.wait_seconds,
            error,
            decision,
        )
    return Move(
        dlq_name(handler.queue),
        headers,
        None,
        OutcomeKind.DEAD_LETTERED,
        None,
        0.0,
        error,
        decision,
    )


def runbook_of(
    handler: Handler, error_code: str | None, runbooks: Mapping[str, str] | None
) -> str | None:
    """The runbook of a failure: the handler's ``runbook=``, else the app's for its code."""
    if handler.options.runbook is not None:
        return handler.options.runbook
    if error_code is not None and runbooks:
        return runbooks.get(error_code)
    return None


def tier_label(move: Move) -> str | None:
    """The tier a retry waits in, as metrics and hooks name it (``2s``); None for the DLQ."""
    return tier_name(move.tier_ms) if move.tier_ms is not None else None
