"""Publishing with publisher confirms, where 'done' means the broker has the message.

Every path that moves a message publishes through :class:`ConfirmedPublisher`
and acks the original only when :meth:`ConfirmedPublisher.publish` returned.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypedDict, cast

import aio_pika
import aiormq
import pydantic
import structlog
from aio_pika.abc import AbstractChannel, DeliveryMode
from aiormq.abc import DeliveredMessage
from pamqp.header import ContentHeader

from qworker.errors import PublishFailed
from qworker.headers import fit_frame

DEFAULT_CONFIRM_TIMEOUT = 10.0
JSON = "application/json"


class ConfirmedPublisher:
    """Publishes on one confirm-mode channel; raises :class:`PublishFailed` unless confirmed.

    The broker reports an unroutable message (``basic.return``) by message id, so
    two publishes with the same id in flight on one channel could be confused;
    such publishes are serialised here.
    """

    def __init__(self, channel: AbstractChannel, timeout: float = DEFAULT_CONFIRM_TIMEOUT) -> None:
        self.channel = channel
        self._timeout = timeout
        self._in_flight: dict[str, asyncio.Future[None]] = {}

    async def publish(
        self, message: aio_pika.Message, routing_key: str, *, exchange: str = ""
    ) -> None:
        """Publish ``message`` (mandatory) and wait for the broker's ack."""
        await self.publish_body(message.body, message.properties, routing_key, exchange=exchange)

    async def publish_body(
        self,
        body: bytes,
        properties: aiormq.spec.Basic.Properties,
        routing_key: str,
        *,
        exchange: str = "",
        patient: bool = False,
    ) -> None:
        """Publish ``body`` with ``properties`` (mandatory) and wait for the broker's ack.

        Args:
            body: The message body.
            properties: Its properties (a message id is added when missing).
            routing_key: The queue, or the routing key on ``exchange``.
            exchange: The exchange; the default exchange routes by queue name.
            patient: Without it, the confirm must come within the timeout, not counting
                the time the connection is blocked by a broker alarm (waiting, not
                failing), or :class:`PublishFailed` is raised. With it (for copies of
                delivered messages): the headers are made to fit the connection's frame
                size (see :func:`qworker.headers.fit_frame`), and the confirm is awaited as
                long as the channel lives, logging ``publish.confirm_slow`` once the timeout
                has passed. Failing would give the original back while the copy may still be
                confirmed, which duplicates the message; the broker confirms, refuses, or
                closes the channel, and heartbeats detect a dead connection.
        """
        if properties.message_id is None:
            properties.message_id = uuid.uuid4().hex
        key = properties.message_id
        while (earlier := self._in_flight.get(key)) is not None:
            await asyncio.shield(earlier)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._in_flight[key] = done
        try:
            await self._publish(body, properties, routing_key, exchange, patient)
        finally:
            del self._in_flight[key]
            done.set_result(None)

    async def _publish(
        self,
        body: bytes,
        properties: aiormq.spec.Basic.Properties,
        routing_key: str,
        exchange: str,
        patient: bool,
    ) -> None:
        where = f"exchange {exchange!r} routing key {routing_key!r}"
        slow = (
            asyncio.get_running_loop().call_later(self._timeout, _log_slow, where)
            if patient
            else None
        )
        try:
            # The concrete channel: the abstract one does not declare ``wait``.
            underlay = cast(aiormq.Channel, await self.channel.get_underlay_channel())
            if patient and properties.headers:
                properties.headers = fit_frame(
                    properties.headers, _header_frame_size(properties), underlay.max_content_size
                )
            publishing = underlay.basic_publish(
                body,
                exchange=exchange,
                routing_key=routing_key,
                properties=properties,
                mandatory=True,
                timeout=None,
                # The broker's confirm is what we wait for; waiting for the socket write
                # first only adds a round through the event loop.
                wait=False,
            )
            if patient:
                result = await publishing
            else:
                result = await self._confirmed_in_time(publishing, underlay)
        except TimeoutError:
            raise PublishFailed(f"no confirm within {self._timeout:g}s for {where}") from None
        except aiormq.exceptions.DeliveryError as exc:
            raise PublishFailed(
                f"broker refused the message ({where}): {exc!r}", refused=True
            ) from None
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            raise PublishFailed(f"channel lost while publishing to {where}: {exc!r}") from None
        except (TypeError, ValueError, OverflowError) as exc:  # pamqp could not encode it
            raise PublishFailed(f"cannot encode the message for {where}: {exc}") from None
        finally:
            if slow is not None:
                slow.cancel()
        if isinstance(result, DeliveredMessage):
            raise PublishFailed(f"unroutable: no queue for {where}")
        if not isinstance(result, aiormq.spec.Basic.Ack):
            raise PublishFailed(f"broker did not ack ({where}): {result!r}")

    async def _confirmed_in_time(
        self,
        publishing: Awaitable[aiormq.abc.ConfirmationFrameType | None],
        channel: aiormq.Channel,
    ) -> aiormq.abc.ConfirmationFrameType | None:
        """Await the confirm; the timeout clock runs only while the connection is not blocked."""
        waiter = asyncio.ensure_future(publishing)
        try:
            while True:
                done, _ = await asyncio.wait({waiter}, timeout=self._timeout)
                if done:
                    return waiter.result()
                if not blocked(channel.connection):
                    raise TimeoutError
        finally:
            if not waiter.done():
                waiter.cancel()


