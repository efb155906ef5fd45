"""The worker: connect, declare, consume, reconnect on loss, drain on stop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import aiormq
import structlog
from aio_pika.abc import AbstractConnection

from qworker.app import App
from qworker.breaker import Circuit
from qworker.connection import CONNECT_ERRORS, close_quietly, connect
from qworker.consumer import Consumer, Policy
from qworker.logging import configure_logging
from qworker.publish import ConfirmedPublisher
from qworker.redact import mask_url
from qworker.topology import declare

DEFAULT_CONCURRENCY = 10
DEFAULT_GRACE = 30.0
_LOSS_ERRORS: tuple[type[BaseException], ...] = (*CONNECT_ERRORS, aiormq.exceptions.AMQPError)


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
        # Breaker state outlives reconnects: a dependency is not fixed by a new connection.
        self._circuits = {h.queue: Circuit(h.breaker) for h in self.handlers if h.breaker}

    def stop(self) -> None:
        """Ask the worker to stop: no new deliveries, running handlers get ``grace`` seconds."""
        self._stop.set()

    def health(self) -> dict[str, Any]:
        """Liveness and readiness facts for health endpoints.

        ``ready`` means connected with a consumer attached to every queue.
        """
        connected = self._connection is not None and not self._connection.is_closed
        attached = sum(c.consuming for c in self._consumers) if connected else 0
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
                    await self._subscribe(connection, lost)
                except _LOSS_ERRORS as exc:
                    self._log.warning("worker.subscribe_failed", error=mask_url(repr(exc)))
                    await close_quietly(connection)
                    continue
                except BaseException:  # e.g. a topology conflict: fatal, but close cleanly
                    await close_quietly(connection)
                    raise
                self._connection = connection
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
                    await self._shutdown(connection)
                    return
                self._log.warning("worker.connection_lost", reconnecting=True)
                for consumer in self._consumers:
                    await consumer.stop_taking()
                await close_quietly(connection)
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

    async def _subscribe(self, connection: AbstractConnection, lost: asyncio.Event) -> None:
        await declare(connection, self.app.topology(self.queues))
        self.app.attach(connection)
        # Consumers of a lost connection stay listed while their handlers finish.
        self._consumers = [c for c in self._consumers if c.in_flight]
        for handler in self.handlers:
            channel = await connection.channel(publisher_confirms=True)
            # Any channel error invalidates its unacked deliveries: start afresh.
            channel.close_callbacks.add(_setter(lost))
            consumer = Consumer(
                handler,
                self._policy,
                connection,
                ConfirmedPublisher(channel, self.app.confirm_timeout),
                self.app.publish,
                self.concurrency,
                self._circuits.get(handler.queue),
            )
            await consumer.start(channel, self.prefetch)
            self._consumers.append(consumer)

    async def _shutdown(self, connection: AbstractConnection) -> None:
        self._log.info("worker.stopping", in_flight=self.in_flight, grace=self.grace)
        for consumer in self._consumers:
            await consumer.stop_taking()
        counts = await asyncio.gather(*(c.drain(self.grace) for c in self._consumers))
        await close_quietly(connection)
        self._log.info("worker.stopped", cancelled=sum(counts))


def _setter(event: asyncio.Event) -> Callable[..., None]:
    """A close callback that sets ``event``."""
    return lambda *_: event.set()
