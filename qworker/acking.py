"""A worker channel's acks, written together: one ``multiple`` ack for the acks of one moment.

Handlers finish in bursts: a quorum queue confirms the copies of many failures with one
frame, and every waiting delivery is then acked within the same turn of the event loop.
Acked one frame each, that burst costs a frame, a socket write and (on a quorum queue) a
Raft command per message (RabbitMQ settles the tags of one ack frame per queue, with one
``rabbit_queue_type:settle`` call: ``rabbit_channel:settle_acks/2``): in the S3 benchmark
the broker's CPU per failure halved when they went together
(``bench/results/2026-11-30-ack-coalescing.md``).

The acks booked (:meth:`ChannelAcks.book`) in one turn of the loop are written at the start
of the next, as a ``multiple`` ack for the longest run :class:`~qworker.ackbook.AckBook`
allows (every tag up to it acked now or settled before) and single acks above a gap (a
delivery still being handled). Rejects and nacks are written at once, as before, and noted
so that a later multiple ack may cover them.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiormq
import structlog

from qworker.ackbook import AckBook

_LOG = structlog.get_logger("qworker")
_CLOSING = "closing the channel so that the broker returns its unacked messages"


class ChannelAcks:
    """The acks of one aiormq channel's deliveries.

    Args:
        channel: The channel the deliveries came on (delivery tags are per channel).
    """

    __slots__ = ("_book", "_channel", "_lock", "_planned", "_writer")

    def __init__(self, channel: aiormq.abc.AbstractChannel) -> None:
        self._channel = channel
        self._book = AckBook()
        #: The task that writes the acks booked since the last plan (None: none pending).
        self._writer: asyncio.Task[None] | None = None
        #: The writer that planned and may still be writing (the loop keeps tasks only weakly).
        self._planned: asyncio.Task[None] | None = None
        # aiormq's write queue holds 10 frames: a write may wait for room, and the frames of
        # the next one must not overtake it (a multiple ack would remove a tag an earlier
        # frame still names, and the broker would close the channel).
        self._lock = asyncio.Lock()

    def book(self, tag: int) -> None:
        """Request ``basic.ack`` of ``tag``: written with the other acks of this turn of the
        loop, at the start of the next. Raises at once on a closed channel, as aiormq's
        ``basic_ack`` does.

        Not awaited, like a single ack that aiormq queues for its writer task: the frame is
        written before the worker can close the connection (it waits at least 0.2 s after
        the last ack), and if the channel closes first, the broker has the message back
        either way (the consumer logs ``channel.closed``)."""
        if self._channel.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError(f"{self._channel!r} closed")
        self._book.add(tag)
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        # Started by the first ack of a turn, so it runs after that turn's other acks.
        try:
            async with self._lock:
                # Acks booked from here on need a writer of their own (this one may wait for
                # room in aiormq's queue after planning).
                self._planned, self._writer = self._writer, None
                multiple, singles = self._book.plan()
                if multiple is not None:
                    await self._channel.basic_ack(multiple, multiple=True, wait=False)
                for tag in singles:
                    await self._channel.basic_ack(tag, wait=False)
        except Exception as exc:
            if not self._channel.is_closed:  # not the usual cause: say so, rather than wedge
                _LOG.error("acks.write_failed", error=repr(exc), note=_CLOSING)
                with contextlib.suppress(Exception):
                    await self._channel.close()
            # Else the channel closed: the broker has these messages back.

    async def written(self, timeout: float) -> None:  # noqa: ASYNC109
        """Wait until every ack booked so far is queued for the socket, at most ``timeout``
        seconds (a connection that died under a writer never frees room in its queue).

        Args:
            timeout: The longest wait, in seconds.
        """
        deadline = asyncio.get_running_loop().time() + timeout
        while pending := [t for t in (self._planned, self._writer) if t and not t.done()]:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            await asyncio.wait(pending, timeout=left)

    def settled(self, tag: int) -> None:
        """``tag`` was rejected or nacked (frame written): a later multiple ack may cover it."""
        self._book.settled(tag)
