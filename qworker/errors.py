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


class Transient(QworkerError):
    """The failure may go away: retry the message after a delay."""


class Permanent(QworkerError):
    """Retrying cannot help: dead-letter the message now."""


class Retry(Transient):
    """Retry after at least ``delay`` seconds (e.g. to honour an HTTP Retry-After)."""

    def __init__(self, delay: float, message: str = "") -> None:
        if not delay >= 0:  # also rejects NaN
            raise ConfigurationError(f"Retry delay must be >= 0 seconds, got {delay!r}")
        super().__init__(message or f"retry requested after {delay:g}s")
        self.delay = float(delay)


class DecodeError(QworkerError):
    """The message body cannot be turned into the handler's payload type."""


class HandlerTimeout(TimeoutError, QworkerError):
    """The handler ran longer than its ``timeout``."""


class PublishFailed(QworkerError):
    """The broker did not confirm a publish (nack, unroutable, timeout or lost channel)."""


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


class ManagementError(QworkerError):
    """The management API could not be asked, or answered something unexpected."""
