"""A harness for handler tests: a worker, a producer and what happened, on any broker.

The same :class:`Harness` runs on the in-memory broker (:func:`qworker.testing.memory`)
and on a real RabbitMQ (:func:`qworker.testing.harness`); qworker's contract suite runs
every case on both. Only :meth:`Harness.run_until_idle` differs: on the in-memory broker
it moves a virtual clock through retry delays, on RabbitMQ it waits for them.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any

import aio_pika
from aio_pika.abc import AbstractConnection
from yarl import URL

from qworker.app import App
from qworker.connection import connect
from qworker.dlq.probes import queue_depth
from qworker.errors import QueueNotFound
from qworker.events import CircuitState, Observer, Outcome, OutcomeKind
from qworker.testing.relay import Relay
from qworker.testing.running import running
from qworker.topology import dlq_name, tier_queue_name
from qworker.worker import Worker

if TYPE_CHECKING:
    from qworker.dlq import DeadLetter, ReplayResult
    from qworker.dlq.filters import Filter
    from qworker.dlq.replay import ReplayOptions
    from qworker.testing.inmemory import MemoryBroker

#: How often :meth:`Harness.run_until_idle` looks at a real broker (seconds).
POLL_INTERVAL = 0.02

#: How many looks in a row must find nothing to do before a real broker counts as idle:
#: a delivery on its way to the worker is in no queue and not yet held by the worker.
QUIET_LOOKS = 3


class Recorder(Observer):
    """Every outcome and circuit change the worker reports, in order."""

    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []
        self.circuits: list[tuple[str, CircuitState]] = []

    def outcome(self, event: Outcome) -> None:
        self.outcomes.append(event)

    def circuit(self, queue: str, handler: str, state: CircuitState) -> None:
        self.circuits.append((queue, state))


class Harness:
    """A running worker for an app, a producer, and the outcomes, for a test.

    Create it with :func:`qworker.testing.memory` (no broker needed) or
    :func:`qworker.testing.harness` (the app's RabbitMQ). Every method takes the
    handler's queue name; dead letters are read from that queue's DLQ.

    Attributes:
        app: The app under test.
        worker: Its running worker.
        connection: The harness's own connection (publishing, reading dead letters).
        outcomes: Every outcome the worker reported, in order (:class:`qworker.Outcome`).
        circuits: Every circuit breaker change, in order: ``(queue, CircuitState)``.
        broker: The in-memory broker, or None on a real RabbitMQ.
    """

    def __init__(
        self,
        app: App,
        worker: Worker,
        connection: AbstractConnection,
        recorder: Recorder,
        broker: MemoryBroker | None,
        relays: Sequence[Relay] = (),
    ) -> None:
        self.app = app
        self.worker = worker
        self.connection = connection
        self.broker = broker
        self._recorder = recorder
        self._relays = list(relays)
        self._channel: aio_pika.abc.AbstractChannel | None = None

    @property
    def outcomes(self) -> list[Outcome]:
        return self._recorder.outcomes

    @property
    def circuits(self) -> list[tuple[str, CircuitState]]:
        return self._recorder.circuits

    def handled(self, queue: str) -> list[Outcome]:
        """The successful outcomes of ``queue``'s handler, in order."""
        return [o for o in self.outcomes if o.queue == queue and o.kind is OutcomeKind.SUCCEEDED]

    def retried(self, queue: str) -> list[Outcome]:
        """The retries ``queue``'s handler scheduled, in order."""
        return [o for o in self.outcomes if o.queue == queue and o.kind is OutcomeKind.RETRIED]

    # Producing

    async def publish(
        self,
        queue: str,
        payload: Any,
        *,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        correlation_id: str | None = None,
    ) -> str:
        """Publish like the app's producers do (:meth:`qworker.App.publish`, confirmed);
        returns the message id (for :meth:`assert_dead_lettered`).

        Args:
            queue: The handler's queue.
            payload: A model or dict (sent as JSON), str (UTF-8) or bytes (as they are).
            headers: Application headers.
            message_id: The message id (default: a fresh one).
            correlation_id: The correlation id.
        """
        message_id = message_id or uuid.uuid4().hex
        options: dict[str, Any] = {"message_id": message_id}
        if headers is not None:
            options["headers"] = dict(headers)
        if correlation_id is not None:
            options["correlation_id"] = correlation_id
        await self.app.publish(queue, payload, **options)
        return message_id

    async def publish_raw(self, queue: str, body: bytes, **properties: Any) -> None:
        """Publish ``body`` as a producer that is not qworker would: no headers but yours.

        It goes over the harness's own connection, which :meth:`lose_connection` leaves alone.

        Args:
            queue: The handler's queue.
            body: The message body, as it is.
            properties: :class:`aio_pika.Message` properties (``headers``, ``message_id``,
                ``content_type``, ``expiration``, ...). Confirmed like every publish.
        """
        channel = await self._publishing_channel()
        await channel.default_exchange.publish(
            aio_pika.Message(body, **properties), routing_key=queue, mandatory=True
        )

    async def _publishing_channel(self) -> aio_pika.abc.AbstractChannel:
        if self._channel is None or self._channel.is_closed:
            self._channel = await self.connection.channel(publisher_confirms=True)
        return self._channel

    # Waiting

    async def run_until_idle(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Return when nothing is left to do: the worker holds no delivery and every work,
        retry and quarantine queue of the app is empty.

        On the in-memory broker, retry delays pass on a virtual clock: a message waiting
        five minutes in a retry tier comes back at once. On RabbitMQ they take real time.

        Args:
            timeout: Real seconds to wait before raising.

        Raises:
            TimeoutError: still busy after ``timeout`` (the message says with what).
        """
        deadline = time.monotonic() + timeout
        quiet = 0
        while True:
            busy = await self._busy()
            if busy is None:
                quiet += 1
                if quiet >= QUIET_LOOKS:
                    return
            else:
                quiet = 0
            if time.monotonic() > deadline:
                raise TimeoutError(f"not idle after {timeout:g}s: {busy or 'still settling'}")
            if self.broker is not None:
                if busy is None or not await self.broker.advance_to_next_expiry(
                    self._busy_queues(), self.worker.holding
                ):
                    await self.broker.quiesce()
            else:
                await asyncio.sleep(POLL_INTERVAL)

    async def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass: virtually on the in-memory broker, really on RabbitMQ.

        Messages whose TTL ends meanwhile move on (a retry comes back to its queue); the
        worker is then given the chance to take them.
        """
        if self.broker is not None:
            await self.broker.advance(seconds)
            await self.broker.quiesce()
        else:
            await asyncio.sleep(seconds)

    def _busy_queues(self) -> list[str]:
        """The app's queues a message passes through before its outcome (not the DLQs)."""
        names = [s.name for s in self.app.topology(self.worker.queues) if s.role != "dlq"]
        # Tiers declared at need (``Retry(delay=...)``) are not in the topology.
        return names + [n for n in _tiers_used(self.outcomes) if n not in names]

    async def _busy(self) -> str | None:
        """What is still going on, or None."""
        if self.worker.holding:
            return f"the worker holds {self.worker.holding} deliveries"
        if self.broker is not None:
            return self.broker.busy(self._busy_queues())
        for name in self._busy_queues():
            depth = await self._depth(name)
            if depth:
                return f"{name} has {depth} messages"
        return None

    async def _depth(self, queue: str) -> int:
        try:
            return await queue_depth(self.connection, queue)
        except QueueNotFound:
            return 0  # a tier not declared yet holds nothing

    # Faults

    async def lose_connection(self, *, wait: bool = True, timeout: float = 10.0) -> int:  # noqa: ASYNC109
        """Cut the app's connections to the broker (its worker's and its publisher's) as
        a network failure would: no close handshake; the broker gives every unsettled
        delivery back, redelivered. Handlers still running finish, and their acks fail.

        Args:
            wait: Return only once the worker is connected and consuming again.
            timeout: Real seconds to wait for that (its reconnect back-off included).

        Returns:
            How many connections were cut.

        Raises:
            RuntimeError: the app's URLs are not ``amqp://`` (a TLS line is not relayed).
            TimeoutError: the worker did not come back within ``timeout``.
        """
        if not self._relays:
            raise RuntimeError("lose_connection needs amqp:// URLs (TLS is not relayed)")
        before = self.worker.connections
        cut = sum(relay.cut() for relay in self._relays)
        deadline = time.monotonic() + timeout
        while wait and not (self.worker.connections > before and self.worker.health()["ready"]):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the worker was not consuming again after {timeout:g}s")
            await asyncio.sleep(POLL_INTERVAL)
        return cut

    # Dead letters

    async def dead_letters(self, queue: str, chosen: Filter | None = None) -> list[DeadLetter]:
        """The dead letters of ``queue``'s handler, oldest first (the DLQ is left as it was).

        Args:
            queue: The handler's queue (its DLQ is read).
            chosen: Only those matching this :class:`qworker.dlq.Filter`.
        """
        from qworker import dlq

        found: list[DeadLetter] = []
        await dlq.browse(self.connection, dlq_name(queue), found.append, chosen=chosen)
        return found

    async def assert_dead_lettered(
        self, message_id: str, *, queue: str | None = None, reason: str | None = None
    ) -> DeadLetter:
        """The dead letter with ``message_id``; an ``AssertionError`` saying what is there
        when it is missing or its reason differs.

        Args:
            message_id: The message's id.
            queue: The handler's queue (default: each of the worker's queues).
            reason: The expected reason (``permanent_error``, ``retries_exhausted``, ...).
        """
        queues = [queue] if queue is not None else list(self.worker.queues)
        seen: list[str] = []
        for name in queues:
            for dl in await self.dead_letters(name):
                if dl.message_id == message_id:
                    if reason is not None and dl.reason != reason:
                        raise AssertionError(
                            f"{message_id} was dead-lettered with reason {dl.reason!r}, "
                            f"not {reason!r} ({dl.error_type}: {dl.error_message})"
                        )
                    return dl
                seen.append(f"{dl.message_id} ({dl.reason})")
        raise AssertionError(
            f"{message_id} is not among the dead letters of {', '.join(queues)}: "
            + (", ".join(seen) or "there are none")
        )

    async def replay(
        self, queue: str, chosen: Filter | None = None, options: ReplayOptions | None = None
    ) -> ReplayResult:
        """Replay ``queue``'s dead letters (:func:`qworker.dlq.replay`); does not wait for
        the worker: call :meth:`run_until_idle` next."""
        from qworker import dlq

        return await dlq.replay(
            self.connection, dlq_name(queue), chosen=chosen, options=options, actor="test"
        )


@asynccontextmanager
async def harness(
    app: App,
    *,
    queues: Sequence[str] | None = None,
    concurrency: int = 10,
    prefetch: int | None = None,
    grace: float = 5.0,
    broker: MemoryBroker | None = None,
    delete_queues: bool = False,
) -> AsyncIterator[Harness]:
    """Run ``app``'s worker on its broker (``app.urls``) for the block; yield a :class:`Harness`.

    Args:
        app: The app under test; its topology is declared as the worker does.
        queues: Only these handlers' queues (default: all).
        concurrency: Handlers running at once.
        prefetch: Deliveries held at once (default: ``concurrency``).
        grace: Seconds the worker's handlers get to finish when the block ends.
        broker: The in-memory broker ``app.urls`` points at (set by :func:`memory`).
        delete_queues: At the end, delete every queue of the app's topology for the
            worker's queues (work, retry tiers, quarantine, DLQ: dead letters too) and every
            tier a retry went to, also when the worker failed to start. For a broker of
            your own; never on one where those queues hold real messages.
    """
    recorder = Recorder()
    app.add_observer(recorder)
    async with AsyncExitStack() as stack:
        stack.callback(app.observers.remove, recorder)
        connection = await connect(app.urls, ca_file=app.ssl_ca, name=f"{app.name}-test")
        stack.push_async_callback(connection.close)
        # The app reaches the broker through relays, so that lose_connection can cut them.
        relays: list[Relay] = []
        direct = app.urls
        if all(URL(url).scheme == "amqp" for url in direct):
            for url in direct:
                parsed = URL(url)
                relay = Relay(parsed.host or "localhost", parsed.port or 5672)
                stack.push_async_callback(relay.stop)
                relays.append(relay)
            app.urls = [
                str(URL(url).with_host("127.0.0.1").with_port(await relay.start()))
                for url, relay in zip(direct, relays, strict=True)
            ]
            stack.callback(setattr, app, "urls", direct)
        stack.push_async_callback(app.close)
        if delete_queues:
            stack.push_async_callback(_delete_queues, connection, app, queues, recorder)
        worker = await stack.enter_async_context(
            running(app, queues=queues, concurrency=concurrency, prefetch=prefetch, grace=grace)
        )
        if broker is not None:
            # The in-memory broker applies an ack before it reads what follows it, so the
            # pause for RabbitMQ's late acks (rabbitmq-server#10327) is not needed there.
            worker.settle_pause = 0.0
        yield Harness(app, worker, connection, recorder, broker, relays)


async def _delete_queues(
    connection: AbstractConnection,
    app: App,
    queues: Sequence[str] | None,
    recorder: Recorder,
) -> None:
    """Delete the app's queues for ``queues`` and every tier a recorded retry went to."""
    names = [spec.name for spec in app.topology(queues)]
    names += [n for n in _tiers_used(recorder.outcomes) if n not in names]
    channel = await connection.channel()
    for name in names:
        if channel.is_closed:
            channel = await connection.channel()
        await channel.queue_delete(name)
    await channel.close()


def _tiers_used(outcomes: Sequence[Outcome]) -> list[str]:
    """The retry tier queues the recorded retries went to, in first-use order."""
    names: list[str] = []
    for outcome in outcomes:
        if outcome.kind is OutcomeKind.RETRIED and outcome.tier:
            name = tier_queue_name(outcome.queue, outcome.tier)
            if name not in names:
                names.append(name)
    return names
