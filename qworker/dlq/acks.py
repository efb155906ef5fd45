"""Which ack frames to send: consecutive delivery tags go as one ``multiple`` ack. Pure logic.

A replay removes thousands of messages; one ack frame per message costs a write
on the client and, on a quorum queue, a Raft command on the broker. A
``basic.ack(multiple=True)`` for tag T removes every unacked message up to T,
so it may only be sent when every tag up to T is meant to be acked: messages
held but not selected (a gap) stop the run, and the tags above a gap are acked
one by one. T itself must still be unacked, or the broker closes the channel.
"""

from __future__ import annotations

import asyncio
import bisect
from dataclasses import dataclass, field

import aiormq

#: Acks are sent when this many are requested, or this many seconds after the first.
ACK_BATCH = 64
ACK_DELAY = 0.02
#: Single acks remembered above a gap; past this, coalescing stops for the cursor.
SENT_LIMIT = 10_000


@dataclass(slots=True)
class AckBook:
    """The acks requested on one channel (delivery tags start at 1) and those already sent."""

    floor: int = 0  #: every tag up to here is acked on the wire
    pending: set[int] = field(default_factory=set)  #: requested, not yet sent
    sent: set[int] = field(default_factory=set)  #: sent as single acks, above ``floor``
    coalescing: bool = True

    def add(self, tag: int) -> None:
        """Request the ack of ``tag``."""
        self.pending.add(tag)

    def plan(self) -> tuple[int | None, list[int]]:
        """The frames for every pending ack: a multiple ack up to a tag (or None), then singles.

        The multiple ack covers the run of requested or already acked tags just
        above ``floor``; its tag is the highest one in the run that is still unacked.
        """
        multiple: int | None = None
        if self.coalescing:
            while True:
                above = self.floor + 1
                if above in self.pending:
                    self.pending.discard(above)
                    multiple = above
                elif above in self.sent:
                    self.sent.discard(above)
                else:
                    break
                self.floor = above
        singles = sorted(self.pending)
        self.pending.clear()
        if self.coalescing:
            self.sent.update(singles)
            if len(self.sent) > SENT_LIMIT:
                # A permanent gap (a message kept) below them: stop tracking, ack singly.
                self.sent.clear()
                self.coalescing = False
        return multiple, singles


class Acker:
    """Sends the acks of one channel in batches: at ``ACK_BATCH`` requests, or ``ACK_DELAY``
    seconds after the first one, whichever comes first (the timing side of :class:`AckBook`)."""

    def __init__(self, channel: aiormq.abc.AbstractChannel) -> None:
        self._channel = channel
        self._book = AckBook()
        self._lock = asyncio.Lock()
        self._error: Exception | None = None
        self._flusher: asyncio.Task[None] | None = None

    async def ack(self, tag: int) -> None:
        """Request the ack of ``tag``; it is sent within ``ACK_DELAY`` seconds."""
        self._book.add(tag)
        if len(self._book.pending) >= ACK_BATCH:
            await self.flush()
        elif self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(ACK_DELAY)
        try:
            await self.flush()
        except Exception as exc:  # the channel is gone; raised again by the next flush
            self._error = exc

    async def flush(self) -> None:
        """Send every requested ack now; raises if an earlier or this send failed."""
        if self._error is not None:
            raise self._error
        async with self._lock:  # frames of two flushes must not interleave
            multiple, singles = self._book.plan()
            if multiple is not None:
                await self._channel.basic_ack(multiple, multiple=True)
            for tag in singles:
                await self._channel.basic_ack(tag)

    async def settle(self) -> None:
        """Wait for a pending timed flush (at most ``ACK_DELAY``; cancelling it could drop
        its frames), then send what is left."""
        if self._flusher is not None:
            await self._flusher
        await self.flush()


#: Most messages given back by one ``basic.nack(multiple=True, requeue=True)``. A quorum
#: queue settles the messages of one such frame as an Erlang map of message ids, which
#: keeps its keys in order only up to 32 entries (a "flatmap"; larger maps are hashed):
#: RabbitMQ 3.10 was seen to requeue 60 messages of one frame in a scrambled order, and
#: 32 in order. Frames of at most 32 keep the queue's order on every version, for 1/32
#: of a frame per message.
GIVE_BACK_BATCH = 32


@dataclass(slots=True)
class Settled:
    """The delivery tags acked on one channel, as ascending runs ``[first, last]``.

    A replay acks in delivery order with gaps (messages not selected), so this is one
    run per gap, never one entry per message.
    """

    runs: list[list[int]] = field(default_factory=list)

    def add(self, tag: int) -> None:
        """Note that ``tag`` is acked."""
        runs = self.runs
        if runs and runs[-1][0] <= tag <= runs[-1][1] + 1:
            runs[-1][1] = max(runs[-1][1], tag)
            return
        if not runs or tag > runs[-1][1] + 1:
            runs.append([tag, tag])
            return
        # Out of order (rare): insert, then merge with the neighbours it touches.
        index = bisect.bisect_left(runs, [tag, tag])
        runs.insert(index, [tag, tag])
        merged: list[list[int]] = []
        for run in runs:
            if merged and run[0] <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], run[1])
            else:
                merged.append(run)
        self.runs = merged

    def give_back(self, delivered: int, batch: int = GIVE_BACK_BATCH) -> list[int]:
        """The tags of the ``basic.nack(tag, multiple=True)`` frames that return every
        unacked tag of ``1..delivered``, in ascending order, at most ``batch`` per frame.

        Each tag is itself unacked (the broker refuses a multiple nack ending on a tag it
        no longer holds), and each frame returns only what the frames before left.
        """
        plan: list[int] = []
        count = 0
        last = 0
        done = 0  # every tag up to here is acked or planned
        for start, end in [*self.runs, [delivered + 1, delivered + 1]]:
            low, high = done + 1, min(start - 1, delivered)
            tag = low
            while tag <= high:
                take = min(batch - count, high - tag + 1)
                tag += take
                count += take
                last = tag - 1
                if count == batch:
                    plan.append(last)
                    count = 0
            done = max(done, end)
            if done >= delivered:
                break
        if count:
            plan.append(last)
        return plan
