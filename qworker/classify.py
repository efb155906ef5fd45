"""Classification: the one pure function that decides what a failure means.

:func:`classify` says whether an exception is transient or permanent, in the
order the contract fixes; :func:`decide` turns that into an action (retry or
dead-letter) and, for dead letters, a reason.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, StrEnum

import pydantic

from qworker.errors import DecodeError, HandlerTimeout, Permanent, Retry, Transient


class Classification(StrEnum):
    """What kind of failure an exception is."""

    TRANSIENT = "transient"
    """It may succeed later: retry with a delay."""
    PERMANENT = "permanent"
    """Retrying cannot help: dead-letter now."""


class Reason(StrEnum):
    """Why a message is in a dead-letter queue (header ``x-qworker-reason``)."""

    PERMANENT_ERROR = "permanent_error"
    RETRIES_EXHAUSTED = "retries_exhausted"
    DECODE_ERROR = "decode_error"
    TIMEOUT = "timeout"
    POISON = "poison"
    """Delivered ``max_deliveries`` times without an outcome: it kills or hangs workers."""
    # Read from ``x-death`` for messages the broker dead-lettered itself.
    DELIVERY_LIMIT = "delivery_limit"
    REJECTED = "rejected"
    EXPIRED = "expired"
    MAXLEN = "maxlen"


#: Reasons qworker writes to ``x-qworker-reason``.
QWORKER_REASONS: tuple[Reason, ...] = (
    Reason.PERMANENT_ERROR,
    Reason.RETRIES_EXHAUSTED,
    Reason.DECODE_ERROR,
    Reason.TIMEOUT,
    Reason.POISON,
)
#: Reasons RabbitMQ writes to ``x-death`` when it dead-letters a message itself.
BROKER_REASONS: tuple[Reason, ...] = (
    Reason.DELIVERY_LIMIT,
    Reason.REJECTED,
    Reason.EXPIRED,
    Reason.MAXLEN,
)


class Action(Enum):
    """What the consumer does with a failed delivery."""

    RETRY = "retry"
    DEAD_LETTER = "dead_letter"


Classifier = Callable[[BaseException], str | None]
"""An app-wide classifier: returns ``"transient"``, ``"permanent"`` or None (no opinion)."""

ExceptionTypes = tuple[type[BaseException], ...]

_BUILTIN_PERMANENT: ExceptionTypes = (
    DecodeError,
    pydantic.ValidationError,
    json.JSONDecodeError,
    UnicodeDecodeError,
)
_BUILTIN_TRANSIENT: ExceptionTypes = (TimeoutError, ConnectionError)


def classify(
    exc: BaseException,
    *,
    permanent: ExceptionTypes = (),
    transient: ExceptionTypes = (),
    classifier: Classifier | None = None,
    default: Classification = Classification.TRANSIENT,
) -> Classification:
    """Classify ``exc``; the first rule that applies wins.

    1. :class:`~qworker.Permanent` / :class:`~qworker.Transient` (and ``Retry``) raised.
    2. The handler's ``permanent`` types, then its ``transient`` types.
    3. The app's ``classifier``; one that raises or answers anything else counts
       as no opinion, so a buggy classifier cannot lose a message.
    4. Built-in rules: decoding and validation errors are permanent, timeouts and
       connection errors transient.
    5. ``default``.
    """
    if isinstance(exc, Permanent):
        return Classification.PERMANENT
    if isinstance(exc, Transient):
        return Classification.TRANSIENT
    if permanent and isinstance(exc, permanent):
        return Classification.PERMANENT
    if transient and isinstance(exc, transient):
        return Classification.TRANSIENT
    if classifier is not None:
        try:
            opinion = classifier(exc)
        except Exception:
            opinion = None
        if opinion in ("transient", "permanent"):
            return Classification(opinion)
    if isinstance(exc, _BUILTIN_PERMANENT):
        return Classification.PERMANENT
    if isinstance(exc, _BUILTIN_TRANSIENT):
        return Classification.TRANSIENT
    return default


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one failed delivery."""

    action: Action
    classification: Classification
    reason: Reason | None = None
    """Set for dead letters."""
    requested_delay: float | None = None
    """Set when the handler raised ``Retry(delay=...)``."""


def decide(
    exc: BaseException, classification: Classification, attempt: int, max_attempts: int
) -> Decision:
    """Decide what to do after ``attempt`` (1-based, this one included) failed with ``exc``."""
    if classification is Classification.PERMANENT:
        reason = Reason.DECODE_ERROR if isinstance(exc, DecodeError) else Reason.PERMANENT_ERROR
        return Decision(Action.DEAD_LETTER, classification, reason)
    if attempt >= max_attempts:
        reason = Reason.TIMEOUT if isinstance(exc, HandlerTimeout) else Reason.RETRIES_EXHAUSTED
        return Decision(Action.DEAD_LETTER, classification, reason)
    delay = exc.delay if isinstance(exc, Retry) else None
    return Decision(Action.RETRY, classification, requested_delay=delay)
