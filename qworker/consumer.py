"""The consumer of one handler's queue: serve each delivery, then carry out its verdict.

A :class:`Consumer` lives as long as its worker. On every (re)connect it opens a
channel and starts a :class:`~qworker.gate.Gate` on it; when the broker closes
that channel alone (a ``consumer_timeout``, a deleted queue, a refused publish)
it opens a new one, with back-off, without touching the other queues.

For each delivery it decodes the payload, runs the handler (see
:mod:`qworker.runner`), asks :func:`qworker.verdict.judge` what that means, and
:meth:`Consumer.apply` carries the verdict out. ``apply`` is the only caller of
ack, nack, reject and publish-a-copy: a copy is published on the delivery's own
channel with confirms, and the original is acked only after the broker confirmed it.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import TYPE_CHECKING, Any

import structlog
from aio_pika.abc import AbstractConnection
from aiormq import spec

from qworker import headers as h
from qworker.backoff import Backoff
from qworker.context import PublishFunc
from qworker.delivery import Delivery, message_fields
from qworker.errors import PublishFailed
from qworker.events import CircuitState, OutcomeKind, severity_of
from qworker.exclusion import Exclusion
from qworker.failures import release_frames
from qworker.gate import CircuitControl, Gate
from qworker.handler import Handler
from qworker.publish import ConfirmedPublisher
from qworker.reporting import Reporter
from qworker.serving import Policy, Server
from qworker.topology import declare, quarantine_name, retry_queue
from qworker.verdict import (
    RETURNED_ON_STOP,
    Ack,
    Move,
    Quarantine,
    Return,
    Route,
    Run,
    Verdict,
    admit,
    judge,
)

if TYPE_CHECKING:
    from qworker.tracing import ConsumerSpan

#: The longest a stop waits for booked acks to be queued (they are, at once, unless the
#: connection died under them).
ACKS_WRITTEN_TIMEOUT = 5.0

#: Seconds between two looks at an empty quarantine (a passive declare each), growing to
#: the ceiling while it stays empty; a quarantine move by this process wakes it at once.
PULL_INTERVAL = 0.5
PULL_IDLE_CEILING = 5.0
#: A delivery that hit a bug of ours goes back, counted, so that it cannot loop forever.
RETURNED_AFTER_INTERNAL_ERROR = Return("message.returned", counted=True)
#: A delivery whose channel closed before its handler could run: nothing to settle (the
#: broker has it back), and nothing is written; named for its trace span's outcome.
NOT_RUN_CHANNEL_CLOSED = Return("message.returned", counted=False)
#: A copy that could not be published: the original goes back, counted (see ``Return``).
RETURNED_AFTER_FAILED_MOVE = Return("message.returned", counted=True)
#: A copy the broker refused (``basic.nack``: a ``reject-publish`` queue at its limit, a quorum
#: queue electing a leader) is published again after each of these pauses (15.5 s in all) while
#: the original is held, before the original is given back. Giving it back at once would run
#: the handler again for a failure that was only the copy's, and count a crash against the
#: message each time: a retry tier refusing for two seconds made a transient failure a
#: ``poison`` dead letter (tests/faults/test_cluster.py, a node stopped in a cluster). Held
#: deliveries stay far below RabbitMQ's ``consumer_timeout`` (30 minutes by default).
REFUSED_COPY_PAUSES = (0.5, 1.0, 2.0, 4.0, 8.0)


class Consumer:
    """Serves the deliveries of one handler's queue for the lifetime of a worker.

    A handler has two consumers: one of its work queue, and one of its quarantine
    (``quarantine=True``: prefetch 1, one at a time, each delivery run *alone*, see
    :mod:`qworker.exclusion`), which share ``exclusion``.

    Args:
        handler: The handler and its options.
        policy: The app-wide settings.
        publish: What ``ctx.publish`` calls (the app's confirmed publish).
        concurrency: Handlers running at once.
        prefetch: Unacked deliveries the broker sends ahead (at least ``concurrency``).
        exclusion: Shared with the handler's other consumer: quarantined deliveries run alone.
        quarantine: Consume the handler's quarantine instead of its work queue.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        policy: Policy,
        publish: PublishFunc,
        concurrency: int,
        prefetch: int,
        exclusion: Exclusion | None = None,
        quarantine: bool = False,
    ) -> None:
        self.handler = handler
        self.quarantine = quarantine
        #: The queue this consumer reads.
        self.source = quarantine_name(handler.queue) if quarantine else handler.queue
        self._policy = policy
        self._prefetch = 1 if quarantine else prefetch
        self._slots = asyncio.Semaphore(1 if quarantine else concurrency)
        self._exclusion = exclusion or Exclusion()
        self._tiers = set(handler.options.retry.tiers())
        self._log = structlog.get_logger("qworker").bind(queue=handler.queue, handler=handler.name)
        self._report = Reporter(handler, policy.observers, self._log)
        # Breaker state outlives channels and reconnects: a dependency is not fixed by a
        # new connection, and handlers of an old channel report to the same control. The
        # quarantine has none: it runs one delivery at a time, each a suspect of its own.
        self._circuit = (
            CircuitControl(
                handler.options.breaker, handler.options.fallback is not None, self._report.circuit
            )
            if handler.options.breaker is not None and not quarantine
            else None
        )
        self._server = Server(handler, policy, publish, self._log, self._circuit)
        #: Decided when the worker started; None (off) costs one test per delivery.
        self._tracing = policy.tracing
        self._moves = Backoff(first=0.5, ceiling=30.0)
        self._reopens = Backoff(first=0.5, ceiling=30.0, jitter=0.2)
        self._connection: AbstractConnection | None = None
        self._gate: Gate | None = None
        self._reopening: asyncio.Task[None] | None = None
        self._puller: asyncio.Task[None] | None = None
        self._tasks: dict[asyncio.Task[None], Gate] = {}
        self._stopping = False
        self.in_flight = 0
        #: When this consumer last settled a delivery (monotonic); see Worker._shutdown.
        self.settled_at = 0.0

    # Channel lifecycle

    @property
    def holding(self) -> int:
        """Deliveries this consumer has received and not yet settled (waiting or running)."""
        return len(self._tasks)

    @property
    def consuming(self) -> bool:
        """A consumer is attached to the queue (false while the breaker holds it off)."""
        return self._gate is not None and self._gate.consuming

    @property
    def ready(self) -> bool:
        """Consuming, or deliberately paused by an open breaker."""
        if self._gate is None or self._gate.channel.is_closed:
            return False
        if self.quarantine:
            return self._puller is not None and not self._puller.done()
        paused = self._circuit is not None and self._circuit.state is not CircuitState.CLOSED
        return self._gate.consuming or paused

    async def attach(self, connection: AbstractConnection) -> None:
        """Open a channel on ``connection`` and consume (on every connect of the worker)."""
        self._connection = connection
        await self._open(connection)

    def _cancel_quarantined(self, gate: Gate | None) -> None:
        """Runs on a dead channel: cancel a quarantined one; others stop counting as running
        for the quarantine (see :meth:`qworker.exclusion.Exclusion.orphan`)."""
        for task, came_through in list(self._tasks.items()):
            if gate is None or came_through is gate:
                if self.quarantine:
                    task.cancel()
                else:
                    self._exclusion.orphan(task)
        if self.quarantine and self._puller is not None and gate in (None, self._gate):
            self._puller.cancel()

    def detach(self) -> None:
        """The worker lost the connection: forget it (no channel is reopened on it)."""
        self._cancel_quarantined(None)
        self._connection = None
        if self._gate is not None and self._circuit is not None:
            self._circuit.detach(self._gate)
        self._gate = None

    async def _open(self, connection: AbstractConnection) -> None:
        channel = await connection.channel(publisher_confirms=True)
        publisher = ConfirmedPublisher(channel, self._policy.confirm_timeout)
        gate = Gate(channel, publisher, self.source, self._prefetch, self.on_message)
        channel.close_callbacks.add(lambda _channel, exc: self._closed(gate, connection, exc))
        self._gate = gate
        if self.quarantine:
            self._puller = asyncio.create_task(self._pull(gate))
        elif self._circuit is not None:
            await self._circuit.attach(gate)
        else:
            await gate.consume()

    def _closed(
        self, gate: Gate, connection: AbstractConnection, exc: BaseException | None
    ) -> None:
        """A channel closed: if the broker closed it alone, open another one (with back-off).

        Its unacked deliveries go back to the queue (the broker returns them); handlers
        still running on it finish, and their settlement is logged as lost. A quarantined
        delivery is cancelled instead: it runs alone, and would keep every other delivery
        of its handler waiting for a result nobody can ack (the broker has it back already).
        """
        self._cancel_quarantined(gate)
        if self._gate is not gate:
            return
        if self._circuit is not None:
            self._circuit.detach(gate)
        self._gate = None
        if self._stopping or self._connection is not connection:
            return
        self._log.warning("channel.closed", reason=str(exc) if exc else None, reopening=True)
        if self._reopening is None or self._reopening.done():
            self._reopening = asyncio.create_task(self._reopen(connection))

    async def _reopen(self, connection: AbstractConnection) -> None:
        while not self._stopping and self._gate is None:
            await asyncio.sleep(self._reopens.failed(time.monotonic()))
            if self._connection is not connection or connection.is_closed:
                return  # the worker reconnects and attaches again
            try:
                await self._open(connection)
            except Exception as exc:
                self._gate = None
                self._log.warning("channel.reopen_failed", error=str(exc))
                continue
            self._log.info("channel.reopened")
        self._reopens.succeeded()

    # Delivery lifecycle

    def on_message(self, message: Delivery, gate: Gate) -> None:
        """Hand the delivery to a task of our own.

        aiormq cancels its consumer tasks when the channel closes; our own task
        lets a running handler finish after a connection loss.
        """
        task = asyncio.create_task(self._guarded(message, gate))
        self._tasks[task] = gate
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)

    async def _pull(self, gate: Gate) -> None:
        """Read the quarantine one message at a time, and only while it can run alone.

        Polled (a passive declare for its depth, then ``basic.get``) rather than consumed:
        a consumer would hold a delivery while it waits for the other runs of its handler
        to end, and the death of the process meanwhile would count as its crash. Here a
        quarantined delivery is out of the queue only while it runs, so coming back means
        its worker died running it.
        """
        channel = await gate.channel.get_underlay_channel()
        idle = Backoff(first=PULL_INTERVAL, ceiling=PULL_IDLE_CEILING)
        while not self._stopping and not gate.channel.is_closed:
            try:
                declared = await channel.queue_declare(self.source, passive=True)
                if not declared.message_count:
                    # An empty quarantine is the normal case: look less often the longer it
                    # stays empty, and at once when this process quarantines something.
                    await self._exclusion.quarantined(idle.failed(time.monotonic()))
                    continue
                idle.succeeded()
                async with self._exclusion.alone():
                    if self._stopping:
                        return
                    raw = await channel.basic_get(self.source, no_ack=False)
                    if not isinstance(raw.delivery, spec.Basic.GetOk):
                        continue
                    task = asyncio.current_task()
                    assert task is not None
                    self._tasks[task] = gate  # drained on stop, cancelled with its channel
                    try:
                        await self._guarded(Delivery(raw, gate.acks_on(channel)), gate)
                    finally:
                        self._tasks.pop(task, None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the channel died under us: _closed reopens it
                if gate.channel.is_closed or self._stopping:
                    return
                self._log.warning("quarantine.poll_failed", error=str(exc))
                await asyncio.sleep(PULL_INTERVAL)

    async def _guarded(self, message: Delivery, gate: Gate) -> None:
        async with self._slots:
            if self._stopping:
                await self.apply(message, gate, RETURNED_ON_STOP)
                return
            if (pause := self._moves.remaining(time.monotonic())) > 0:
                await asyncio.sleep(pause)
            if not message.channel_open:
                return  # its channel closed while it waited: the broker has it back already
            self.in_flight += 1
            self._report.in_flight(self.in_flight)
            span: ConsumerSpan | None = None
            try:
                if self._tracing is not None:
                    span = self._tracing.consuming(message, self.handler.queue, self.handler.name)
                admission = admit(message.redelivered, self.handler, message.headers)
                if isinstance(admission, Quarantine):
                    done = await self.apply(message, gate, admission)
                    if span is not None:
                        span.settled(admission, None, done)
                    return
                route: Route
                run: Run | None
                if admission is not None:  # poison: judged, never run
                    route, run = Route.PRIMARY, admission
                elif self.quarantine:  # the puller holds the handler alone
                    route, run = await self._server.serve(message)
                else:
                    async with self._exclusion.shared:
                        if not message.channel_open:
                            # It waited while a quarantined delivery ran alone, and its channel
                            # closed meanwhile: the broker has it back, and running it here
                            # would only run it twice (tests/integration/test_poison.py).
                            if span is not None:
                                span.settled(NOT_RUN_CHANNEL_CLOSED, None, False)
                            return
                        route, run = await self._server.serve(message)
                verdict = judge(
                    route,
                    run,
                    self.handler,
                    self._server.origin(message),
                    message.headers,
                    random_fraction=random.random(),
                    runbooks=self._policy.runbooks,
                    trace=span.copy_headers() if span is not None else None,
                )
                if isinstance(verdict, Move) and run is not None and run.error is not None:
                    # Captured as text (verdict.error): the handler's frames need not wait
                    # for the copy's confirm.
                    release_frames(run.error)
                done = await self.apply(message, gate, verdict, run)
                if span is not None:
                    span.settled(verdict, run, done)
            except asyncio.CancelledError:
                # Grace period over: the handler did not finish; give the message back.
                await asyncio.shield(self.apply(message, gate, RETURNED_ON_STOP))
                if span is not None:
                    span.settled(RETURNED_ON_STOP, None, True)
                raise
            except Exception:
                # A bug of ours must not kill the consumer nor lose the message.
                self._log.exception("message.internal_error", **message_fields(message))
                await self.apply(message, gate, RETURNED_AFTER_INTERNAL_ERROR)
                if span is not None:
                    span.settled(RETURNED_AFTER_INTERNAL_ERROR, None, True)
            finally:
                if span is not None:
                    span.end()
                self.in_flight -= 1
                self._report.in_flight(self.in_flight)

    # Applying a verdict: the only ack, nack, reject and publish of a copy

    async def apply(
        self, message: Delivery, gate: Gate, verdict: Verdict, run: Run | None = None
    ) -> bool:
        """Carry out ``verdict`` for ``message``, which came through ``gate``; False when it
        could not be (the copy was refused, the channel closed: the broker has it back)."""
        if isinstance(verdict, Ack):
            if not await self._settle(message, "ack"):
                return False
            attempt = run.attempt if run is not None else None
            level = self._log.debug if verdict.event == "message.succeeded" else self._log.info
            level(verdict.event, **message_fields(message), attempt=attempt)
            if run is not None:
                self._report.succeeded(message, run)
            return True
        if isinstance(verdict, Return):
            if not await self._settle(message, "reject" if verdict.counted else "nack"):
                return False
            self._log.debug(verdict.event, **message_fields(message))
            return True
        if isinstance(verdict, Quarantine):
            fields = {**message_fields(message), "crashes": verdict.crashes}
            if not await self._copy(message, gate, verdict.target, verdict.headers, None, fields):
                return False
            self._log.warning("message.quarantined", **fields, target=verdict.target)
            self._exclusion.wake()
            return True
        assert run is not None
        return await self._move(message, gate, verdict, run)

    async def _move(self, message: Delivery, gate: Gate, move: Move, run: Run) -> bool:
        """Publish the copy on the delivery's channel, wait for its confirm, then ack.

        The confirm is awaited as long as the channel lives (a broker in a memory alarm
        blocks publishers: that is waiting, not failing); giving the original back while
        the copy may still be confirmed would duplicate it. A refused copy is published again
        (see :data:`REFUSED_COPY_PAUSES`); one that stays refused, an unroutable one or a lost
        channel pauses the queue (back-off) and gives the original back, counted.
        """
        reason = move.decision.reason.value if move.decision.reason else None
        # The fields of every line about this move, passed to each call rather than bound:
        # a bound logger per failure costs a dict and an object for one or two lines.
        fields = {
            **message_fields(message),
            "attempt": run.attempt,
            "error_type": move.error.error_type,
            "error_message": move.error.message,
            "classification": move.decision.classification.value,
            "fingerprint": move.error.fingerprint or None,
            "severity": severity_of(move.kind, reason, self.handler.options.severity),
            "error_code": move.error.code,
            "runbook": h.read_str(move.headers, h.RUNBOOK, 1024),
        }
        if move.tier_ms is not None and move.tier_ms not in self._tiers:
            try:
                await self._declare_tier(gate, move.tier_ms)
            except Exception as exc:
                await self._copy_failed(message, gate, move.target, exc, fields)
                return False
        copied = await self._copy(
            message, gate, move.target, move.headers, move.expiration_ms, fields
        )
        if not copied:
            return False
        if move.kind is OutcomeKind.RETRIED:
            self._log.warning(
                "message.retry_scheduled", **fields, delay=move.wait_seconds, tier=move.target
            )
        else:
            # The traceback as written to the dead letter: redacted, capped.
            self._log.error(
                "message.dead_lettered",
                **fields,
                reason=reason,
                dlq=move.target,
                stack_trace=move.error.traceback,
            )
        self._report.moved(message, run, move)
        return True

    async def _copy(
        self,
        message: Delivery,
        gate: Gate,
        target: str,
        headers: dict[str, Any],
        expiration_ms: int | None,
        fields: dict[str, Any],
    ) -> bool:
        """Publish a copy with ``headers`` to ``target`` on the delivery's channel, wait for the
        confirm, then ack the original; True when done (False: it went back, or was lost)."""
        properties = message.copy_properties(headers, expiration_ms)
        pauses = iter(REFUSED_COPY_PAUSES)
        while True:
            if not message.channel_open:  # the broker has the original back already
                self._log.warning("message.settle_lost", **fields, action="move", note=_REDELIVERED)
                return False
            try:
                await gate.publisher.publish_body(message.body, properties, target, patient=True)
                break
            except Exception as exc:  # PublishFailed
                refused = isinstance(exc, PublishFailed) and exc.refused
                pause = next(pauses, None) if refused else None
                if pause is None:
                    await self._copy_failed(message, gate, target, exc, fields)
                    return False
                self._moves.failed(time.monotonic())  # new deliveries wait too
                self._log.warning(
                    "message.move_failed",
                    **fields,
                    target=target,
                    error=str(exc),
                    backoff=pause,
                    note=_HELD,
                )
                await asyncio.sleep(pause)
        self._moves.succeeded()
        await self._settle(message, "ack")
        return True

    async def _copy_failed(
        self,
        message: Delivery,
        gate: Gate,
        target: str,
        exc: Exception,
        fields: dict[str, Any],
    ) -> None:
        """Pause the queue (outage back-off), then give the original back, counted."""
        pause = self._moves.failed(time.monotonic())
        self._log.error(
            "message.move_failed", **fields, target=target, error=str(exc), backoff=pause
        )
        await asyncio.sleep(pause)
        await self.apply(message, gate, RETURNED_AFTER_FAILED_MOVE)

    async def _declare_tier(self, gate: Gate, tier_ms: int) -> None:
        """Declare a tier outside the policy (from ``Retry(delay=...)``) before the first use."""
        connection = self._connection
        if connection is None:
            raise ConnectionError("no connection to declare the retry tier on")
        spec = retry_queue(self.handler.queue, tier_ms, self.handler.options.queue_type)
        await declare(connection, [spec])
        self._tiers.add(tier_ms)

    async def _settle(self, message: Delivery, action: str) -> bool:
        """``ack``, ``nack`` (requeue) or ``reject`` (requeue); False when the channel is gone
        (the broker redelivers the message)."""
        try:
            if action == "ack":
                await message.ack()
            elif action == "nack":
                await message.nack(requeue=True)
            else:
                await message.reject()
        except Exception as exc:
            self._log.warning(
                "message.settle_lost",
                **message_fields(message),
                action=action,
                error=repr(exc),
                note=_REDELIVERED,
            )
            return False
        self.settled_at = time.monotonic()
        return True

    # Circuit breaker

    # Stopping

    async def stop_taking(self) -> None:
        """Cancel the consumer; deliveries not yet started are returned instead of run."""
        self._stopping = True
        if self._puller is not None and self._puller not in self._tasks:
            self._puller.cancel()  # waiting for work: nothing of its own to finish
        if self._circuit is not None:
            self._circuit.stop()
        if self._reopening is not None:
            self._reopening.cancel()
        if self._gate is not None:
            await self._gate.stop()

    async def drain(self, grace: float) -> int:
        """Wait up to ``grace`` s for running handlers, then cancel the rest; returns how many."""
        pending = set(self._tasks)
        still: set[asyncio.Task[None]] = set()
        if pending:
            _, still = await asyncio.wait(pending, timeout=grace)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still, timeout=5)
        if self._gate is not None:
            # Booked acks go out before the connection closes (bounded: a dead connection
            # never frees room for them).
            await self._gate.acks_written(ACKS_WRITTEN_TIMEOUT)
        return len(still)


_REDELIVERED = "channel closed; the broker will redeliver the message"
_HELD = "refused: the original is held and the copy published again after the back-off"
