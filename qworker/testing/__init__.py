"""Helpers for users' tests.

- :func:`running`: a worker for the duration of a block, on the app's broker.
- :func:`memory`: the app on an in-memory broker with RabbitMQ's failure semantics (no
  RabbitMQ needed; retry delays pass on a virtual clock), yielding a :class:`Harness`.
- :func:`harness`: the same :class:`Harness` on the app's real RabbitMQ.

See docs/testing.md.
"""

from __future__ import annotations

from qworker.testing.harness import Harness, harness
from qworker.testing.inmemory import MemoryBroker, memory
from qworker.testing.running import running

__all__ = ["Harness", "MemoryBroker", "harness", "memory", "running"]
