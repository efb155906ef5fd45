"""AMQP 0-9-1 over a loopback socket, for the in-memory broker: frames in, :mod:`state` calls.

Speaking the protocol (framing by pamqp) means the code under test is the code in
production: aio-pika, aiormq, qworker's field codec, frame-size fitting, confirms. The
methods qworker uses are served; any other method closes the connection with
``540 NOT_IMPLEMENTED`` naming it, so new broker usage is noticed by the contract suite
instead of half-working.

Everything runs synchronously in ``data_received``: the state has no awaits, so a frame is
fully applied before the next one is read, like a single RabbitMQ queue process.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from datetime import datetime
from typing import Any

from pamqp import commands, frame, header, heartbeat
from pamqp.base import Frame
from pamqp.body import ContentBody
from pamqp.exceptions import UnmarshalingException

from qworker.testing.inmemory.state import (
    ChannelError,
    Consumer,
    Message,
    Queue,
    State,
    copy_properties,
)
from qworker.wire import LongLongInt

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
FRAME_MAX = 131072
CHANNEL_MAX = 2047
#: How late a busy quorum leader's passive declare is answered (RabbitMQ's stat timeout).
BUSY_STAT_SECONDS = 0.25

_SERVER_PROPERTIES: dict[str, Any] = {
    "product": "qworker in-memory broker",
    "version": "3.10 semantics",
    "capabilities": {
        "publisher_confirms": True,
        "exchange_exchange_bindings": True,
        "basic.nack": True,
        "consumer_cancel_notify": True,
        "connection.blocked": True,
        "consumer_priorities": True,
        "authentication_failure_close": True,
        "per_consumer_qos": True,
        "direct_reply_to": False,
    },
}


class ConnectionError_(Exception):
    """A hard error: the broker closes the connection with this code and text."""

    def __init__(self, code: int, text: str, method: Frame | None = None) -> None:
        super().__init__(text)
        self.code, self.text, self.method = code, text, method


class Channel:
    """One AMQP channel: its consumers, deliveries not yet settled, confirms."""

    def __init__(self, connection: AmqpConnection, number: int) -> None:
        self.connection = connection
        self.number = number
        self.state = connection.state
        self.consumers: dict[str, Consumer] = {}
        self.unacked: dict[int, tuple[Queue, Message, Consumer | None]] = {}
        self._tags = itertools.count(1)
        self._consumer_tags = itertools.count(1)
        self.prefetch = 0  # for consumers created from now on (global=False)
        self.channel_prefetch = 0  # global=True: all consumers of the channel together
        self.confirming = False
        self._published = 0
        self.closing = False  # the broker sent Channel.Close, waiting for CloseOk
        self._publish: commands.Basic.Publish | None = None
        self._header: header.ContentHeader | None = None
        self._body: list[bytes] = []
        self._received = 0

    # Room for deliveries

    def has_room(self, consumer: Consumer) -> bool:
        if consumer.prefetch and consumer.unacked >= consumer.prefetch:
            return False
        if self.channel_prefetch:
            held = sum(1 for _, _, c in self.unacked.values() if c is not None)
            return held < self.channel_prefetch
        return True

    # Deliveries out

    def deliver(self, consumer: Consumer, message: Message) -> None:
        tag = next(self._tags)
        if not consumer.no_ack:
            self.unacked[tag] = (consumer.queue, message, consumer)
            consumer.unacked += 1
        method = commands.Basic.Deliver(
            consumer_tag=consumer.tag,
            delivery_tag=tag,
            redelivered=message.redelivered,
            exchange=message.exchange,
            routing_key=message.routing_key,
        )
        self.connection.send_content(self.number, method, message, consumer.queue)

    def cancelled_by_broker(self, consumer: Consumer) -> None:
        self.consumers.pop(consumer.tag, None)
        self.connection.send(self.number, commands.Basic.Cancel(consumer_tag=consumer.tag))

    # Frames in

    def on_frame(self, value: Any) -> None:
        if self.closing:
            if isinstance(value, commands.Channel.CloseOk):
                self.connection.channels.pop(self.number, None)
            return  # RabbitMQ ignores what arrives after it closed the channel
        if self._publish is not None:
            self._on_content(value)
            return
        if not isinstance(value, Frame):
            raise ConnectionError_(505, f"UNEXPECTED_FRAME - {type(value).__name__}")
        handler = self._METHODS.get(type(value))
        if handler is None:
            raise ConnectionError_(
                540, f"NOT_IMPLEMENTED - the in-memory broker does not serve {value.name}", value
            )
        try:
            handler(self, value)
        except ChannelError as exc:
            self.close_by_broker(exc.code, exc.text, value)

    def close_by_broker(self, code: int, text: str, method: Frame | None) -> None:
        self.connection.send(self.number, _closing(commands.Channel.Close, code, text, method))
        self.release()
        self.closing = True

    def release(self) -> None:
        """The channel is gone: cancel its consumers, give its deliveries back."""
        for consumer in list(self.consumers.values()):
            self._remove_consumer(consumer)
        pending = [(q, m) for _, (q, m, _c) in sorted(self.unacked.items())]
        self.unacked.clear()
        self.state.give_back(pending)

    def _remove_consumer(self, consumer: Consumer) -> None:
        self.consumers.pop(consumer.tag, None)
        queue = consumer.queue
        if consumer in queue.consumers:
            queue.consumers.remove(consumer)
        if queue.auto_delete and not queue.consumers and queue.name in self.state.queues:
            self.state.delete(queue)

    # Methods

    def _open(self, _: commands.Channel.Open) -> None:
        raise ConnectionError_(504, "CHANNEL_ERROR - second 'channel.open' seen")

    def _close(self, _: commands.Channel.Close) -> None:
        self.release()
        self.connection.channels.pop(self.number, None)
        self.connection.send(self.number, commands.Channel.CloseOk())

    def _close_ok(self, _: commands.Channel.CloseOk) -> None:
        self.connection.channels.pop(self.number, None)

    def _flow(self, method: commands.Channel.Flow) -> None:
        self.connection.send(self.number, commands.Channel.FlowOk(active=method.active))

    def _qos(self, method: commands.Basic.Qos) -> None:
        if method.global_:
            self.channel_prefetch = method.prefetch_count
        else:
            self.prefetch = method.prefetch_count
        self.connection.send(self.number, commands.Basic.QosOk())

    def _confirm_select(self, method: commands.Confirm.Select) -> None:
        self.confirming = True
        if not method.nowait:
            self.connection.send(self.number, commands.Confirm.SelectOk())

    def _declare(self, method: commands.Queue.Declare) -> None:
        queue = self.state.declare(
            method.queue or f"amq.gen-{next(_generated):022d}",
            passive=method.passive,
            durable=method.durable,
            exclusive=method.exclusive,
            auto_delete=method.auto_delete,
            arguments=dict(method.arguments or {}),
            owner=self.connection,
            named_by_broker=not method.queue,
        )
        if method.exclusive and queue.exclusive_owner is self.connection:
            self.connection.exclusive.add(queue.name)
        if method.passive and not method.nowait and self.state.busy(queue.name):
            # RabbitMQ's answer when a quorum leader misses the 250 ms of
            # rabbit_quorum_queue:stat/1: 0 messages and 0 consumers, late (at once when
            # there is no leader: MemoryBroker.leader_unavailable).
            asyncio.get_running_loop().call_later(
                self.state.stat_answer_after.get(queue.name, BUSY_STAT_SECONDS),
                self.connection.send,
                self.number,
                commands.Queue.DeclareOk(queue=queue.name, message_count=0, consumer_count=0),
            )
            return
        if not method.nowait:
            self.connection.send(
                self.number,
                commands.Queue.DeclareOk(
                    queue=queue.name,
                    message_count=queue.depth if queue.kind != "stream" else 0,
                    consumer_count=len(queue.consumers),
                ),
            )

    def _delete(self, method: commands.Queue.Delete) -> None:
        queue = self.state.queues.get(method.queue)
        count = 0
        if queue is not None:
            if method.if_unused and queue.consumers:
                raise ChannelError(
                    406, f"PRECONDITION_FAILED - queue '{queue.name}' in vhost '/' in use"
                )
            if method.if_empty and queue.depth:
                raise ChannelError(
                    406, f"PRECONDITION_FAILED - queue '{queue.name}' in vhost '/' not empty"
                )
            count = self.state.delete(queue)
        if not method.nowait:
            self.connection.send(self.number, commands.Queue.DeleteOk(message_count=count))

    def _purge(self, method: commands.Queue.Purge) -> None:
        count = self.state.purge(self.state.lookup(method.queue))
        if not method.nowait:
            self.connection.send(self.number, commands.Queue.PurgeOk(message_count=count))

    def _consume(self, method: commands.Basic.Consume) -> None:
        queue = self.state.lookup(method.queue)
        tag = method.consumer_tag or f"amq.ctag-{self.number}-{next(self._consumer_tags)}"
        if tag in self.consumers:
            raise ConnectionError_(530, f"NOT_ALLOWED - attempt to reuse consumer tag '{tag}'")
        consumer = Consumer(tag, queue, self, method.no_ack, self.prefetch)
        if queue.kind == "stream":
            if not self.prefetch and not self.channel_prefetch:
                raise ChannelError(
                    406, "PRECONDITION_FAILED - consumer prefetch count is not set for stream"
                )
            consumer.stream_next = _stream_start(queue, (method.arguments or {}))
        self.consumers[tag] = consumer
        queue.consumers.append(consumer)
        if not method.nowait:
            self.connection.send(self.number, commands.Basic.ConsumeOk(consumer_tag=tag))
        self.state.dispatch(queue)

    def _cancel(self, method: commands.Basic.Cancel) -> None:
        consumer = self.consumers.get(method.consumer_tag or "")
        if consumer is not None:
            self._remove_consumer(consumer)
        if not method.nowait:
            self.connection.send(
                self.number, commands.Basic.CancelOk(consumer_tag=method.consumer_tag)
            )

    def _get(self, method: commands.Basic.Get) -> None:
        queue = self.state.lookup(method.queue)
        message = self.state.get(queue)
        if message is None:
            self.connection.send(self.number, commands.Basic.GetEmpty())
            return
        tag = next(self._tags)
        if not method.no_ack:
            self.unacked[tag] = (queue, message, None)
            queue.unacked += 1
        ok = commands.Basic.GetOk(
            delivery_tag=tag,
            redelivered=message.redelivered,
            exchange=message.exchange,
            routing_key=message.routing_key,
            message_count=queue.depth,
        )
        self.connection.send_content(self.number, ok, message, queue, got=True)

    def _ack(self, method: commands.Basic.Ack) -> None:
        self._settle(method.delivery_tag, method.multiple, None)

    def _nack(self, method: commands.Basic.Nack) -> None:
        self._settle(method.delivery_tag, method.multiple, method.requeue)

    def _reject(self, method: commands.Basic.Reject) -> None:
        self._settle(method.delivery_tag or 0, False, method.requeue)

    def _recover(self, method: commands.Basic.Recover) -> None:
        pending = [(q, m) for _, (q, m, _c) in sorted(self.unacked.items())]
        for _q, _m, consumer in self.unacked.values():
            if consumer is not None:
                consumer.unacked -= 1
        self.unacked.clear()
        self.state.give_back(pending)
        self.connection.send(self.number, commands.Basic.RecoverOk())

    def _settle(self, tag: int, multiple: bool, requeue: bool | None) -> None:
        if not (multiple and tag == 0) and tag not in self.unacked:
            # Also with multiple: RabbitMQ's collect_acks must find the tag itself.
            raise ChannelError(406, f"PRECONDITION_FAILED - unknown delivery tag {tag}")
        tags = sorted(t for t in self.unacked if tag == 0 or t <= tag) if multiple else [tag]
        if any(self.unacked[t][0].name in self.state.drop_on_settle for t in tags):
            names = {self.unacked[t][0].name for t in tags} & self.state.drop_on_settle
            self.state.drop_on_settle -= names
            self.connection.lose()
            return
        touched: list[Queue] = []
        for t in tags:
            queue, message, consumer = self.unacked.pop(t)
            if consumer is not None:
                consumer.unacked -= 1
            self.state.settle(queue, message, requeue=requeue)
            if consumer is not None and consumer.queue not in touched:
                touched.append(consumer.queue)
        for queue in touched:  # room freed on this channel may serve other queues too
            self.state.dispatch(queue)
        if self.channel_prefetch:
            for consumer in list(self.consumers.values()):
                self.state.dispatch(consumer.queue)

    def _basic_publish(self, method: commands.Basic.Publish) -> None:
        if method.immediate:  # RabbitMQ dropped it in 3.0
            raise ConnectionError_(540, "NOT_IMPLEMENTED - immediate=true", method)
        self._publish, self._header, self._body, self._received = method, None, [], 0

    def _on_content(self, value: Any) -> None:
        if self._header is None:
            if not isinstance(value, header.ContentHeader):
                raise ConnectionError_(505, "UNEXPECTED_FRAME - expected content header")
            self._header = value
        elif isinstance(value, ContentBody):
            self._body.append(value.value)
            self._received += len(value.value)
        else:
            raise ConnectionError_(505, "UNEXPECTED_FRAME - expected content body")
        if self._received >= self._header.body_size:
            method, content = self._publish, self._header
            body = b"".join(self._body)
            self._publish, self._header, self._body = None, None, []
            assert method is not None
            try:
                self._published_message(method, content, body)
            except ChannelError as exc:
                self.close_by_broker(exc.code, exc.text, method)

    def _published_message(
        self, method: commands.Basic.Publish, content: header.ContentHeader, body: bytes
    ) -> None:
        if self.confirming:
            self._published += 1
        outcome = self.state.publish(method.exchange, method.routing_key, body, content.properties)
        if outcome == "unroutable" and method.mandatory:
            returned = commands.Basic.Return(
                reply_code=312,
                reply_text="NO_ROUTE",
                exchange=method.exchange,
                routing_key=method.routing_key,
            )
            message = Message(0, body, content.properties, method.exchange, method.routing_key)
            self.connection.send_content(self.number, returned, message, None)
        if self.confirming:
            confirm: Frame = (
                commands.Basic.Nack(delivery_tag=self._published)
                if outcome == "rejected"
                else commands.Basic.Ack(delivery_tag=self._published)
            )
            self.connection.send(self.number, confirm)

    _METHODS: dict[type, Callable[[Channel, Any], None]] = {
        commands.Channel.Open: _open,
        commands.Channel.Close: _close,
        commands.Channel.CloseOk: _close_ok,
        commands.Channel.Flow: _flow,
        commands.Basic.Qos: _qos,
        commands.Confirm.Select: _confirm_select,
        commands.Queue.Declare: _declare,
        commands.Queue.Delete: _delete,
        commands.Queue.Purge: _purge,
        commands.Basic.Consume: _consume,
        commands.Basic.Cancel: _cancel,
        commands.Basic.Get: _get,
        commands.Basic.Ack: _ack,
        commands.Basic.Nack: _nack,
        commands.Basic.Reject: _reject,
        commands.Basic.Recover: _recover,
        commands.Basic.Publish: _basic_publish,
    }


_generated = itertools.count(1)


def _stream_start(queue: Queue, arguments: dict[str, Any]) -> int:
    """Where a stream consumer starts (``x-stream-offset``): first, last, next or a number."""
    offset = arguments.get("x-stream-offset", "next")
    if offset == "first":
        return 0
    if offset == "last":
        return max(0, len(queue.log) - 1)
    if isinstance(offset, int) and not isinstance(offset, bool):
        return max(0, min(offset, len(queue.log)))
    if isinstance(offset, datetime):  # the first record appended at or after it
        since = offset.timestamp()
        return next((m.offset for m in queue.log if m.stored_at >= since), len(queue.log))
    return len(queue.log)  # "next"


class AmqpConnection(asyncio.Protocol):
    """One client connection."""

    def __init__(self, state: State, on_close: Callable[[AmqpConnection], None]) -> None:
        self.state = state
        self.channels: dict[int, Channel] = {}
        self.exclusive: set[str] = set()
        self.frame_max = FRAME_MAX
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._opened = False
        self._closed = False
        self._heartbeat: asyncio.TimerHandle | None = None
        self._heartbeat_interval = 0.0
        self._on_close = on_close

    # asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if not self._opened:
            if len(self._buffer) < 8:
                return
            if bytes(self._buffer[:8]) != PROTOCOL_HEADER:
                self._write(PROTOCOL_HEADER)
                self.lose()
                return
            del self._buffer[:8]
            self._opened = True
            self.send(0, commands.Connection.Start(server_properties=_SERVER_PROPERTIES))
        while self._buffer and not self._closed:
            try:
                used, number, value = frame.unmarshal(bytes(self._buffer))
            except UnmarshalingException as exc:
                if not _complete(self._buffer):
                    return  # wait for the rest of the frame
                self._close_by_broker(501, f"FRAME_ERROR - {exc}"[:255], None)
                return
            except Exception as exc:  # pamqp could not read a complete frame
                self._close_by_broker(501, f"FRAME_ERROR - {exc!r}"[:255], None)
                return
            del self._buffer[:used]
            try:
                self._on_frame(number, value)
            except ConnectionError_ as exc:
                self._close_by_broker(exc.code, exc.text, exc.method)
            except Exception as exc:
                # A bug of this broker: say so on the connection (the test fails with the
                # reason) rather than leave the client waiting for an answer.
                self._close_by_broker(541, f"INTERNAL_ERROR - in-memory broker: {exc!r}", None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()

    # Frames

    def _on_frame(self, number: int, value: Any) -> None:
        if isinstance(value, heartbeat.Heartbeat):
            return
        if number == 0:
            self._on_connection_method(value)
            return
        channel = self.channels.get(number)
        if channel is None:
            if isinstance(value, commands.Channel.Open):
                self.channels[number] = Channel(self, number)
                self.send(number, commands.Channel.OpenOk())
                return
            if isinstance(value, commands.Channel.CloseOk):
                return
            raise ConnectionError_(504, f"CHANNEL_ERROR - expected 'channel.open' on {number}")
        channel.on_frame(value)

    def _on_connection_method(self, value: Any) -> None:
        if isinstance(value, commands.Connection.StartOk):
            self.send(
                0,
                commands.Connection.Tune(channel_max=CHANNEL_MAX, frame_max=FRAME_MAX, heartbeat=0),
            )
        elif isinstance(value, commands.Connection.TuneOk):
            self.frame_max = min(value.frame_max or FRAME_MAX, FRAME_MAX)
            self._heartbeat_interval = max(1.0, value.heartbeat / 2) if value.heartbeat else 0.0
        elif isinstance(value, commands.Connection.Open):
            self.send(0, commands.Connection.OpenOk())
            if self._heartbeat_interval:  # from now on: a client waiting for OpenOk refuses it
                self._heartbeat = asyncio.get_running_loop().call_later(
                    self._heartbeat_interval, self._beat, self._heartbeat_interval
                )
        elif isinstance(value, commands.Connection.Close):
            self.send(0, commands.Connection.CloseOk())
            self.close()
        elif isinstance(value, commands.Connection.CloseOk):
            self.close()
        else:
            raise ConnectionError_(540, f"NOT_IMPLEMENTED - {getattr(value, 'name', value)}")

    def _beat(self, interval: float) -> None:
        """Send heartbeats: a client that hears nothing for three intervals gives up."""
        if self._closed:
            return
        self.send(0, heartbeat.Heartbeat())
        self._heartbeat = asyncio.get_running_loop().call_later(interval, self._beat, interval)

    def _close_by_broker(self, code: int, text: str, method: Frame | None) -> None:
        self.send(0, _closing(commands.Connection.Close, code, text, method))
        self._release()

    # Out

    def send(self, number: int, value: Any) -> None:
        self._write(frame.marshal(value, number))

    def send_content(
        self,
        number: int,
        method: Frame,
        message: Message,
        queue: Queue | None,
        *,
        got: bool = False,
    ) -> None:
        """A method with content (Deliver, GetOk, Return), split to the frame size.

        A quorum queue adds ``x-delivery-count`` once a message came back, and to every
        ``basic.get`` (0 the first time: 3.10 ``rabbit_fifo_client:dequeue/3``)."""
        properties = message.properties
        if queue is not None and queue.kind == "quorum" and (message.delivery_count or got):
            properties = _with_headers(properties, {"x-delivery-count": message.delivery_count})
        elif queue is not None and queue.kind == "stream":
            properties = _with_headers(properties, {"x-stream-offset": message.offset})
        body = message.body
        parts = [
            frame.marshal(method, number),
            frame.marshal(header.ContentHeader(0, len(body), properties), number),
        ]
        step = self.frame_max - 8
        for start in range(0, len(body), step):
            parts.append(frame.marshal(ContentBody(body[start : start + step]), number))
        self._write(b"".join(parts))

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._closed:
            self._transport.write(data)

    # Going away

    def close(self) -> None:
        """Close the socket after what was written (the end of a close handshake)."""
        if self._transport is not None:
            self._transport.close()
        self._release()

    def lose(self) -> None:
        """Drop the connection at once (no close handshake), as a network failure would."""
        if self._transport is not None:
            self._transport.abort()
        self._release()

    def _release(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        for channel in list(self.channels.values()):
            channel.release()
        self.channels.clear()
        for name in self.exclusive:
            queue = self.state.queues.get(name)
            if queue is not None and queue.exclusive_owner is self:
                self.state.delete(queue)
        self._on_close(self)


def _closing(
    kind: type[commands.Channel.Close] | type[commands.Connection.Close],
    code: int,
    text: str,
    method: Frame | None,
) -> Frame:
    """A channel.close or connection.close naming the method that caused it (if any)."""
    return kind(
        reply_code=code,
        reply_text=text[:255],  # a short string
        class_id=method.index >> 16 if method is not None else 0,
        method_id=method.index & 0xFFFF if method is not None else 0,
    )


def _complete(buffer: bytearray) -> bool:
    """The buffer holds a whole frame (so failing to read it is the frame's fault)."""
    if len(buffer) < 7:
        return False
    size = int.from_bytes(buffer[3:7], "big")
    return len(buffer) >= 7 + size + 1


def _with_headers(properties: commands.Basic.Properties, extra: dict[str, Any]) -> Any:
    copy = copy_properties(properties)
    headers = dict(properties.headers or {})
    headers.update({k: LongLongInt(v) for k, v in extra.items()})
    copy.headers = headers
    return copy
