"""One delivered message, read straight from aiormq.

aio-pika's ``IncomingMessage`` copies every property through its setters,
which cost about a sixth of a successful delivery; the consumer needs only
a few attributes and the delivery tag, so this view reads them lazily.
"""

from __future__ import annotations

from typing import Any

from aiormq.abc import AbstractChannel, DeliveredMessage
from pamqp.commands import Basic

from qworker.acking import ChannelAcks


class Delivery:
    """The body, properties and delivery of one message, and how to settle it."""

    __slots__ = (
        "_acked",
        "_acks",
        "_channel",
        "body",
        "delivery_tag",
        "exchange",
        "headers",
        "properties",
        "redelivered",
        "routing_key",
    )

    def __init__(self, raw: DeliveredMessage, acks: ChannelAcks | None = None) -> None:
        """
        Args:
            raw: The delivery as aiormq read it.
            acks: Its channel's acks, written together (see :mod:`qworker.acking`); without
                it, each ack is its own frame.
        """
        self.body: bytes = raw.body
        self.properties: Basic.Properties = raw.header.properties
        self.headers: dict[str, Any] = self.properties.headers or {}
        self.delivery_tag: int = raw.delivery_tag or 0
        self.exchange: str = raw.exchange or ""
        self.routing_key: str = raw.routing_key or ""
        #: The broker gave this message out before without an ack: the consumer that had it
        #: died, lost its channel, or gave it back (worker stopping, breaker open).
        self.redelivered: bool = bool(getattr(raw.delivery, "redelivered", False))
        self._channel: AbstractChannel = raw.channel
        self._acks = acks
        self._acked = False

    @property
    def message_id(self) -> str | None:
        return self.properties.message_id

    @property
    def correlation_id(self) -> str | None:
        return self.properties.correlation_id

    @property
    def content_type(self) -> str | None:
        return self.properties.content_type

    @property
    def content_encoding(self) -> str | None:
        return self.properties.content_encoding

    @property
    def channel_open(self) -> bool:
        """The channel it came on is open: settling it can still work."""
        return not self._channel.is_closed

    async def ack(self) -> None:
        """``basic.ack``; acks are not confirmed by AMQP, so the write is not awaited (with
        ``acks``, it goes with the other acks of this turn of the loop)."""
        if self._acks is None:
            await self._channel.basic_ack(self.delivery_tag, wait=False)
        else:
            self._acks.book(self.delivery_tag)
        self._acked = True

    async def nack(self, *, requeue: bool = True) -> None:
        """``basic.nack`` (requeue by default): not a failed delivery on RabbitMQ 4.3+.
        Nothing once acked (see :meth:`reject`)."""
        if self._acked:
            return
        await self._channel.basic_nack(self.delivery_tag, requeue=requeue, wait=False)
        if self._acks is not None:
            self._acks.settled(self.delivery_tag)

    async def reject(self) -> None:
        """``basic.reject`` with requeue: a failed delivery on every RabbitMQ version
        (a quorum queue counts it toward ``x-delivery-limit``).

        Nothing once acked: a delivery settles once. (Booked acks are written a turn of the
        loop later; a reject written before the ack would make the broker close the channel
        when the ack named a tag it no longer holds.)"""
        if self._acked:
            return
        await self._channel.basic_reject(self.delivery_tag, requeue=True, wait=False)
        if self._acks is not None:
            self._acks.settled(self.delivery_tag)

    def copy_properties(
        self, headers: dict[str, Any], expiration_ms: int | None
    ) -> Basic.Properties:
        """The properties of a copy of this message with new ``headers``.

        The original's own ``expiration`` is dropped (in a DLQ it would silently expire
        the dead letter) and so is ``user_id`` (the broker refuses a publish whose
        user_id is not the publisher's user, which would make the move fail forever).
        """
        p = self.properties
        return Basic.Properties(
            content_type=p.content_type,
            content_encoding=p.content_encoding,
            headers=headers,
            delivery_mode=p.delivery_mode,
            priority=p.priority,
            correlation_id=p.correlation_id,
            reply_to=p.reply_to,
            expiration=str(expiration_ms) if expiration_ms is not None else None,
            message_id=p.message_id,
            timestamp=p.timestamp,
            message_type=p.message_type,
            app_id=p.app_id,
            cluster_id=p.cluster_id,
        )


def message_fields(message: Delivery) -> dict[str, Any]:
    """The ids every message event carries (``request_id``: the correlation id, under the
    name request-tracing tools look for)."""
    correlation_id = message.correlation_id
    return {
        "message_id": message.message_id,
        "correlation_id": correlation_id,
        "request_id": correlation_id,
    }
