"""qworker: RabbitMQ consumers that fail well.

Handlers are decorated async functions; every exception they raise is classified
(transient or permanent), retried through broker-side delay queues, and finally
dead-lettered with its full error context. See ``qworker dlq --help`` for the tool
that inspects and replays dead letters.
"""

from qworker.app import App
from qworker.context import Context
from qworker.errors import Permanent, Retry, Transient
from qworker.retry import RetryPolicy
from qworker.worker import Worker

__all__ = ["App", "Context", "Permanent", "Retry", "RetryPolicy", "Transient", "Worker"]
__version__ = "0.1.0"
