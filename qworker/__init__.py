"""qworker: RabbitMQ consumers that fail well.

Handlers are decorated async functions; every exception they raise is classified
(transient or permanent), retried through broker-side delay queues, and finally
dead-lettered with its full error context. See ``qworker dlq --help`` for the tool
that inspects and replays dead letters.
"""

import qworker.wire  # noqa: F401  (first: installs the type-preserving AMQP codec into pamqp)
from qworker.alerts import Alert
from qworker.app import App
from qworker.breaker import CircuitBreaker
from qworker.context import Context
from qworker.errors import Permanent, Retry, Transient
from qworker.events import Outcome, Severity
from qworker.retry import RetryPolicy
from qworker.worker import Worker

__all__ = [
    "Alert",
    "App",
    "CircuitBreaker",
    "Context",
    "Outcome",
    "Permanent",
    "Retry",
    "RetryPolicy",
    "Severity",
    "Transient",
    "Worker",
]
__version__ = "0.1.0"
