"""The worker: connect, declare, consume, reconnect on loss, drain on stop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiormq
import structlog
from aio_pika.abc import AbstractConnection, AbstractQueue

from qworker.app import App
from qworker.connection import CONNECT_ERRORS, connect
from qworker.consumer import Consumer, Policy
from qworker.logging import configure_logging
from qworker.publish import ConfirmedPublisher
from qworker.redact import mask_url
from qworker.topology import declare

DEFAULT_CONCURRENCY = 10
DEFAULT_GRACE = 30.0
_LOSS_ERRORS: tuple[type[BaseException], ...] = (*CONNECT_ERRORS, aiormq.exceptions.AMQPError)


@dataclass(slots=True)
class _Subscription:
    consumer: Consumer
    queue: AbstractQueue
    tag: str


class Worker:
    """Consumes the queues of an app's handlers until :meth:`stop` is called.

    ``concurrency`` handlers run at once per queue; ``prefetch`` (at least
    ``concurrency``) deliveries are held per queue. On connection or channel
    loss the worker reconnects (trying every URL, with backoff), declares again
    and resumes; handlers already running finish, and an ack that can no longer
    be sent is logged (the broker redelivers that message).
    """

    def __init__(
        self,
        app: App,
        *,
        queues: Sequence[str] | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        prefetch: int | None = None,
        grace: float = DEFAULT_GRACE,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self.app = app
        self.handlers = app.select(queues)
        self.queues = [handler.queue for handler in self.handlers]
        self.concurrency = concurrency
        self.prefetch = max(prefetch or concurrency, concurrency)
        self.grace = grace
        self.ready = asyncio.Event()
        #: Connections established so far (1 after start; more after reconnects).
        self.connections = 0
        self._stop = asyncio.Event()
        self._consumers: list[Consumer] = []
        self._log = structlog.get_logger("qworker")
        self._policy = Policy(app.classifier, app.default, app.worker_id, app.observers)
        self._connection: AbstractConnection | None = None
        self._subscriptions: list[_Subscription] = []

    def stop(self) -> None:
        """Ask the worker to stop: no new deliveries, running handlers get ``grace`` seconds."""
        self._stop.set()

    def health(self) -> dict[str, Any]:
        """Liveness and readiness facts for health endpoints.

        ``ready`` means connected with a consumer attached to every queue.
        """
        connected = self._connection is not None and not self._connection.is_closed
        attached = len(self._subscriptions) if connected else 0
        return {
            "connected": connected,
            "consumers": attached,
            "queues": list(self.queues),
            "ready": connected and self.ready.is_set() and attached == len(self.queues),
            "in_flight": self.in_flight,
            "connections": self.connections,
        }

    @property
    def in_flight(self) -> int:
        """Handlers running right now."""
        return sum(c.in_flight for c in self._consumers)

    async def run(self) -> None:
        """Run until stopped; returns after a graceful drain."""
        if not structlog.is_configured():
            configure_logging()
        self._log.info(
            "worker.starting",
            urls=[mask_url(u) for u in self.app.urls],
            queues=self.queues,
            concurrency=self.concurrency,
            prefetch=self.prefetch,
        )
        try:
            while not self._stop.is_set():
                connection = await self._connect()
                if connection is None:
                    break
                lost = asyncio.Event()
                connection.close_callbacks.add(_setter(lost))
                try:
                    subscriptions = await self._subscribe(connection, lost)
                except _LOSS_ERRORS as exc:
                    self._log.warning("worker.subscribe_failed", error=mask_url(repr(exc)))
                    await _close_quietly(connection)
                    continue
                self._connection, self._subscriptions = connection, subscriptions
                self.connections += 1
                self.ready.set()
                self._log.info("worker.consuming", queues=self.queues)
                stop_wait = asyncio.create_task(self._stop.wait())
                lost_wait = asyncio.create_task(lost.wait())
                await asyncio.wait({stop_wait, lost_wait}, return_when=asyncio.FIRST_COMPLETED)
                stop_wait.cancel()
                lost_wait.cancel()
                self.ready.clear()
                if self._stop.is_set():
                    await self._shutdown(connection, subscriptions)
                    return
                self._log.warning("worker.connection_lost", reconnecting=True)
                await _close_quietly(connection)
        finally:
            await self.app.close()

    async def _connect(self) -> AbstractConnection | None:
        """Connect with backoff, giving up only when asked to stop."""
        attempt = asyncio.create_task(
            connect(self.app.urls, ca_file=self.app.ssl_ca, name=self.app.name)
        )
        stop_wait = asyncio.create_task(self._stop.wait())
        await asyncio.wait({attempt, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        if not attempt.done():
            attempt.cancel()
            return None
        return attempt.result()

    async def _subscribe(
        self, connection: AbstractConnection, lost: asyncio.Event
    ) -> list[_Subscription]:
        await declare(connection, self.app.topology(self.queues))
        self.app.attach(connection)
        self._consumers = [c for c in self._consumers if c.in_flight]
        subscriptions = []
        for handler in self.handlers:
            channel = await connection.channel(publisher_confirms=True)
            # Any channel error invalidates its unacked deliveries: start afresh.
            channel.close_callbacks.add(_setter(lost))
            await channel.set_qos(prefetch_count=self.prefetch)
            consumer = Consumer(
                handler,
                self._policy,
                connection,
                ConfirmedPublisher(channel, self.app.confirm_timeout),
                self.app.publish,
                self.concurrency,
            )
            queue = await channel.get_queue(handler.queue, ensure=False)
            tag = await queue.consume(consumer.on_message)
            self._consumers.append(consumer)
            subscriptions.append(_Subscription(consumer, queue, tag))
        return subscriptions

    async def _shutdown(
        self, connection: AbstractConnection, subscriptions: list[_Subscription]
    ) -> None:
        self._log.info("worker.stopping", in_flight=self.in_flight, grace=self.grace)
        for sub in subscriptions:
            sub.consumer.stop_taking()
            try:
                await sub.queue.cancel(sub.tag)
            except Exception as exc:  # the channel may already be gone
                self._log.warning("worker.cancel_failed", queue=sub.queue.name, error=repr(exc))
        for consumer in self._consumers:
            consumer.stop_taking()
        counts = await asyncio.gather(*(c.drain(self.grace) for c in self._consumers))
        await _close_quietly(connection)
        self._log.info("worker.stopped", cancelled=sum(counts))


def _setter(event: asyncio.Event) -> Callable[..., None]:
    """A close callback that sets ``event``."""
    return lambda *_: event.set()


async def _close_quietly(connection: AbstractConnection) -> None:
    if not connection.is_closed:
        # Closing a broken connection may fail; it is gone either way.
        with contextlib.suppress(Exception):
            await connection.close()
