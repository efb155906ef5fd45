"""The DLQ tool's acks: sent in batches (:class:`Acker`), and the frames that give held
messages back (:class:`Settled`).

A replay removes thousands of messages; which acks can go as one ``multiple`` ack is
:class:`qworker.ackbook.AckBook`'s decision, shared with the worker.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiormq

from qworker.ackbook import AckBook, TagRuns

#: Acks are sent when this many are requested, or this many seconds after the first.
ACK_BATCH = 64
ACK_DELAY = 0.02


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
class Settled(TagRuns):
    """The delivery tags acked on one channel, as ascending runs ``[first, last]``.

    A replay acks in delivery order with gaps (messages not selected), so this is one
    run per gap, never one entry per message.
    """

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
