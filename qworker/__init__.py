"""qworker: RabbitMQ consumers that fail well.

Handlers are decorated async functions; every exception they raise is classified
(transient or permanent), retried through broker-side delay queues, and finally
dead-lettered with its full error context. See ``qworker dlq --help`` for the tool
that inspects and replays dead letters.

The names below are imported when first used (PEP 562), so that ``import qworker``
(and the ``qworker dlq`` commands, which need none of the worker) stay cheap:
``from qworker import App`` and ``qworker.App`` work as always. Only the AMQP codec
(:mod:`qworker.wire`) and the exceptions are imported at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import qworker.wire  # noqa: F401  (first: installs the type-preserving AMQP codec into pamqp)
from qworker.errors import (
    BadRecord,
    BadTarget,
    BrokerStalled,
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

if TYPE_CHECKING:
    from qworker.alerts import Alert
    from qworker.app import App
    from qworker.breaker import CircuitBreaker
    from qworker.context import Context
    from qworker.events import CircuitState, Observer, Outcome, OutcomeKind, Severity
    from qworker.retry import RetryPolicy
    from qworker.worker import Worker

    __version__: str

__all__ = [
    "Alert",
    "App",
    "BadRecord",
    "BadTarget",
    "BrokerStalled",
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

#: Where each lazily imported public name lives.
_LAZY = {
    "Alert": "qworker.alerts",
    "App": "qworker.app",
    "CircuitBreaker": "qworker.breaker",
    "CircuitState": "qworker.events",
    "Context": "qworker.context",
    "Observer": "qworker.events",
    "Outcome": "qworker.events",
    "OutcomeKind": "qworker.events",
    "RetryPolicy": "qworker.retry",
    "Severity": "qworker.events",
    "Worker": "qworker.worker",
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qworker")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


if not TYPE_CHECKING:  # mypy sees the names above; a typo stays an error for it

    def __getattr__(name: str) -> Any:
        """Import a public name (or ``__version__``) on first use and keep it."""
        if name == "__version__":
            value: Any = _version()
        elif name in _LAZY:
            value = getattr(importlib.import_module(_LAZY[name]), name)
        else:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        globals()[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*globals(), *__all__, "__version__"})
