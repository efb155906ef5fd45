"""An in-memory RabbitMQ for handler tests: :class:`MemoryBroker` and :func:`memory`.

The broker is an AMQP 0-9-1 server inside the test's event loop, on a loopback port
(:mod:`.server`), holding its queues in memory with RabbitMQ's rules (:mod:`.state`). The
app under test connects to it exactly as to RabbitMQ, so everything between a handler and
the broker (aio-pika, confirms, headers, frame sizes) is the production code. Its clock
runs in real time and jumps on request, so retry delays of minutes take no time.

Decision (issue 14): the seam between qworker and a broker is the AMQP protocol itself,
the narrowest interface with RabbitMQ's exact semantics; the worker has no second code
path, so its speed on RabbitMQ is untouched. docs/testing.md says what is modelled.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from types import TracebackType

from qworker.app import App
from qworker.testing.harness import Harness, harness
from qworker.testing.inmemory.server import AmqpConnection
from qworker.testing.inmemory.state import Message, State

__all__ = ["MemoryBroker", "memory"]

#: Real seconds :meth:`MemoryBroker.quiesce` lets frames travel between client and broker.
QUIESCE_SECONDS = 0.001


class MemoryBroker:
    """An in-memory RabbitMQ on a loopback port of this process.

    Use it as ``async with MemoryBroker() as broker:`` and connect to ``broker.url``
    (any user and password are accepted; one virtual host, ``/``).

    Args:
        host: The address to listen on (loopback; the broker is for tests only).
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.state = State(self._schedule)
        self.connections: set[AmqpConnection] = set()
        self._server: asyncio.Server | None = None
        self._timer: asyncio.TimerHandle | None = None

    @property
    def url(self) -> str:
        """The AMQP URL of this broker (valid once started)."""
        if self._server is None:
            raise RuntimeError("the in-memory broker is not started")
        return f"amqp://guest:guest@{self.host}:{self.port}/"

    async def start(self) -> str:
        """Listen on a free port; returns :attr:`url`."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.url

    async def stop(self) -> None:
        """Drop every connection and stop listening."""
        if self._timer is not None:
            self._timer.cancel()
        for connection in list(self.connections):
            connection.lose()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> MemoryBroker:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def _accept(self) -> AmqpConnection:
        connection = AmqpConnection(self.state, self.connections.discard)
        self.connections.add(connection)
        return connection

    def _schedule(self, delay: float | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if delay is not None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._timer = loop.call_later(delay, self.state.expire_all)

    # Looking

    def queue_names(self) -> list[str]:
        """Every queue, in declaration order."""
        return list(self.state.queues)

    def depth(self, queue: str) -> int:
        """Messages ready in ``queue`` (0 when it does not exist)."""
        found = self.state.queues.get(queue)
        return found.depth if found is not None else 0

    def messages(self, queue: str) -> list[Message]:
        """The messages ready in ``queue``, in delivery order (a look, nothing moves)."""
        found = self.state.queues.get(queue)
        if found is None:
            return []
        return [*found.returns, *found.ready] if found.kind != "stream" else list(found.log)

    def busy(self, queues: Sequence[str]) -> str | None:
        """What keeps the broker busy: a delivery not settled anywhere, or a message
        waiting in one of ``queues``; None when neither."""
        for queue in self.state.queues.values():
            if queue.kind != "stream" and queue.unacked:
                return f"{queue.name} has {queue.unacked} deliveries not settled"
        for name in queues:
            if depth := self.depth(name):
                return f"{name} has {depth} messages"
        return None

    # Time

    async def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` ahead: every TTL that ends meanwhile ends now."""
        self.state.advance(seconds)
        await self.quiesce()

    async def advance_to_next_expiry(self, queues: Sequence[str], holding: int) -> bool:
        """When nothing but a TTL stands between ``queues`` and their next delivery, jump
        the clock to that moment; False when something else is still going on."""
        if holding or any(q.unacked for q in self.state.queues.values() if q.kind != "stream"):
            return False
        for name in queues:
            queue = self.state.queues.get(name)
            head = queue.head() if queue is not None else None
            if queue is None or head is None:
                continue
            if queue.consumers or head.expires_at is None:
                return False  # deliverable now, or waiting for a poll: not for the clock
        due = self.state.next_expiry()
        if due is None:
            return False
        self.state.advance(max(0.0, due - self.state.now()))
        await self.quiesce()
        return True

    @staticmethod
    async def quiesce() -> None:
        """Let frames already written travel (client and broker share this event loop)."""
        await asyncio.sleep(QUIESCE_SECONDS)

    # Faults

    def fail_next_publish(self, queue: str, count: int = 1) -> None:
        """Nack (publisher confirm) the next ``count`` messages published to ``queue``,
        as RabbitMQ does when a queue refuses them (``x-overflow: reject-publish``)."""
        self.state.fail_publish[queue] = self.state.fail_publish.get(queue, 0) + count

    def busy_leader(self, queue: str, seconds: float) -> None:
        """For ``seconds`` (real time), ``queue`` delivers nothing and a passive declare of it
        is answered after 0.25 s with 0 messages and 0 consumers: what RabbitMQ (3.10 to
        4.3) answers when a quorum queue's leader, busy with a large queue, misses the
        250 ms of ``rabbit_quorum_queue:stat/1``. Deliveries resume afterwards."""
        self._silence(queue, seconds, answer_after=None)

    def leader_unavailable(self, queue: str, seconds: float) -> None:
        """For ``seconds`` (real time), ``queue`` delivers nothing and a passive declare of it
        is answered at once with 0 messages and 0 consumers: what RabbitMQ answers while a
        quorum queue has no leader to ask, e.g. in the moments after a node restart
        (``rabbit_quorum_queue:stat/2`` maps ``{error, _}`` and a failed call to
        ``{ok, 0, 0}``: 3.10.8, 4.1.0; from 4.3 also a leader it cannot find)."""
        self._silence(queue, seconds, answer_after=0.0)

    def _silence(self, queue: str, seconds: float, *, answer_after: float | None) -> None:
        self.state.busy_until[queue] = time.monotonic() + seconds
        if answer_after is None:
            self.state.stat_answer_after.pop(queue, None)
        else:
            self.state.stat_answer_after[queue] = answer_after
        # A little after: the loop may run a timer up to its clock resolution early.
        asyncio.get_running_loop().call_later(seconds + 0.01, self.state.expire_all)

    def drop_connection_on_next_settle(self, queue: str) -> None:
        """When the next ack, nack or reject of a delivery from ``queue`` arrives, drop the
        connection instead of applying it: the message comes back, redelivered, as after
        a network failure between the handler's end and its ack."""
        self.state.drop_on_settle.add(queue)


@asynccontextmanager
async def memory(
    app: App,
    *,
    queues: Sequence[str] | None = None,
    concurrency: int = 10,
    prefetch: int | None = None,
    grace: float = 5.0,
) -> AsyncIterator[Harness]:
    """Run ``app`` on a fresh in-memory broker for the block; yield its :class:`Harness`.

    ``app``'s URLs point at the in-memory broker inside the block and are restored after.

    Args:
        app: The app under test.
        queues: Only these handlers' queues (default: all).
        concurrency: Handlers running at once.
        prefetch: Deliveries held at once (default: ``concurrency``).
        grace: Seconds the handlers get to finish when the block ends.
    """
    await app.close()  # a connection to another broker must not be reused
    async with MemoryBroker() as broker:
        saved = app.urls
        app.urls = [broker.url]
        try:
            async with harness(
                app,
                queues=queues,
                concurrency=concurrency,
                prefetch=prefetch,
                grace=grace,
                broker=broker,
            ) as running_harness:
                yield running_harness
        finally:
            app.urls = saved
