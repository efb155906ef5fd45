"""Exceptions users raise from handlers, and the ones qworker raises itself.

A handler signals how a failure should be treated by raising one of
:class:`Transient`, :class:`Permanent` or :class:`Retry`; anything else is
classified by :func:`qworker.classify.classify`.
"""

from __future__ import annotations


class QworkerError(Exception):
    """Base class of every exception qworker defines."""


class ConfigurationError(QworkerError):
    """A handler, policy or app option is invalid; raised when it is declared."""


class _Coded(QworkerError):
    """A failure a handler raises on purpose, optionally with an error code.

    Args:
        message: What went wrong, for people (redacted before it leaves the process).
        code: A stable, machine-readable name of the failure (``"CUSTOMER_UNKNOWN"``):
            written to ``x-qworker-error-code``, filterable (``--error-code``), and the key
            of ``App(runbooks={code: url})``. Any exception with a string ``code``
            attribute gets the same treatment.
    """

    def __init__(self, message: str = "", *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class Transient(_Coded):
    """The failure may go away: retry the message after a delay."""


class Permanent(_Coded):
    """Retrying cannot help: dead-letter the message now."""


class Retry(Transient):
    """Retry after at least ``delay`` seconds (e.g. to honour an HTTP Retry-After).

    Args:
        delay: Seconds to wait at least (>= 0).
        message: What went wrong (default: says which delay was asked for).
        code: A stable name of the failure, as for :class:`Transient`.
    """

    def __init__(self, delay: float, message: str = "", *, code: str | None = None) -> None:
        if not delay >= 0:  # also rejects NaN
            raise ConfigurationError(f"Retry delay must be >= 0 seconds, got {delay!r}")
        super().__init__(message or f"retry requested after {delay:g}s", code=code)
        self.delay = float(delay)


class DecodeError(QworkerError):
    """The message body cannot be turned into the handler's payload type."""


class PoisonMessage(QworkerError):
    """A delivery kept coming back without an outcome: the worker running it died (crash,
    OOM kill, ``kill -9``) or was stopped before it could finish, again and again.

    Never raised into handler code: the consumer dead-letters such a delivery before
    running its handler again (reason ``poison``, severity critical).
    """


class HandlerTimeout(TimeoutError, QworkerError):
    """The handler ran longer than its ``timeout``."""


class PublishFailed(QworkerError):
    """The broker did not confirm a publish (nack, unroutable, timeout or lost channel).

    Args:
        message: What happened, in one line.
        refused: True when the broker answered ``basic.nack``: the message is certainly not
            in its queue and the channel still works (a ``reject-publish`` queue at its
            limit, a quorum queue without a leader), so publishing it again later may work.
    """

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


class BrokerUnavailable(QworkerError):
    """None of the configured broker URLs accepted a connection."""


# The DLQ tool's errors (``qworker.dlq``); the CLI turns each into one line and an exit code.


class QueueNotFound(QworkerError):
    """The queue does not exist (the broker answered 404 to a passive declare)."""


class BrowseRefused(QworkerError):
    """Reading the queue could make the broker drop (or dead-letter onwards) a dead letter:
    a delivery limit (argument or policy) is within reach of repeated browsing."""


class FilterError(QworkerError):
    """A filter value cannot be understood (a usage error)."""


class BadTarget(QworkerError):
    """``--to`` names something that is not a plain queue name, or the DLQ itself."""


class BadRecord(QworkerError):
    """A line of an export file is not a dead-letter record."""


class BrokerStalled(QworkerError):
    """RabbitMQ stopped delivering from a queue that it does not report empty."""


class ManagementError(QworkerError):
    """The management API could not be asked, or answered something unexpected."""
