"""The contract suite: every case runs on the in-memory broker and on the real RabbitMQ.

Fixtures:

- ``transport``: ``"memory"`` or ``"rabbitmq"`` (the rabbitmq case carries the ``rabbitmq``
  marker, so ``-m "not rabbitmq"`` leaves only the in-memory run).
- ``queue``: a fresh queue name ``test.<hex>``.
- ``make_app``: builds an :class:`App` on the transport's URL (any URL on memory:
  :func:`qworker.testing.memory` points the app at its broker).
- ``run``: ``async with run(app, concurrency=..., prefetch=...) as h`` runs the app's worker
  on the transport and yields a :class:`qworker.testing.Harness`. On RabbitMQ every queue the
  app declared (work, DLQ, quarantine, retry tiers, and tiers declared at need) is deleted
  after the test.
- ``crash``: ``await crash(h)`` cuts the worker's connection without a
  close handshake, as when the worker's host dies (its unacked deliveries come back,
  redelivered), and waits until the worker has connected again.

A difference between the two transports is a bug of the in-memory broker, never a skip.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pytest

from qworker import App
from qworker.testing import Harness, harness

#: Any URL does on the in-memory broker: memory() points the app at itself.
MEMORY_URL = "amqp://guest:guest@memory.invalid:5672/"

Run = Callable[..., AbstractAsyncContextManager[Harness]]


@pytest.fixture(
    params=["memory", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)],
    ids=["memory", "rabbitmq"],
)
def transport(request: pytest.FixtureRequest) -> str:
    """Which broker the case runs on."""
    return str(request.param)


@pytest.fixture
def url(transport: str, request: pytest.FixtureRequest) -> str:
    """The app's URL: the test broker's on rabbitmq, a placeholder on memory."""
    if transport == "rabbitmq":
        return str(request.getfixturevalue("broker_url"))
    return MEMORY_URL


@pytest.fixture
def queue() -> str:
    """A fresh queue name for one test."""
    return f"test.{uuid.uuid4().hex[:12]}"


@pytest.fixture
def make_app(url: str) -> Callable[..., App]:
    """``make_app(**App options)``: an app on the transport's URL, with a unique name."""

    def make(**options: Any) -> App:
        options.setdefault("name", f"contract-{uuid.uuid4().hex[:8]}")
        return App(url, **options)

    return make


@pytest.fixture
def run(transport: str) -> Run:
    """``async with run(app, **harness options) as h``: the app's worker on the transport."""
    if transport == "memory":
        from qworker.testing import memory

        return memory

    @asynccontextmanager
    async def on_rabbitmq(app: App, **options: Any) -> AsyncIterator[Harness]:
        # Every queue it declared, tiers declared at need included, is deleted at the end,
        # also when the worker fails to start.
        async with harness(app, delete_queues=True, **options) as h:
            yield h

    return on_rabbitmq


Crash = Callable[[Harness], Awaitable[None]]

#: How long ``crash`` waits for the worker to connect again.
CRASH_WAIT = 15.0


@pytest.fixture
def crash() -> Crash:
    """``await crash(h)``: the worker's TCP connection is aborted (no close handshake)."""
    return crash_worker


async def crash_worker(h: Harness) -> None:
    """Cut the worker's connection as if its host died (:meth:`Harness.lose_connection`:
    the harness relays the app's connections, the same on both transports), then wait
    until the worker consumes again."""
    assert await h.lose_connection(timeout=CRASH_WAIT) >= 1, "the worker was not connected"
