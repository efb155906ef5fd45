"""Reading a queue in order while holding every message, so that nothing leaves unless acked.

A :class:`Cursor` consumes with manual acks and never rejects. What it does not
ack it gives back explicitly when it closes: it cancels its consumer, then returns
every message still held on the channel with ``basic.nack(tag, multiple=True,
requeue=True)`` frames of at most 32 messages each, oldest first (a quorum queue
requeues a larger frame out of order: :data:`~qworker.dlq.acks.GIVE_BACK_BATCH`),
and only then closes the channel. RabbitMQ
4.3+ does not count a ``basic.nack`` as a failed delivery on quorum queues, but
does count the messages a *closed channel* gives back (and ``basic.reject``);
before 4.3 a quorum queue counts every return, whichever way (see
:class:`~qworker.dlq.probes.DeliveryGuard`). A consumer only receives
``window`` unacked messages, so to read past them the cursor cancels that
consumer (its messages stay held by the channel) and starts the next one; it
does so only when its buffer runs low, which keeps memory flat however long
the queue is. Consumer tags carry a zero-padded counter: RabbitMQ 3.x gives
back the messages of a channel consumer by consumer, in the text order of their
tags, so ``-10`` sorting before ``-2`` would change the queue's order.

Before reading a queue whose deliveries may count against a delivery limit, the
cursor asks its :class:`~qworker.dlq.probes.DeliveryGuard` (which may refuse at
once), takes the first message alone and checks its ``x-delivery-count``, and
checks every later one too: a refusal (:class:`~qworker.dlq.probes.BrowseRefused`)
gives back what was read, still below the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection
from aiormq import spec
from aiormq.abc import DeliveredMessage

from qworker.dlq import probes
from qworker.dlq.acks import Acker, Settled
from qworker.dlq.filters import Filter
from qworker.dlq.probes import (
    DeliveryGuard,
    Safety,
    asked_until,
    close_channel_quietly,
    delivery_guard,
    queue_depth,
    queue_stat,
    safety,
)
from qworker.dlq.records import DELIVERY_COUNT, DeadLetter, dead_letter, properties_of
from qworker.errors import BrokerStalled, QworkerError

#: AMQP's prefetch count is a 16-bit number.
MAX_WINDOW = 65535
#: With nothing delivered for this long, the cursor checks whether the queue ran dry.
IDLE_SECONDS = 1.0
#: Headers a quorum queue adds to a message it delivers again: ``x-delivery-count`` (up
#: to 4.2 every return counts; from 4.3 only failed deliveries) and ``x-acquired-count``
#: (4.x, every delivery). Either means the message was given back before.
RETURNED = frozenset({DELIVERY_COUNT, "x-acquired-count"})
#: How long closing waits for the broker to make returned messages ready again.
RETURN_SECONDS = 5.0
#: A pass gives up (:class:`~qworker.errors.BrokerStalled`) after this long with nothing
#: delivered while the queue cannot be shown to be empty: a broker that stopped delivering
#: (another consumer is the single active one, say) must not wedge the tool.
STALL_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class Held:
    """A delivery the cursor holds: ack ``tag`` to remove it; otherwise it goes back."""

    tag: int
    dead_letter: DeadLetter


class Cursor:
    """Holds the messages of ``queue`` one by one, oldest first, until closed.

    Iterating yields the messages that were ready when the cursor opened (its
    ``depth``), then stops; :meth:`next` keeps going with messages that arrive
    later. Use as ``async with Cursor(...) as cursor``.
    """

    def __init__(
        self,
        connection: AbstractConnection,
        queue: str,
        *,
        window: int = 1000,
        guard: DeliveryGuard | None = None,
        keep_order: bool = False,
        budget: int | None = None,
    ) -> None:
        self.queue = queue
        self.guard = guard
        self.keep_order = keep_order
        self.depth = 0
        #: Highest ``x-delivery-count`` seen (quorum queues add it to deliveries).
        self.max_delivery_count: int | None = None
        self._connection = connection
        self._window = max(1, min(window, MAX_WINDOW))
        self._current_window = self._window
        #: At most this many deliveries in all (None: no limit); see :func:`select`.
        self._budget = budget
        self._buffer: asyncio.Queue[DeliveredMessage] = asyncio.Queue()
        self._channel: AbstractChannel | None = None
        self._underlay: aiormq.abc.AbstractChannel | None = None
        self._tag: str | None = None
        self._received = 0
        self._consumers = 0
        self._seen = 0
        self._acked = 0
        self._settled = Settled()
        #: A delivery said it had been given back before (a quorum queue's count headers).
        self._returned_before = False
        self._acker: Acker | None = None
        self._delivered = 0
        #: ``_delivered`` when the last idle check began, and when that was.
        self._idle_mark = (-1, 0.0)

    async def __aenter__(self) -> Cursor:
        self.depth = await queue_depth(self._connection, self.queue, strict=True)
        if self.guard is None:
            self.guard = await delivery_guard(self._connection, self.queue)
        self.guard.check_open()
        self._channel = await self._connection.channel(publisher_confirms=False)
        self._underlay = await self._channel.get_underlay_channel()
        await self._underlay.basic_qos(prefetch_count=self._window)
        self._acker = Acker(self._underlay)
        if self.guard.counted:
            # Look at the first message alone: if its delivery count makes the guard
            # refuse, only that one message is given back (one delivery more).
            self._current_window = 1
            await self._underlay.basic_qos(prefetch_count=1)
        await self._consume()
        if self.depth == 0:
            try:
                await self._confirm_empty()
            except BaseException:
                await self.close()  # no consumer may stay behind, holding what comes later
                raise
        return self

    async def _confirm_empty(self) -> None:
        """Believe an opening "0 ready" only from an answer that counts this cursor's consumer.

        RabbitMQ answers "0 messages, 0 consumers" at once, not only late, when a quorum
        queue has no leader to ask, e.g. just after a node restart
        (``rabbit_quorum_queue:stat/2`` maps ``{error, _}`` and a failed call to
        ``{ok, 0, 0}``: 3.10.8, 4.1.0; 4.3 also a leader it cannot find), and
        :func:`~qworker.dlq.probes.queue_depth` distrusts only late zeros. With the consumer
        registered, a real answer counts it: the depth is then what that answer has ready
        plus what was delivered meanwhile. One passive declare more for an empty queue.

        Raises:
            BrokerStalled: :data:`~qworker.dlq.probes.DEPTH_ATTEMPTS` answers without a
                consumer (about 4 s): the broker cannot say what the queue holds.
        """
        stat = await asked_until(self._connection, self.queue, lambda answer: answer.consumers > 0)
        if stat is None:
            raise BrokerStalled(
                f"RabbitMQ did not say how many messages {self.queue!r} holds: "
                f"{probes.DEPTH_ATTEMPTS} answers of 0 did not count this reader's consumer, as "
                "a quorum queue without a leader answers (a node restarting?); try again"
            )
        self.depth = stat.ready + self._delivered

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Give back every message not acked, in order, then close the channel.

        The consumer is cancelled first (so nothing more arrives), then
        ``basic.nack(tag, multiple=True, requeue=True)`` frames return every message
        still held on the channel, oldest first; closing the channel afterwards returns
        nothing more (a closed channel's returns count as failed deliveries on
        RabbitMQ 4.3+). The broker puts them back asynchronously; waiting (up to
        ``RETURN_SECONDS``) until they are ready again means that the next
        reader, e.g. the next command of a script, sees the whole queue.
        """
        if self._channel is None or self._channel.is_closed:
            return
        with contextlib.suppress(Exception):  # lost acks: those messages come back, duplicated
            if self._acker is not None:
                await self._acker.settle()
        if self.keep_order and self._returned_before and self._delivered < self.depth:
            # Best effort: whatever is not held in time is simply given back behind.
            with contextlib.suppress(aiormq.exceptions.AMQPError, ConnectionError, QworkerError):
                await self._hold_rest()
        # If this fails the channel is gone, and the broker has taken the messages back.
        with contextlib.suppress(aiormq.exceptions.AMQPError, ConnectionError, RuntimeError):
            await self._give_back()
        await close_channel_quietly(self._channel)
        expected = self.depth - self._acked
        deadline = time.monotonic() + RETURN_SECONDS
        with contextlib.suppress(QworkerError, aiormq.exceptions.AMQPError, ConnectionError):
            while await queue_depth(self._connection, self.queue) < expected:
                if time.monotonic() > deadline:
                    return  # someone else is consuming: nothing more to wait for
                await asyncio.sleep(0.01)

    async def _hold_rest(self) -> None:
        """Hold the messages this pass did not read, unread, so that all go back in order.

        A quorum queue puts returned messages behind the ones it returned before
        (``rabbit_fifo`` appends them to its ``returns`` queue, which it delivers first):
        a pass that stopped early and gave back only what it read would move those
        messages behind the rest of the queue once the queue's messages had all been
        returned at least once, i.e. after any earlier full read. Holding the rest too
        gives the whole queue back in its order. Only done when a delivery showed that
        it had been given back before (:data:`RETURNED`): a classic queue requeues in
        place, and a quorum queue's first return goes ahead of its never-delivered
        messages. The held messages are not parsed (only their delivery count is checked
        against the guard), but the broker still delivers each: it costs about as much as
        a full read.
        """
        assert self._underlay is not None
        while self._delivered < self.depth:
            if self._received >= self._current_window:
                await self._roll()
            try:
                message = await asyncio.wait_for(self._buffer.get(), IDLE_SECONDS)
            except TimeoutError:
                if await self._ran_dry():
                    return
                await self._roll()
                continue
            headers = message.header.properties.headers or {}
            count = headers.get(DELIVERY_COUNT)
            if self.guard is not None and isinstance(count, int) and not isinstance(count, bool):
                self.guard.check(count)

    async def _give_back(self) -> None:
        """Cancel the consumer, then return every unacked message of the channel, in order."""
        assert self._underlay is not None
        if self._tag is not None:
            tag, self._tag = self._tag, None
            await self._underlay.basic_cancel(tag)
        # Delivery tags on this channel run from 1 to the number delivered; each frame
        # returns the unacked ones up to its tag, at most GIVE_BACK_BATCH of them.
        for last in self._settled.give_back(self._delivered):
            await self._underlay.basic_nack(last, multiple=True, requeue=True)

    async def _consume(self) -> None:
        assert self._underlay is not None
        # The tag is chosen here, not read from ConsumeOk: deliveries may be
        # dispatched before the ConsumeOk reply reaches this coroutine. Zero-padded,
        # so that tags sort as their numbers (see the module docstring).
        self._consumers += 1
        self._tag = f"qworker-dlq-{id(self):x}-{self._consumers:08d}"
        self._received = 0
        await self._underlay.basic_consume(
            self.queue, self._on_delivery, no_ack=False, consumer_tag=self._tag
        )

    async def _on_delivery(self, message: DeliveredMessage) -> None:
        assert isinstance(message.delivery, spec.Basic.Deliver)
        if message.delivery.consumer_tag == self._tag:
            self._received += 1
        self._delivered += 1
        self._buffer.put_nowait(message)

    async def _ran_dry(self) -> bool:
        """After an idle wait: True when the queue has no ready message left.

        Only an answer that counts a consumer is believed: this cursor's own consumer is
        registered, so "0 messages, 0 consumers" is a busy quorum leader's timeout reply
        (see :data:`~qworker.dlq.probes.QUORUM_STAT_TIMEOUT`), not an empty queue; at a
        million messages it came within minutes, and the pass stopped at a fifth.
        Raises :class:`~qworker.errors.BrokerStalled` after :data:`STALL_SECONDS`
        without a delivery and without such an answer.
        """
        now = time.monotonic()
        if self._idle_mark[0] != self._delivered:
            self._idle_mark = (self._delivered, now)
        stat = await queue_stat(self._connection, self.queue)
        if stat.ready == 0 and stat.consumers > 0:
            return True
        if now - self._idle_mark[1] > STALL_SECONDS:
            raise BrokerStalled(
                f"RabbitMQ delivered nothing from {self.queue!r} for {STALL_SECONDS:g}s and "
                f"does not report it empty ({stat.ready} ready, {stat.consumers} consumers; "
                f"{self._delivered} of {self.depth} read); is another consumer the single "
                "active one, or is the broker overloaded?"
            )
        return False

    async def _roll(self) -> None:
        """Replace a consumer that has used its whole window by a fresh one."""
        assert self._underlay is not None
        if self._tag is None:
            return  # the budget was spent: nothing more is asked for
        await self._underlay.basic_cancel(self._tag)
        window = self._window
        if self._budget is not None:
            window = min(window, self._budget - self._delivered)
            if window <= 0:
                self._tag = None  # every delivery wanted has come: no further consumer
                return
        if self._current_window != window:
            self._current_window = window
            await self._underlay.basic_qos(prefetch_count=window)
        await self._consume()

    async def next(self, timeout: float) -> Held | None:  # noqa: ASYNC109
        """The next message, or None if none came within ``timeout`` seconds."""
        window = self._current_window
        if self._received >= window and self._buffer.qsize() <= window // 2:
            await self._roll()
        if self._buffer.empty():
            try:
                message = await asyncio.wait_for(self._buffer.get(), timeout)
            except TimeoutError:
                return None
        else:
            message = self._buffer.get_nowait()
        assert isinstance(message.delivery, spec.Basic.Deliver)
        tag = message.delivery.delivery_tag
        assert tag is not None
        properties = message.header.properties
        dl = dead_letter(self.queue, message.body, properties_of(properties), properties.headers)
        if not self._returned_before:
            self._returned_before = not RETURNED.isdisjoint(dl.headers)
        count = dl.headers.get(DELIVERY_COUNT)
        if isinstance(count, int) and not isinstance(count, bool):
            if count > (self.max_delivery_count or -1):
                self.max_delivery_count = count
            if self.guard is not None:
                # Raised before this message is used; closing gives it back below the limit.
                self.guard.check(count)
        return Held(tag, dl)

    async def __aiter__(self) -> AsyncIterator[Held]:
        """The messages that were ready at open and not yet yielded; stops early if none are left.

        Breaking out and iterating again resumes where the last iteration stopped.
        """
        while self._seen < self.depth:
            if self._budget is not None and self._seen >= self._budget:
                return  # no more will be delivered
            held = await self.next(IDLE_SECONDS)
            if held is None:
                if await self._ran_dry():
                    return
                # Messages are ready but none come: a fresh consumer has fresh credit.
                await self._roll()
                continue
            self._seen += 1
            yield held

    async def ack(self, tag: int) -> None:
        """Remove a held message from the queue (sent soon, with its neighbours: see
        :class:`~qworker.dlq.acks.Acker`)."""
        assert self._acker is not None
        await self._acker.ack(tag)
        self._settled.add(tag)
        self._acked += 1

    async def flush(self) -> None:
        """Send every requested ack now; raises if an earlier or this send failed."""
        assert self._acker is not None
        await self._acker.flush()


