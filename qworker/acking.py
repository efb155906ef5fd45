"""A worker channel's acks, written together: one ``multiple`` ack for the acks of one moment.

Handlers finish in bursts: a quorum queue confirms the copies of many failures with one
frame, and every waiting delivery is then acked within the same turn of the event loop.
Acked one frame each, that burst costs a frame, a socket write and (on a quorum queue) a
Raft command per message: in the S3 benchmark the broker's CPU per failure halved when
they went together (``bench/results/2026-11-30-ack-coalescing.md``).

:meth:`ChannelAcks.ack` returns once the ack is in aiormq's write queue, as a single ack
did: the acks requested in one turn of the loop are written at the start of the next, as a
``multiple`` ack for the longest run :class:`~qworker.ackbook.AckBook` allows (every tag up
to it acked now or settled before) and single acks above a gap (a delivery still being
handled). Rejects and nacks are written at once, as before, and noted so that a later
multiple ack may cover them.
"""

from __future__ import annotations

import asyncio

import aiormq

from qworker.ackbook import AckBook


class ChannelAcks:
    """The acks of one aiormq channel's deliveries.

    Args:
        channel: The channel the deliveries came on (delivery tags are per channel).
    """

    __slots__ = ("_book", "_channel", "_lock", "_writer", "_written")

    def __init__(self, channel: aiormq.abc.AbstractChannel) -> None:
        self._channel = channel
        self._book = AckBook()
        #: Resolved when the acks requested in this turn of the loop are written.
        self._written: asyncio.Future[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        # aiormq's write queue holds 10 frames: a write may wait for room, and the frames of
        # the next one must not overtake it (a multiple ack would remove a tag an earlier
        # frame still names, and the broker would close the channel).
        self._lock = asyncio.Lock()

    async def ack(self, tag: int) -> None:
        """``basic.ack`` ``tag``, with the other acks of this turn of the loop; raises as
        aiormq's ``basic_ack`` does (e.g. the channel is closed)."""
        if self._channel.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError(f"{self._channel!r} closed")
        self._book.add(tag)
        written = self._written
        if written is None:
            loop = asyncio.get_running_loop()
            written = self._written = loop.create_future()
            self._writer = loop.create_task(self._write(written))  # after this turn's acks
        # Shielded: one cancelled waiter (the worker stopping) must not cancel the others'.
        await asyncio.shield(written)

    async def _write(self, written: asyncio.Future[None]) -> None:
        self._written = None  # acks requested from here on go with the next write
        try:
            async with self._lock:
                if self._channel.is_closed:  # an earlier write failed with these acks in it
                    raise aiormq.exceptions.ChannelInvalidStateError(f"{self._channel!r} closed")
                multiple, singles = self._book.plan()
                if multiple is not None:
                    await self._channel.basic_ack(multiple, multiple=True, wait=False)
                for tag in singles:
                    await self._channel.basic_ack(tag, wait=False)
        except Exception as exc:  # the channel closed: the broker has these messages back
            written.set_exception(exc)
            return
        written.set_result(None)

    def settled(self, tag: int) -> None:
        """``tag`` was rejected or nacked (frame written): a later multiple ack may cover it."""
        self._book.settled(tag)
