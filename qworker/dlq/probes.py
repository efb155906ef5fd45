"""Probes of a queue that change nothing: does it exist, how deep is it, what kind is it.

Each probe uses a throwaway channel, because a failed (passive) declare closes its channel.
"""

from __future__ import annotations

import contextlib
import enum

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection

from qworker.errors import QworkerError
from qworker.topology import dead_letter_queue


class QueueNotFound(QworkerError):
    """The queue does not exist (the broker answered 404 to a passive declare)."""


class Safety(enum.Enum):
    """Whether reading a DLQ can count against a delivery limit.

    ``CLASSIC`` and ``QUORUM`` are DLQs declared as qworker declares them: a
    classic queue counts no deliveries, and qworker's quorum DLQs have a
    delivery limit of a billion. ``UNVERIFIED`` is a queue declared with other
    arguments: if it is a quorum queue, each read may count as a delivery (on
    RabbitMQ 4.0 to 4.2, where the default limit is 20, every returned message counts).
    """

    CLASSIC = "classic"
    QUORUM = "quorum"
    UNVERIFIED = "unverified"


async def close_channel_quietly(channel: AbstractChannel) -> None:
    """Close ``channel`` unless it is closed already; a channel lost meanwhile is no error."""
    if not channel.is_closed:
        with contextlib.suppress(aiormq.exceptions.AMQPError, ConnectionError, RuntimeError):
            await channel.close()


async def queue_depth(connection: AbstractConnection, name: str) -> int:
    """Ready messages in ``name``; raises :class:`QueueNotFound` if it does not exist.

    Uses a throwaway channel, because a failed passive declare closes its channel.
    """
    channel = await connection.channel(publisher_confirms=False)
    try:
        declared = await channel.declare_queue(name, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise QueueNotFound(f"queue {name!r} not found") from None
    finally:
        await close_channel_quietly(channel)
    return int(declared.declaration_result.message_count or 0)


async def safety(connection: AbstractConnection, name: str) -> Safety:
    """Check an existing queue's arguments by re-declaring it as qworker declares DLQs.

    The broker accepts a declaration only when the arguments are equivalent
    (``x-queue-type`` and ``x-delivery-limit`` included), so acceptance proves
    the queue's kind. Call it only after :func:`queue_depth` found the queue.
    """
    for kind in (Safety.QUORUM, Safety.CLASSIC):
        arguments = dead_letter_queue(name, kind.value).arguments
        channel = await connection.channel(publisher_confirms=False)
        try:
            await channel.declare_queue(name, durable=True, arguments=arguments)
            return kind
        except aiormq.exceptions.ChannelClosed:
            continue
        finally:
            await close_channel_quietly(channel)
    return Safety.UNVERIFIED