@dataclass(slots=True)
class ScanReport:
    """What a pass over a DLQ saw: ``depth`` ready at the start, ``scanned``, ``matched``.

    ``delivery_counted`` is true when the queue is not verified (see :class:`Safety`)
    and its deliveries carry ``x-delivery-count``, i.e. a quorum queue whose
    delivery limit is unknown: every pass counts one delivery per message read.
    """

    queue: str
    depth: int = 0
    scanned: int = 0
    matched: int = 0
    safety: Safety = Safety.UNVERIFIED
    max_delivery_count: int | None = None

    @property
    def delivery_counted(self) -> bool:
        return self.safety is Safety.UNVERIFIED and self.max_delivery_count is not None


class Selection:
    """The messages of a cursor that match a filter, at most ``limit`` of them (None: all)."""

    def __init__(self, cursor: Cursor, chosen: Filter, limit: int | None, kind: Safety) -> None:
        self.cursor = cursor
        self.report = ScanReport(cursor.queue, cursor.depth, safety=kind)
        self._filter = chosen
        self._limit = limit

    async def __aiter__(self) -> AsyncIterator[Held]:
        report = self.report
        async for held in self.cursor:
            report.scanned += 1
            report.max_delivery_count = self.cursor.max_delivery_count
            if not self._filter.matches(held.dead_letter):
                continue
            report.matched += 1
            yield held
            if self._limit is not None and report.matched >= self._limit:
                return


@contextlib.asynccontextmanager
async def select(
    connection: AbstractConnection,
    queue: str,
    chosen: Filter,
    limit: int | None = None,
    *,
    window: int = 1000,
    keep_order: bool = False,
) -> AsyncIterator[Selection]:
    """Open a cursor on ``queue`` and select from it; everything not acked returns at exit.

    Without a filter only ``limit`` messages are needed, so no more are fetched, unless
    ``keep_order``: then a pass that stops early still holds the rest of the queue
    before giving everything back (see :meth:`Cursor._hold_rest`), so that a quorum
    queue keeps its order; it costs a delivery per message of the queue.
    """
    budget = None
    if limit is not None and chosen.empty and not keep_order:
        # Exactly ``limit`` deliveries: a pass that took more than it shows would give the
        # extra back too, and on a quorum DLQ a later, shorter pass would then move the
        # head (returned messages queue up behind those returned before).
        budget, window = limit, min(window, limit)
    async with Cursor(
        connection, queue, window=window, keep_order=keep_order, budget=budget
    ) as cursor:
        yield Selection(cursor, chosen, limit, await safety(connection, queue))
