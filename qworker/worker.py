"""The worker: connect, declare, consume, reconnect on loss, drain on stop."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import aiormq
import structlog
from aio_pika.abc import AbstractConnection

from qworker.alerts import DEFAULT_DLQ_POLL, watching_needed
from qworker.app import App
from qworker.backoff import Backoff
from qworker.connection import CONNECT_ERRORS, close_quietly, connect
from qworker.consumer import Consumer
from qworker.errors import ConfigurationError
from qworker.exclusion import Exclusion
from qworker.logging import configure_logging
from qworker.redact import mask_url
from qworker.serving import Policy
from qworker.supervised import child_relay, supervised_child
from qworker.topology import check, declare

if TYPE_CHECKING:
    from qworker.watch import Watcher

DEFAULT_CONCURRENCY = 10
DEFAULT_GRACE = 30.0
#: A connection lost sooner than this after it was set up counts as a failed round (back-off).
STABLE_SECONDS = 10.0
_LOSS_ERRORS: tuple[type[BaseException], ...] = (*CONNECT_ERRORS, aiormq.exceptions.AMQPError)


#: A graceful stop closes the connection no sooner than this long after the last ack (or
#: nack/reject). A quorum queue can ignore acks that reach it just before their channel
#: closes, and return those messages, so their handlers run again after a deploy
#: (rabbitmq/rabbitmq-server#10327, open). Measured under CPU load (two busy loops on the
#: 2 cores): raw aio-pika (bench/latency_quorum_settle.py) returned acked messages in 2 of
#: 20 reps closing at once, 0 of 20 pausing 0.2 s; ``qworker run`` with 100 in flight
#: (bench/latency.py --parts 3) in 2 of 30 reps (8 and 22 messages) before this pause,
#: 0 of 30 with it; SIGTERM to exit 0.56 -> 0.77 s. A timing, not a guarantee.
SETTLE_PAUSE = 0.2


class Worker:
    """Consumes the queues of an app's handlers until :meth:`stop` is called.

    ``concurrency`` handlers run at once per queue; ``prefetch`` (at least
    ``concurrency``) deliveries are held per queue. On connection or channel
    loss the worker reconnects (trying every URL, with backoff), declares again
    and resumes; handlers already running finish, and an ack that can no longer
    be sent is logged (the broker redelivers that message).

    ``dlq_poll``: seconds between two polls of the handlers' DLQs (depth and oldest
    failure, for :class:`~qworker.metrics.Metrics` and ``dlq_depth`` alerts; 0: never),
    see :mod:`qworker.watch`. A worker started by a supervisor never polls (the supervisor
    does) and forwards the outcomes its alert rules need to the supervisor.
    """

    def __init__(
        self,
        app: App,
        *,
        queues: Sequence[str] | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        prefetch: int | None = None,
        grace: float = DEFAULT_GRACE,
        dlq_poll: float = DEFAULT_DLQ_POLL,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if dlq_poll < 0:
            raise ValueError("dlq_poll must be >= 0")
        self.app = app
        self.handlers = app.select(queues)
        self.queues = [handler.queue for handler in self.handlers]
        self.concurrency = concurrency
        self.prefetch = max(prefetch or concurrency, concurrency)
        self.grace = grace
        self.ready = asyncio.Event()
        #: Seconds between the last settle and closing the connection on a graceful stop
        #: (:data:`SETTLE_PAUSE`; the in-memory test broker needs none).
        self.settle_pause = SETTLE_PAUSE
        #: Connections established so far (1 after start; more after reconnects).
        self.connections = 0
        self._stop = asyncio.Event()
        # Before any logger is bound (the consumers bind theirs now): a logger bound earlier
        # keeps structlog's default configuration, which prints every debug event.
        if not structlog.is_configured():
            configure_logging()
        self._log = structlog.get_logger("qworker")
        # Before the consumers take their copy of the observers: under a supervisor that
        # evaluates the alert rules, they are suspended here and their outcomes forwarded.
        self._relay = child_relay(app)
        # The watcher (and the DLQ library it uses) is imported only when it has work.
        self._watcher: Watcher | None = None
        if not supervised_child() and watching_needed(app.observers, interval=dlq_poll):
            from qworker.watch import Watcher

            self._watcher = Watcher(app, queues, interval=dlq_poll)
        policy = Policy(
            app.classifier,
            app.default,
            app.worker_id,
            app.observers,
            app.confirm_timeout,
            app.runbooks,
            # Decided once for the worker's life: the serving path tests one attribute.
            tracing=app.start_tracing(),
        )
        self._tracing = policy.tracing is not None
        # Two consumers per handler for the worker's lifetime (its work queue and its
        # quarantine, sharing one Exclusion); they re-attach on every connect.
        self._consumers: list[Consumer] = []
        for handler in self.handlers:
            exclusion = Exclusion()
            for quarantine in (False, True):
                self._consumers.append(
                    Consumer(
                        handler,
                        policy=policy,
                        publish=app.publish,
                        concurrency=concurrency,
                        prefetch=self.prefetch,
                        exclusion=exclusion,
                        quarantine=quarantine,
                    )
                )
        self._connection: AbstractConnection | None = None
        self._rounds = Backoff(first=0.5, ceiling=30.0, jitter=0.5)

    def stop(self) -> None:
        """Ask the worker to stop: no new deliveries, running handlers get ``grace`` seconds."""
        self._stop.set()

    def health(self) -> dict[str, Any]:
        """Liveness and readiness facts for health endpoints.

        ``ready`` means connected with every queue (and its quarantine) consumed or
        deliberately paused by an open circuit breaker; ``consumers`` counts the work
        queues consumed.
        """
        connected = self._connection is not None and not self._connection.is_closed
        work = [c for c in self._consumers if not c.quarantine]
        attached = sum(c.consuming for c in work) if connected else 0
        serving = sum(c.ready for c in self._consumers) if connected else 0
        return {
            "connected": connected,
            "consumers": attached,
            "queues": list(self.queues),
            "ready": connected and self.ready.is_set() and serving == len(self._consumers),
            "in_flight": self.in_flight,
            "connections": self.connections,
        }

    @property
    def in_flight(self) -> int:
        """Handlers running right now."""
        return sum(c.in_flight for c in self._consumers)

    @property
    def holding(self) -> int:
        """Deliveries received and not yet settled: running, or waiting for a slot."""
        return sum(c.holding for c in self._consumers)

    async def run(self) -> None:
        """Run until stopped; returns after a graceful drain.

        Each round connects, declares (or checks) the topology and attaches every
        consumer. A round that fails, or a connection lost within ``STABLE_SECONDS``,
        is followed by a back-off pause (0.5 s doubling to 30 s, jittered), so that a
        broker that accepts connections and then drops them is not stormed.
        """
        # Every event logged from this task and the tasks it starts (connections, consumers,
        # handlers) names the service and its environment (structlog merges context vars).
        structlog.contextvars.bind_contextvars(
            service=self.app.name, environment=self.app.environment
        )
        self._log.info(
            "worker.starting",
            urls=[mask_url(u) for u in self.app.urls],
            queues=self.queues,
            concurrency=self.concurrency,
            prefetch=self.prefetch,
        )
        async with _watching(self._watcher):
            await self._run()

    async def _run(self) -> None:
        try:
            while not self._stop.is_set():
                connection = await self._connect()
                if connection is None:
                    break
                lost = asyncio.Event()
                lost_reason: list[BaseException] = []
                connection.close_callbacks.add(_setter(lost, lost_reason))
                started = time.monotonic()
                try:
                    await self._subscribe(connection)
                except _LOSS_ERRORS as exc:
                    self._log.warning("worker.subscribe_failed", error=mask_url(repr(exc)))
                    await self._abandon(connection)
                    await self._pause(self._rounds.failed(time.monotonic()))
                    continue
                except BaseException:  # e.g. a topology conflict: fatal, but close cleanly
                    await self._abandon(connection)
                    raise
                self._connection = connection
                self.connections += 1
                self.ready.set()
                self._log.info("worker.consuming", queues=self.queues, tracing=self._tracing)
                await _first_of(self._stop.wait(), lost.wait())
                self.ready.clear()
                if self._stop.is_set():
                    await self._shutdown(connection)
                    return
                self._log.warning(
                    "worker.connection_lost",
                    reconnecting=True,
                    reason=mask_url(str(lost_reason[0])) if lost_reason else None,
                    connected_for=round(time.monotonic() - started, 3),
                )
                await self._abandon(connection)
                if time.monotonic() - started < STABLE_SECONDS:
                    await self._pause(self._rounds.failed(time.monotonic()))
                else:
                    self._rounds.succeeded()
        finally:
            if self._watcher is not None:
                await asyncio.gather(*(rule.wait(self.grace) for rule in self._watcher.rules))
            await self.app.close()

    async def _connect(self) -> AbstractConnection | None:
        """Connect with backoff, giving up only when asked to stop."""
        attempt = asyncio.create_task(
            connect(self.app.urls, ca_file=self.app.ssl_ca, name=self.app.name)
        )
        await _first_of(attempt, self._stop.wait())
        if not attempt.done():
            attempt.cancel()
            return None
        return attempt.result()

    async def _pause(self, seconds: float) -> None:
        """Wait ``seconds`` before the next round, unless asked to stop meanwhile."""
        self._log.info("worker.reconnect_backoff", seconds=round(seconds, 2))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _subscribe(self, connection: AbstractConnection) -> None:
        specs = self.app.topology(self.queues)
        if self.app.declares:
            await declare(connection, specs)
        else:
            await check(connection, specs)
        self.app.attach(connection)
        for consumer in self._consumers:
            try:
                await consumer.attach(connection)
            except aiormq.exceptions.ChannelAccessRefused as exc:
                raise ConfigurationError(
                    f"not allowed to consume queue {consumer.source!r}: {exc}"
                ) from None
            except aiormq.exceptions.ChannelNotFoundEntity:
                raise ConfigurationError(
                    f"queue {consumer.source!r} does not exist; declare it "
                    "(qworker topology APP shows its arguments) or drop --no-declare"
                ) from None

    async def _abandon(self, connection: AbstractConnection) -> None:
        """Let go of a lost (or half set up) connection; running handlers finish on their own."""
        for consumer in self._consumers:
            consumer.detach()
        await close_quietly(connection)

    async def _shutdown(self, connection: AbstractConnection) -> None:
        self._log.info("worker.stopping", in_flight=self.in_flight, grace=self.grace)
        for consumer in self._consumers:
            await consumer.stop_taking()
        counts = await asyncio.gather(*(c.drain(self.grace) for c in self._consumers))
        settled = max((c.settled_at for c in self._consumers), default=0.0)
        pause = self.settle_pause - (time.monotonic() - settled)
        if pause > 0:
            await asyncio.sleep(pause)
        await close_quietly(connection)
        self._log.info("worker.stopped", cancelled=sum(counts))


async def _first_of(*waits: Awaitable[object]) -> None:
    """Wait until the first of ``waits`` is done; cancel the others (tasks are left running)."""
    tasks = [w if isinstance(w, asyncio.Task) else asyncio.ensure_future(w) for w in waits]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task, wait in zip(tasks, waits, strict=True):
        if task is not wait:
            task.cancel()


def _setter(
    event: asyncio.Event, reasons: list[BaseException] | None = None
) -> Callable[..., None]:
    """A close callback that sets ``event`` (and keeps the close reason in ``reasons``)."""

    def closed(_sender: object = None, exc: BaseException | None = None, *_: object) -> None:
        if reasons is not None and isinstance(exc, BaseException):
            reasons.append(exc)
        event.set()

    return closed


@contextlib.asynccontextmanager
async def _watching(watcher: Watcher | None) -> AsyncIterator[None]:
    """Run ``watcher`` (if any) for the duration of the block."""
    if watcher is None:
        yield
        return
    from qworker.watch import watching

    async with watching(watcher):
        yield
