"""qworker: RabbitMQ consumers that fail well.

Handlers are decorated async functions; every exception they raise is classified
(transient or permanent), retried through broker-side delay queues, and finally
dead-lettered with its full error context. See ``qworker dlq --help`` for the tool
that inspects and replays dead letters.
"""

from importlib.metadata import PackageNotFoundError, version

import qworker.wire  # noqa: F401  (first: installs the type-preserving AMQP codec into pamqp)
from qworker.alerts import Alert
from qworker.app import App
from qworker.breaker import CircuitBreaker
from qworker.context import Context
from qworker.errors import (
    BadRecord,
    BadTarget,
    BrokerUnavailable,
    BrowseRefused,
    ConfigurationError,
    DecodeError,
    FilterError,
    HandlerTimeout,
    ManagementError,
    Permanent,
    PoisonMessage,
    PublishFailed,
    QueueNotFound,
    QworkerError,
    Retry,
    Transient,
)
from qworker.events import CircuitState, Observer, Outcome, OutcomeKind, Severity
from qworker.retry import RetryPolicy
from qworker.worker import Worker

__all__ = [
    "Alert",
    "App",
    "BadRecord",
    "BadTarget",
    "BrokerUnavailable",
    "BrowseRefused",
    "CircuitBreaker",
    "CircuitState",
    "ConfigurationError",
    "Context",
    "DecodeError",
    "FilterError",
    "HandlerTimeout",
    "ManagementError",
    "Observer",
    "Outcome",
    "OutcomeKind",
    "Permanent",
    "PoisonMessage",
    "PublishFailed",
    "QueueNotFound",
    "QworkerError",
    "Retry",
    "RetryPolicy",
    "Severity",
    "Transient",
    "Worker",
]

try:
    __version__ = version("qworker")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
