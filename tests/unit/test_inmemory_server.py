"""The in-memory broker's protocol edges (loopback socket, no RabbitMQ): what it does with
frames it cannot read and methods it does not serve. Its RabbitMQ semantics are proven in
tests/contract/."""

from __future__ import annotations

import asyncio

import aio_pika
import aiormq
import pytest

from qworker.testing import MemoryBroker


async def read_close(reader: asyncio.StreamReader) -> bytes:
    """Read until the broker's connection.close frame has arrived."""
    data = b""
    while b"\x00\x0a\x00\x32" not in data:  # class 10 (connection), method 50 (close)
        chunk = await asyncio.wait_for(reader.read(4096), 2)
        if not chunk:
            break
        data += chunk
    return data


async def test_a_frame_it_cannot_read_closes_that_connection_with_501_and_no_other() -> None:
    async with MemoryBroker() as broker:
        reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
        writer.write(b"AMQP\x00\x00\x09\x01")
        await reader.read(4096)  # connection.start
        writer.write(b"\x01\x00\x00\x00\x00\x00\x04abcd\xff")  # frame end must be 0xCE
        assert b"FRAME_ERROR" in await read_close(reader)
        writer.close()
        connection = await aio_pika.connect(broker.url)
        channel = await connection.channel()
        declared = await channel.declare_queue("still-serving")
        assert declared.name == "still-serving"
        await connection.close()


async def test_a_method_it_does_not_serve_closes_the_connection_naming_it() -> None:
    async with MemoryBroker() as broker:
        connection = await aiormq.connect(broker.url)
        channel = await connection.channel()
        # aiormq raises ConnectionNotImplemented for reply code 540 only.
        with pytest.raises(aiormq.exceptions.ConnectionNotImplemented) as closed:
            await channel.exchange_declare("events", exchange_type="topic")
        assert "does not serve Exchange.Declare" in str(closed.value)
        await connection.close()


async def test_publish_with_immediate_closes_the_connection_540_as_rabbitmq_does() -> None:
    async with MemoryBroker() as broker:
        connection = await aiormq.connect(broker.url)
        channel = await connection.channel()
        with pytest.raises(aiormq.exceptions.ConnectionNotImplemented) as closed:
            await channel.basic_publish(b"x", routing_key="q", immediate=True)
            await channel.queue_declare("", exclusive=True)  # the close arrives instead
        assert str(closed.value) == "NOT_IMPLEMENTED - immediate=true"
        other = await aiormq.connect(broker.url)
        server_named = await (await other.channel()).queue_declare("", exclusive=True)
        await other.close()
        assert str(server_named.queue).startswith("amq.gen-")


def _pika_session(url: str, seen: list[object]) -> None:
    """A blocking pika client (another AMQP implementation than aiormq) in its own thread."""
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.confirm_delivery()
    channel.queue_declare("p", durable=True, arguments={"x-queue-type": "quorum"})
    properties = pika.BasicProperties(headers={"n": 1, "l": [1, "a"]}, message_id="pm")
    channel.basic_publish("", "p", b"hello", properties, mandatory=True)
    try:
        channel.basic_publish("", "missing", b"x", mandatory=True)
    except pika.exceptions.UnroutableError as exc:
        seen.append(("unroutable", len(exc.messages)))
    method, got, body = channel.basic_get("p", auto_ack=False)
    seen.append((body, got.message_id, got.headers, method.redelivered))
    channel.basic_nack(method.delivery_tag, requeue=True)
    method, got, body = channel.basic_get("p", auto_ack=True)
    seen.append((body, method.redelivered, got.headers["x-delivery-count"]))
    connection.close()


async def test_a_pika_client_is_served_like_aiormq() -> None:
    async with MemoryBroker() as broker:
        seen: list[object] = []
        await asyncio.wait_for(asyncio.to_thread(_pika_session, broker.url, seen), 10)
    assert seen == [
        ("unroutable", 1),
        (b"hello", "pm", {"n": 1, "l": [1, "a"], "x-delivery-count": 0}, False),
        (b"hello", True, 1),
    ]