def encode_payload(payload: Any) -> tuple[bytes, str | None]:
    """A payload as (body, content type): models and dict/list as JSON, str as UTF-8."""
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload), None
    if isinstance(payload, str):
        return payload.encode("utf-8"), "text/plain"
    if isinstance(payload, pydantic.BaseModel):
        return payload.model_dump_json().encode("utf-8"), JSON
    return json.dumps(payload, separators=(",", ":")).encode("utf-8"), JSON


class PublishOptions(TypedDict, total=False):
    """The keyword options of :meth:`qworker.App.publish` and :meth:`qworker.Context.publish`.

    Args:
        exchange: The exchange to publish to; the default exchange (``""``) routes by queue
            name, so the first argument is then the queue.
        headers: Message headers (any AMQP field values; see :mod:`qworker.wire`).
        message_id: The message id (default: a new uuid4).
        correlation_id: The correlation id (``ctx.publish`` defaults it to the delivery's
            correlation id, else its message id).
    """

    exchange: str
    headers: Mapping[str, Any] | None
    message_id: str | None
    correlation_id: str | None


def build_message(
    payload: Any,
    *,
    headers: Mapping[str, Any] | None = None,
    message_id: str | None = None,
    correlation_id: str | None = None,
) -> aio_pika.Message:
    """A persistent message with a message id (uuid4 unless given) and a timestamp."""
    body, content_type = encode_payload(payload)
    return aio_pika.Message(
        body,
        headers=dict(headers or {}),
        content_type=content_type,
        delivery_mode=DeliveryMode.PERSISTENT,
        message_id=message_id or str(uuid.uuid4()),
        correlation_id=correlation_id,
        timestamp=datetime.now(UTC),
    )


def blocked(connection: aiormq.abc.AbstractConnection) -> bool:
    """The broker blocked this connection (``connection.blocked``: a memory or disk alarm).

    aiormq keeps the state in a private event that its own ``ready()`` waits on; a unit test
    pins the attribute, so that an aiormq release that renames it fails a test instead of
    silently turning alarm waits into publish failures.
    """
    unblocked = getattr(connection, "_Connection__connection_unblocked", None)
    return isinstance(unblocked, asyncio.Event) and not unblocked.is_set()


def _log_slow(where: str) -> None:
    structlog.get_logger("qworker").warning(
        "publish.confirm_slow",
        target=where,
        note="still waiting for the broker's confirm (a memory or disk alarm blocks publishers)",
    )


def _header_frame_size(properties: aiormq.spec.Basic.Properties) -> Callable[[dict[str, Any]], int]:
    """The exact size of the content-header frame payload of ``properties`` with other headers."""

    def size(headers: dict[str, Any]) -> int:
        properties.headers = headers
        return len(ContentHeader(0, 0, properties).marshal())

    return size
