"""Broker-semantics contract: the same raw-client scripts against RabbitMQ and the MemoryBroker.

Every test runs twice, on ``memory`` (``qworker.testing.MemoryBroker``) and on
``rabbitmq`` (the real broker, 3.10 on the development machines, of ``broker_url``). The
expected values are what RabbitMQ 3.10 does; a test that fails on ``memory`` only is a bug
of the in-memory broker, never a reason to skip.

The scripts use aiormq (the layer under aio-pika) so that every frame is visible: the
``*Ok`` methods with their counts, confirms, returns, channel closes with their reply codes.
Importing qworker installs its type-preserving field codec (``qworker.wire``), so header
values decode to classes that remember their AMQP type (``LongLongInt`` for ``l``, ...).

Where RabbitMQ 3.10 and 4.x differ, the tests check what both do and say what differs,
citing the rabbitmq-server source (tags v3.10.8 and v4.1.0).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import struct
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any

import aiormq
import pytest
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic, Queue

import qworker  # noqa: F401  (installs the qworker.wire codec into pamqp)
from qworker.wire import (
    Float32,
    LongBytes,
    LongInt,
    LongLongInt,
    LongUInt,
    RawTimestamp,
    ShortInt,
    ShortShortInt,
    ShortShortUInt,
    ShortUInt,
    Timestamp,
    encode_table,
    encode_value,
)

#: Added to a sleep on RabbitMQ so that a TTL has certainly run out and its dead-lettering
#: has happened (classic queues expire on a timer; quorum queues on the next command).
MARGIN = 0.25
#: How long ``settle`` waits on RabbitMQ before asserting that something did *not* happen.
SETTLE = 0.2
#: How long ``until`` polls for something that must happen.
TIMEOUT = 10.0

QUEUE_TYPES = ["classic", "quorum"]


class Backend:
    """One broker under test: its URL, and its notion of time passing."""

    def __init__(self, kind: str, url: str, memory: Any = None) -> None:
        self.kind = kind
        self.url = url
        self.memory = memory

    async def elapse(self, seconds: float) -> None:
        """Let ``seconds`` pass for the broker (virtual on memory, real plus a margin)."""
        if self.memory is not None:
            await self.memory.quiesce()
            await self.memory.advance(seconds)
            await self.memory.quiesce()
        else:
            await asyncio.sleep(seconds + MARGIN)

    async def settle(self) -> None:
        """Let in-flight frames arrive, before asserting that something did not happen."""
        if self.memory is not None:
            await self.memory.quiesce()
        else:
            await asyncio.sleep(SETTLE)


@pytest.fixture(
    params=[
        pytest.param("memory", id="memory"),
        pytest.param("rabbitmq", id="rabbitmq", marks=pytest.mark.rabbitmq),
    ]
)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "memory":
        from qworker.testing import MemoryBroker

        async with MemoryBroker() as broker:
            yield Backend("memory", broker.url, broker)
    else:
        yield Backend("rabbitmq", request.getfixturevalue("broker_url"))


class Session:
    """A connection to the backend that declares ``test.<hex>`` queues and deletes them all."""

    def __init__(self, backend: Backend, connection: aiormq.abc.AbstractConnection) -> None:
        self.backend = backend
        self.connection = connection
        self.names: list[str] = []

    async def channel(self) -> aiormq.abc.AbstractChannel:
        return await self.connection.channel()

    def name(self) -> str:
        name = f"test.{uuid.uuid4().hex[:12]}"
        self.names.append(name)
        return name

    async def declare(
        self,
        channel: aiormq.abc.AbstractChannel,
        queue_type: str = "classic",
        name: str | None = None,
        **arguments: Any,
    ) -> str:
        """Declare a durable queue of ``queue_type`` with ``x-...`` arguments; its name."""
        name = name or self.name()
        args = {key.replace("_", "-"): value for key, value in arguments.items()}
        if queue_type != "classic":
            args["x-queue-type"] = queue_type
        declared = await channel.queue_declare(name, durable=True, arguments=args)
        assert (declared.queue, declared.message_count, declared.consumer_count) == (name, 0, 0)
        return name

    async def cleanup(self) -> None:
        channel = await self.connection.channel()
        for name in dict.fromkeys(self.names):
            try:
                await channel.queue_delete(name)
            except aiormq.exceptions.AMQPError:
                channel = await self.connection.channel()


@pytest.fixture
async def session(backend: Backend) -> AsyncIterator[Session]:
    connection = await aiormq.connect(backend.url)
    session = Session(backend, connection)
    try:
        yield session
    finally:
        try:
            await session.cleanup()
        finally:
            await connection.close()


# Small helpers.


def props(**kwargs: Any) -> Basic.Properties:
    return Basic.Properties(**kwargs)


async def publish(
    channel: aiormq.abc.AbstractChannel,
    queue: str,
    body: bytes,
    properties: Basic.Properties | None = None,
) -> None:
    """Publish to ``queue`` through the default exchange; the broker must ack it."""
    confirm = await channel.basic_publish(
        body, routing_key=queue, properties=properties or props(message_id=body.hex() or "-")
    )
    assert isinstance(confirm, Basic.Ack)


async def until(
    backend: Backend, check: Callable[[], Any | Awaitable[Any]], what: str = "condition"
) -> Any:
    """Poll ``check`` until it returns a true value (also on memory, where time is virtual)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        if backend.memory is not None:
            await backend.memory.quiesce()
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached in {TIMEOUT} s")
        await asyncio.sleep(0.02)


async def get(
    channel: aiormq.abc.AbstractChannel, queue: str, no_ack: bool = False
) -> DeliveredMessage:
    """basic.get that must return a message (GetOk)."""
    message = await channel.basic_get(queue, no_ack=no_ack)
    assert isinstance(message.delivery, Basic.GetOk), f"{queue}: GetEmpty"
    return message


async def get_eventually(
    backend: Backend, channel: aiormq.abc.AbstractChannel, queue: str
) -> DeliveredMessage:
    """basic.get (no_ack) polled until a message is there (dead-lettering is asynchronous)."""

    async def attempt() -> DeliveredMessage | None:
        message = await channel.basic_get(queue, no_ack=True)
        return message if isinstance(message.delivery, Basic.GetOk) else None

    return await until(backend, attempt, f"a message in {queue}")


async def assert_empty(channel: aiormq.abc.AbstractChannel, queue: str) -> None:
    message = await channel.basic_get(queue, no_ack=True)
    assert isinstance(message.delivery, Basic.GetEmpty), f"{queue}: {message.body!r}"


async def count(channel: aiormq.abc.AbstractChannel, queue: str) -> tuple[int, int]:
    """(message_count, consumer_count) of a passive declare."""
    declared = await channel.queue_declare(queue, passive=True)
    return declared.message_count, declared.consumer_count


class Consumer:
    """basic.consume into a list (manual ack unless ``no_ack``)."""

    def __init__(self) -> None:
        self.messages: list[DeliveredMessage] = []
        self.tag = ""

    async def on_message(self, message: DeliveredMessage) -> None:
        self.messages.append(message)

    @property
    def bodies(self) -> list[bytes]:
        return [m.body for m in self.messages]

    async def start(
        self,
        channel: aiormq.abc.AbstractChannel,
        queue: str,
        no_ack: bool = False,
        arguments: dict[str, Any] | None = None,
    ) -> Consumer:
        ok = await channel.basic_consume(
            queue, self.on_message, no_ack=no_ack, arguments=arguments or {}
        )
        self.tag = ok.consumer_tag
        return self


def assert_recent(stamp: Any) -> None:
    """An x-death ``time``: a ``T`` timestamp in whole seconds, close to the wall clock."""
    assert isinstance(stamp, Timestamp)
    assert abs(stamp.raw - time.time()) < 10, stamp.raw


def death(queue: str, reason: str, count: int = 1, **extra: Any) -> dict[str, Any]:
    """An expected x-death entry, without its ``time``, for a message published to ``queue``
    through the default exchange."""
    return {
        "count": count,
        "reason": reason,
        "queue": queue,
        "exchange": "",
        "routing-keys": [queue],
        **extra,
    }


def check_deaths(headers: dict[str, Any], expected: list[dict[str, Any]]) -> None:
    """x-death equals ``expected`` (in order), each ``time`` recent, ``count`` typed ``l``."""
    deaths = headers["x-death"]
    assert isinstance(deaths, list)
    for entry in deaths:
        assert_recent(entry["time"])
        assert type(entry["count"]) is LongLongInt, type(entry["count"])
    assert [{k: v for k, v in e.items() if k != "time"} for e in deaths] == expected


def first_death(queue: str, reason: str) -> dict[str, str]:
    """The x-first-death-* headers 3.10 writes (x-last-death-* are 3.13+, see below)."""
    return {
        "x-first-death-exchange": "",
        "x-first-death-queue": queue,
        "x-first-death-reason": reason,
    }


def version(session: Session) -> tuple[int, int]:
    """(major, minor) of the version the broker announces (the MemoryBroker says 3.10)."""
    announced = str(session.connection.server_properties.get("version", ""))
    found = re.match(r"(\d+)\.(\d+)", announced)
    assert found, announced
    return int(found[1]), int(found[2])


def x_headers_of_a_death(session: Session, queue: str, reason: str) -> dict[str, Any]:
    """The x- headers besides x-death after one dead-lettering: x-first-death-* on every
    version; x-last-death-* too from 3.13 on (v3.10.8 rabbit_dead_letter.erl writes only the
    first-death ones; v4.1.0 mc.erl, record_death/3, writes both)."""
    first = first_death(queue, reason)
    if version(session) < (3, 13):
        return first
    return {**first, **{k.replace("first", "last"): v for k, v in first.items()}}


def only(headers: dict[str, Any] | None, prefix: str = "x-") -> dict[str, Any]:
    return {k: v for k, v in (headers or {}).items() if k.startswith(prefix)}


def closed(error: BaseException) -> Basic.Return:
    """The reply code and text of the channel.close behind an aiormq exception (aiormq picks
    the exception class by the reply code, and keeps the text as its argument)."""
    codes = {cls: code for code, cls in aiormq.channel.EXCEPTION_MAPPING.items()}
    return Basic.Return(reply_code=codes[type(error)], reply_text=error.args[0])


# Routing, declaring, and the counts of the *Ok methods.


@pytest.mark.parametrize("queue_type", QUEUE_TYPES)
async def test_default_exchange_routes_by_queue_name(session: Session, queue_type: str) -> None:
    channel = await session.channel()
    queue = await session.declare(channel, queue_type)
    other = await session.declare(channel, queue_type)
    await publish(channel, queue, b"one", props(message_id="m1", content_type="text/plain"))
    message = await get(channel, queue)
    assert message.body == b"one"
    assert message.delivery.exchange == ""
    assert message.delivery.routing_key == queue
    assert message.delivery.redelivered is False
    assert message.delivery.message_count == 0
    assert message.header.properties.message_id == "m1"
    assert message.header.properties.content_type == "text/plain"
    await channel.basic_ack(message.delivery.delivery_tag)
    assert await count(channel, other) == (0, 0)


async def test_declare_ok_counts_ready_messages_and_consumers(session: Session) -> None:
    channel = await session.channel()
    queue = await session.declare(channel)
    for body in (b"a", b"b", b"c"):
        await publish(channel, queue, body)
    declared = await channel.queue_declare(queue, durable=True)
    assert (declared.queue, declared.message_count, declared.consumer_count) == (queue, 3, 0)

    consuming = await session.channel()
    await consuming.basic_qos(prefetch_count=1)
    consumer = await Consumer().start(consuming, queue)
    await until(session.backend, lambda: len(consumer.messages) == 1, "one delivery")
    # message_count counts ready messages only: the unacked one is not in it.
    assert await count(channel, queue) == (2, 1)
    await consuming.basic_cancel(consumer.tag)
    assert await count(channel, queue) == (2, 0)
    await consuming.close()
    assert await count(channel, queue) == (3, 0)


@pytest.mark.parametrize(
    ("first", "second", "argument"),
    [
        ({"x-message-ttl": 1000}, {"x-message-ttl": 2000}, "x-message-ttl"),
        ({"x-message-ttl": 1000}, {}, "x-message-ttl"),
        ({}, {"x-dead-letter-exchange": ""}, "x-dead-letter-exchange"),
        (
            {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "a"},
            {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "b"},
            "x-dead-letter-routing-key",
        ),
        ({"x-max-length": 1}, {"x-max-length": 2}, "x-max-length"),
        (
            {"x-max-length": 1, "x-overflow": "reject-publish"},
            {"x-max-length": 1},
            "x-overflow",
        ),
        ({"x-queue-type": "quorum"}, {"x-queue-type": "classic"}, "x-queue-type"),
    ],
    ids=["ttl-changed", "ttl-dropped", "dlx-added", "dlrk-changed", "maxlen", "overflow", "type"],
)
async def test_redeclare_with_other_arguments_closes_the_channel_406(
    session: Session, first: dict[str, Any], second: dict[str, Any], argument: str
) -> None:
    channel = await session.channel()
    queue = session.name()
    await channel.queue_declare(queue, durable=True, arguments=first)
    with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed) as failed:
        await channel.queue_declare(queue, durable=True, arguments=second)
    close = closed(failed.value)
    assert close.reply_code == 406
    assert close.reply_text.startswith(
        f"PRECONDITION_FAILED - inequivalent arg '{argument}' for queue '{queue}' in vhost '/'"
    ), close.reply_text
    assert channel.is_closed
    # The connection survives; the queue is unchanged.
    channel = await session.channel()
    declared = await channel.queue_declare(queue, durable=True, arguments=first)
    assert (declared.message_count, declared.consumer_count) == (0, 0)


async def test_redeclare_with_other_durability_closes_the_channel_406(session: Session) -> None:
    channel = await session.channel()
    queue = await session.declare(channel)
    with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed) as failed:
        await channel.queue_declare(queue, durable=False)
    close = closed(failed.value)
    assert close.reply_code == 406
    assert close.reply_text == (
        f"PRECONDITION_FAILED - inequivalent arg 'durable' for queue '{queue}' in vhost '/': "
        "received 'false' but current is 'true'"
    )


async def test_passive_declare_of_a_missing_queue_closes_the_channel_404(
    session: Session,
) -> None:
    channel = await session.channel()
    queue = session.name()
    with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity) as failed:
        await channel.queue_declare(queue, passive=True)
    close = closed(failed.value)
    assert (close.reply_code, close.reply_text) == (
        404,
        f"NOT_FOUND - no queue '{queue}' in vhost '/'",
    )
    assert channel.is_closed
    with pytest.raises(aiormq.exceptions.ChannelInvalidStateError):
        await channel.queue_declare(queue, passive=True)
    # Other channels of the connection are not affected.
    channel = await session.channel()
    await session.declare(channel, name=queue)
    assert await count(channel, queue) == (0, 0)


# Publishing: confirms, returns, overflow.


async def test_mandatory_publish_to_a_missing_queue_is_returned_and_confirmed(
    session: Session,
) -> None:
    connection = session.connection
    channel = await connection.channel()
    channel.on_return_raises = False  # the confirm future then resolves to the return
    confirms: list[Any] = []
    original = channel._on_confirm_frame

    async def record(frame: Any) -> None:
        confirms.append(frame)
        await original(frame)

    channel._on_confirm_frame = record  # type: ignore[method-assign]
    missing = session.name()
    returned = await channel.basic_publish(
        b"lost", routing_key=missing, mandatory=True, properties=props(message_id="r1")
    )
    assert isinstance(returned, DeliveredMessage)
    assert isinstance(returned.delivery, Basic.Return)
    assert (returned.delivery.reply_code, returned.delivery.reply_text) == (312, "NO_ROUTE")
    assert (returned.delivery.exchange, returned.delivery.routing_key) == ("", missing)
    assert returned.body == b"lost"
    assert returned.header.properties.message_id == "r1"
    # basic.return comes first, then the ack of the same publish (an unroutable message is
    # confirmed as soon as the exchange finds no queue).
    await until(session.backend, lambda: len(confirms) == 1, "the confirm of a return")
    assert isinstance(confirms[0], Basic.Ack)
    assert (confirms[0].delivery_tag, confirms[0].multiple) == (1, False)

    # Not mandatory: dropped silently, and still acked.
    confirm = await channel.basic_publish(b"dropped", routing_key=missing)
    assert isinstance(confirm, Basic.Ack)
    assert confirm.delivery_tag == 2
    # A routable publish on the same channel: the next sequence number.
    queue = await session.declare(channel)
    confirm = await channel.basic_publish(b"kept", routing_key=queue, mandatory=True)
    assert isinstance(confirm, Basic.Ack)
    assert confirm.delivery_tag == 3
    assert await count(channel, queue) == (1, 0)


async def test_reject_publish_overflow_nacks_the_publish_classic(session: Session) -> None:
    channel = await session.channel()
    queue = await session.declare(channel, x_max_length=2, x_overflow="reject-publish")
    await publish(channel, queue, b"1")
    await publish(channel, queue, b"2")
    with pytest.raises(aiormq.exceptions.DeliveryError) as nacked:
        await channel.basic_publish(b"3", routing_key=queue)
    assert isinstance(nacked.value.frame, Basic.Nack)
    assert nacked.value.frame.delivery_tag == 3
    assert not channel.is_closed
    assert await count(channel, queue) == (2, 0)
    # Room again after a message leaves: accepted.
    first = await get(channel, queue, no_ack=True)
    assert first.body == b"1"
    assert first.delivery.message_count == 1
    await publish(channel, queue, b"4")
    assert [(await get(channel, queue, no_ack=True)).body for _ in range(2)] == [b"2", b"4"]


async def test_reject_publish_overflow_nacks_the_publish_quorum(session: Session) -> None:
    """A quorum queue's limit is soft: it blocks publishers once *over* x-max-length (ready >
    max), so it takes one message more than a classic queue, and unblocks them when ready
    messages fall to 80 % of it (v3.10.8 and v4.1.0 rabbit_fifo.erl, is_over_limit/1,
    is_below_soft_limit/1, ?LOW_LIMIT). The nack is for the one publish (multiple is set on
    3.10, harmlessly; not checked)."""
    channel = await session.channel()
    queue = await session.declare(channel, "quorum", x_max_length=2, x_overflow="reject-publish")
    for body in (b"1", b"2", b"3"):
        await publish(channel, queue, body)
    for tag in (4, 5):
        with pytest.raises(aiormq.exceptions.DeliveryError) as nacked:
            await channel.basic_publish(b"over", routing_key=queue)
        assert isinstance(nacked.value.frame, Basic.Nack)
        assert nacked.value.frame.delivery_tag == tag
    assert not channel.is_closed
    assert (await count(channel, queue))[0] == 3
    got = [await get(channel, queue, no_ack=True) for _ in range(3)]
    assert [(m.body, m.delivery.message_count) for m in got] == [(b"1", 2), (b"2", 1), (b"3", 0)]


async def test_max_length_drop_head_dead_letters_with_reason_maxlen(session: Session) -> None:
    channel = await session.channel()
    dlq = await session.declare(channel)
    queue = await session.declare(
        channel, x_max_length=2, x_dead_letter_exchange="", x_dead_letter_routing_key=dlq
    )
    for body in (b"1", b"2", b"3"):
        await publish(channel, queue, body)
    assert await count(channel, queue) == (2, 0)
    dead = await get_eventually(session.backend, channel, dlq)
    assert dead.body == b"1"
    check_deaths(dead.header.properties.headers, [death(queue, "maxlen")])
    assert [(await get(channel, queue, no_ack=True)).body for _ in range(2)] == [b"2", b"3"]


# Time to live and dead-lettering.


@pytest.mark.parametrize("queue_type", QUEUE_TYPES)
async def test_queue_ttl_dead_letters_with_x_death(
    session: Session, backend: Backend, queue_type: str
) -> None:
    channel = await session.channel()
    dlq = await session.declare(channel)
    queue = await session.declare(
        channel,
        queue_type,
        x_message_ttl=200,
        x_dead_letter_exchange="",
        x_dead_letter_routing_key=dlq,
    )
    headers = {"app": "kept", "n": LongInt(7)}
    await publish(channel, queue, b"ttl", props(message_id="t1", headers=headers, priority=3))
    assert await count(channel, queue) == (1, 0)
    assert await count(channel, dlq) == (0, 0)
    await backend.elapse(0.2)
    dead = await get_eventually(backend, channel, dlq)
    assert dead.body == b"ttl"
    assert dead.delivery.exchange == ""
    assert dead.delivery.routing_key == dlq
    assert dead.delivery.redelivered is False
    properties = dead.header.properties
    assert (properties.message_id, properties.priority, properties.expiration) == ("t1", 3, None)
    assert {k: v for k, v in properties.headers.items() if not k.startswith("x-")} == headers
    assert type(properties.headers["n"]) is LongInt
    check_deaths(properties.headers, [death(queue, "expired")])
    # 3.10: x-death and x-first-death-{exchange,queue,reason}, no x-last-death-* (3.13+).
    expected = x_headers_of_a_death(session, queue, "expired")
    assert {k: v for k, v in only(properties.headers).items() if k != "x-death"} == expected
    assert await count(channel, queue) == (0, 0)


async def test_message_expiration_dead_letters_with_original_expiration(
    session: Session, backend: Backend
) -> None:
    channel = await session.channel()
    dlq = await session.declare(channel)
    queue = await session.declare(channel, x_dead_letter_exchange="", x_dead_letter_routing_key=dlq)
    await publish(channel, queue, b"short", props(expiration="100"))
    await publish(channel, queue, b"forever")
    await backend.elapse(0.1)
    dead = await get_eventually(backend, channel, dlq)
    assert dead.body == b"short"
    # The expiration property is removed; x-death keeps it as original-expiration.
    assert dead.header.properties.expiration is None
    check_deaths(
        dead.header.properties.headers,
        [death(queue, "expired", **{"original-expiration": "100"})],
    )
    assert await count(channel, queue) == (1, 0)
    assert await count(channel, dlq) == (0, 0)


async def test_expiration_zero_expires_at_once_unless_consumed(
    session: Session, backend: Backend
) -> None:
    channel = await session.channel()
    dlq = await session.declare(channel)
    queue = await session.declare(channel, x_dead_letter_exchange="", x_dead_letter_routing_key=dlq)
    await publish(channel, queue, b"now", props(expiration="0"))
    dead = await get_eventually(backend, channel, dlq)
    assert dead.body == b"now"
    check_deaths(
        dead.header.properties.headers, [death(queue, "expired", **{"original-expiration": "0"})]
    )


async def test_expiration_is_applied_at_the_head_of_the_queue_only(
    session: Session, backend: Backend
) -> None:
    channel = await session.channel()
    dlq = await session.declare(channel)
    queue = await session.declare(channel, x_dead_letter_exchange="", x_dead_letter_routing_key=dlq)
    await publish(channel, queue, b"head")  # no expiration
    await publish(channel, queue, b"behind", props(expiration="50"))
    await backend.elapse(0.2)
    # The expired message is behind one that does not expire: still counted, not dead.
    assert await count(channel, queue) == (2, 0)
    assert await count(channel, dlq) == (0, 0)
    head = await get(channel, queue, no_ack=True)
    assert head.body == b"head"
    # The GetOk does not count the expired message behind it: taking the head drops it.
    assert head.delivery.message_count == 0
    # Now at the head, it is dropped (dead-lettered) instead of being delivered.
    await assert_empty(channel, queue)
    dead = await get_eventually(backend, channel, dlq)
    assert dead.body == b"behind"
    check_deaths(
        dead.header.properties.headers, [death(queue, "expired", **{"original-expiration": "50"})]
    )


@pytest.mark.parametrize("queue_type", QUEUE_TYPES)
@pytest.mark.parametrize("how", ["reject", "nack"])
async def test_reject_without_requeue_dead_letters_with_reason_rejected(
    session: Session, queue_type: str, how: str
) -> None:
    channel = await session.channel()
    dlq = await session.declare(channel)
    queue = await session.declare(
        channel, queue_type, x_dead_letter_exchange="", x_dead_letter_routing_key=dlq
    )
    await publish(channel, queue, b"bad", props(message_id="b1", headers={"k": "v"}))
    message = await get(channel, queue)
    if how == "reject":
        await channel.basic_reject(message.delivery.delivery_tag, requeue=False)
    else:
        await channel.basic_nack(message.delivery.delivery_tag, requeue=False)
    dead = await get_eventually(session.backend, channel, dlq)
    assert (dead.body, dead.header.properties.message_id) == (b"bad", "b1")
    assert dead.delivery.redelivered is False
    check_deaths(dead.header.properties.headers, [death(queue, "rejected")])
    assert dead.header.properties.headers["k"] == "v"
    assert only(dead.header.properties.headers, "x-first-death") == first_death(queue, "rejected")
    assert await count(channel, queue) == (0, 0)


async def test_reject_without_dead_letter_exchange_drops(session: Session) -> None:
    channel = await session.channel()
    queue = await session.declare(channel)
    await publish(channel, queue, b"gone")
    message = await get(channel, queue)
    await channel.basic_reject(message.delivery.delivery_tag, requeue=False)
    await session.backend.settle()
    assert await count(channel, queue) == (0, 0)


@pytest.mark.parametrize("queue_type", QUEUE_TYPES)
async def test_nack_multiple_settles_every_earlier_delivery(
    session: Session, queue_type: str
) -> None:
    channel = await session.channel()
    dlq = await session.declare(channel)
    queue = await session.declare(
        channel, queue_type, x_dead_letter_exchange="", x_dead_letter_routing_key=dlq
    )
    for body in (b"1", b"2", b"3", b"4"):
        await publish(channel, queue, body)
    got = [await get(channel, queue) for _ in range(3)]
    assert [m.delivery.delivery_tag for m in got] == [1, 2, 3]
    await channel.basic_nack(got[2].delivery.delivery_tag, multiple=True, requeue=False)
    bodies = [(await get_eventually(session.backend, channel, dlq)).body for _ in range(3)]
    assert bodies == [b"1", b"2", b"3"]
    # (consumer_count: 3.10 counts a quorum queue's unsettled basic.get as a consumer.)
    assert (await count(channel, queue))[0] == 1
    fourth = await get(channel, queue)
    # Tags 4..6 went to the three no-ack gets from the DLQ.
    assert fourth.delivery.delivery_tag == 7
    await channel.basic_ack(7)
    assert (await count(channel, queue))[0] == 0


# Requeueing and redelivery.


async def test_classic_requeue_puts_messages_back_in_their_original_position(
    session: Session,
) -> None:
    channel = await session.channel()
    queue = await session.declare(channel)
    for body in (b"1", b"2", b"3", b"4"):
        await publish(channel, queue, body)
    got = [await get(channel, queue) for _ in range(3)]
    await channel.basic_nack(got[2].delivery.delivery_tag, requeue=True)
    await channel.basic_reject(got[0].delivery.delivery_tag, requeue=True)
    await channel.basic_ack(got[1].delivery.delivery_tag)
    again = [await get(channel, queue, no_ack=True) for _ in range(3)]
    assert [(m.body, m.delivery.redelivered) for m in again] == [
        (b"1", True),
        (b"3", True),
        (b"4", False),
    ]


async def requeue_three_of_four(session: Session, queue: str) -> list[DeliveredMessage]:
    """Publish 1..4, take 1..3, requeue 3 then 1, ack 2, and take what is there."""
    channel = await session.channel()
    for body in (b"1", b"2", b"3", b"4"):
        await publish(channel, queue, body)
    consuming = await session.channel()
    await consuming.basic_qos(prefetch_count=3)
    consumer = await Consumer().start(consuming, queue)
    await until(session.backend, lambda: len(consumer.messages) == 3, "three deliveries")
    await session.backend.settle()
    assert consumer.bodies == [b"1", b"2", b"3"]
    await consuming.basic_cancel(consumer.tag)
    got = consumer.messages
    await consuming.basic_nack(got[2].delivery.delivery_tag, requeue=True)
    await consuming.basic_reject(got[0].delivery.delivery_tag, requeue=True)
    await consuming.basic_ack(got[1].delivery.delivery_tag)
    await until(session.backend, lambda: _is(count(channel, queue), (3, 0)), "three ready")
    return [await get(channel, queue, no_ack=True) for _ in range(3)]


async def test_quorum_with_delivery_limit_delivers_returned_messages_first(
    session: Session,
) -> None:
    """With a delivery limit, a nack/reject with requeue is applied as a return: the message
    goes to the queue's returns, which are delivered before anything else, in return order
    (v3.10.8 and v4.1.0 rabbit_fifo.erl, handle_aux for #return{} with a delivery_limit,
    return_one/take_next_msg). 4.x sets a limit of 20 when none is given."""
    channel = await session.channel()
    queue = await session.declare(channel, "quorum", x_delivery_limit=5)
    again = await requeue_three_of_four(session, queue)
    assert [(m.body, m.delivery.redelivered) for m in again] == [
        (b"3", True),
        (b"1", True),
        (b"4", False),
    ]
    # One return each for 3 and 1. (Never returned, 4 has no x-delivery-count on 4.x; a
    # basic.get on 3.10 adds x-delivery-count 0 (rabbit_fifo_client.erl, dequeue/3) where 4.x
    # adds nothing (v4.1.0 rabbit_fifo_client.erl, add_delivery_count_header/2). Not checked.)
    assert [m.header.properties.headers["x-delivery-count"] for m in again[:2]] == [1, 1]


async def test_quorum_without_delivery_limit_requeues_at_the_back_on_3_10(
    session: Session,
) -> None:
    """Without a delivery limit, 3.10 turns a requeue into a new enqueue at the *back* of the
    queue (v3.10.8 rabbit_fifo.erl: handle_aux for #return{} with delivery_limit = undefined
    appends #requeue{} commands, applied with lqueue:in(..., Messages)). 4.x does the same
    when there is no limit (v4.1.0, same functions), but a 4.x quorum queue always has one
    (20 by default, rabbit_quorum_queue.erl ?DEFAULT_DELIVERY_LIMIT) unless a policy sets -1,
    so a plain declare there gives the order of the test above. The expected order follows
    the version the broker announces (``server_properties["version"]``)."""
    channel = await session.channel()
    queue = await session.declare(channel, "quorum")
    again = await requeue_three_of_four(session, queue)
    if version(session) < (4, 0):
        expected = [(b"4", False), (b"3", True), (b"1", True)]
    else:
        expected = [(b"3", True), (b"1", True), (b"4", False)]
    assert [(m.body, m.delivery.redelivered) for m in again] == expected
    assert [m.header.properties.headers["x-delivery-count"] for m in again if m.body != b"4"] == [
        1,
        1,
    ]


@pytest.mark.parametrize("queue_type", QUEUE_TYPES)
async def test_closing_a_channel_requeues_its_unacked_messages(
    session: Session, queue_type: str
) -> None:
    channel = await session.channel()
    queue = await session.declare(channel, queue_type)
    for body in (b"1", b"2", b"3"):
        await publish(channel, queue, body)
    holder = await session.channel()
    held = [await get(holder, queue) for _ in range(2)]
    assert [m.body for m in held] == [b"1", b"2"]
    # (consumer_count is not checked here: 3.10 counts each unacked basic.get on a quorum
    # queue as a consumer until it is settled, 2 here; a classic queue says 0.)
    assert (await count(channel, queue))[0] == 1
    await holder.close()
    await until(session.backend, lambda: _is(count(channel, queue), (3, 0)), "requeued")
    again = [await get(channel, queue, no_ack=True) for _ in range(3)]
    # Both queue types give 1, 2 before 3 here: classic puts them back in place; quorum
    # delivers returned messages first, and they were returned in delivery-tag order.
    assert [(m.body, m.delivery.redelivered) for m in again] == [
        (b"1", True),
        (b"2", True),
        (b"3", False),
    ]


async def test_quorum_delivery_count_and_delivery_limit(session: Session) -> None:
    """x-delivery-limit 2: three deliveries, then the third nack dead-letters.

    3.10 (v3.10.8 rabbit_fifo.erl) counts every return in ``delivery_count``, writes it as the
    ``x-delivery-count`` header (``long``) on redeliveries, and dead-letters when a return
    makes it exceed the limit. 4.x (v4.1.0 rabbit_fifo.erl, ``return_one``/``incr_msg``)
    checks the limit against ``acquired_count`` (every return) and writes ``x-delivery-count``
    from ``acquired_count`` too, but counts failed deliveries separately (``delivery_count``,
    nack/reject only, not a channel close); with nacks only, both agree. 4.x also applies a
    default limit of 20 when none is set (``?DEFAULT_DELIVERY_LIMIT`` in
    rabbit_quorum_queue.erl); 3.10 has none.
    """
    channel = await session.channel()
    dlq = await session.declare(channel)
    queue = await session.declare(
        channel,
        "quorum",
        x_delivery_limit=2,
        x_dead_letter_exchange="",
        x_dead_letter_routing_key=dlq,
    )
    await publish(channel, queue, b"poison", props(message_id="p1", headers={"keep": "me"}))
    consuming = await session.channel()
    await consuming.basic_qos(prefetch_count=1)
    consumer = await Consumer().start(consuming, queue)
    for n in range(3):
        await until(session.backend, lambda n=n: len(consumer.messages) == n + 1, "delivery")
        message = consumer.messages[n]
        await consuming.basic_nack(message.delivery.delivery_tag, requeue=True)
    first, *redeliveries = consumer.messages
    assert first.delivery.redelivered is False
    assert "x-delivery-count" not in (first.header.properties.headers or {})
    assert [m.delivery.redelivered for m in redeliveries] == [True, True]
    counts = [m.header.properties.headers["x-delivery-count"] for m in redeliveries]
    assert counts == [1, 2]
    assert [type(c) for c in counts] == [LongLongInt, LongLongInt]
    dead = await get_eventually(session.backend, channel, dlq)
    assert (dead.body, dead.header.properties.message_id) == (b"poison", "p1")
    headers = dead.header.properties.headers
    check_deaths(headers, [death(queue, "delivery_limit")])
    assert only(headers, "x-first-death") == first_death(queue, "delivery_limit")
    assert headers["keep"] == "me"
    await session.backend.settle()
    assert len(consumer.messages) == 3
    assert await count(channel, queue) == (0, 1)


async def test_quorum_at_least_once_dead_lettering(session: Session, backend: Backend) -> None:
    channel = await session.channel()
    dlq = await session.declare(channel)
    queue = await session.declare(
        channel,
        "quorum",
        x_dead_letter_exchange="",
        x_dead_letter_routing_key=dlq,
        x_dead_letter_strategy="at-least-once",
        x_overflow="reject-publish",
        x_message_ttl=100,
    )
    await publish(channel, queue, b"expires")
    await publish(channel, queue, b"second")
    await backend.elapse(0.1)
    expired = await get_eventually(backend, channel, dlq)
    assert expired.body == b"expires"
    check_deaths(expired.header.properties.headers, [death(queue, "expired")])
    dead = await get_eventually(backend, channel, dlq)
    assert dead.body == b"second"
    check_deaths(dead.header.properties.headers, [death(queue, "expired")])
    assert await count(channel, queue) == (0, 0)


async def test_x_death_count_increments_when_a_copy_expires_again(
    session: Session, backend: Backend
) -> None:
    """retry --expire (TTL)--> work; a client takes it and publishes a copy (headers and all)
    to retry again, as qworker's retry tiers do. Up to 3.13 the broker reads the x-death the
    client sent, finds the (queue, reason) entry and increments its count (v3.10.8
    rabbit_dead_letter.erl, update_x_death_header/2); not a cycle, as work is not in the
    x-death (detect_cycles/3). From 4.0 the broker no longer interprets an x-death header a
    client publishes (4.0.1 release notes, "AMQP 0.9.1 x-death header"; rabbitmq-server
    #10709, #11339): each copy starts a fresh history, count 1, and the x-death the client
    sent is replaced (v4.1.0 mc_amqpl.erl, deaths_to_headers/2)."""
    channel = await session.channel()
    work = await session.declare(channel)
    retry = await session.declare(
        channel, x_message_ttl=50, x_dead_letter_exchange="", x_dead_letter_routing_key=work
    )
    properties = props(message_id="l1", headers={"attempt": "1"})
    for n in (1, 2, 3):
        await publish(channel, retry, b"loop", properties)
        await backend.elapse(0.05)
        back = await get_eventually(backend, channel, work)
        assert back.body == b"loop"
        headers = back.header.properties.headers
        check_deaths(headers, [death(retry, "expired", n if version(session) < (4, 0) else 1)])
        assert only(headers, "x-first-death") == first_death(retry, "expired")
        assert headers["attempt"] == "1"
        properties = back.header.properties
    # 3.10 writes a first entry as count, reason, queue, time, exchange, routing-keys and
    # re-sorts the keys of an updated one (rabbit_misc:sort_field_table); not checked.


async def _ready(channel: aiormq.abc.AbstractChannel, queue: str) -> bool:
    return (await count(channel, queue))[0] > 0


async def test_x_death_count_increments_when_rejected_back_and_forth(
    session: Session, backend: Backend
) -> None:
    """The broker-only loop: no client copies; work rejects, retry expires back to work."""
    channel = await session.channel()
    work, retry = session.name(), session.name()
    await session.declare(
        channel, name=work, x_dead_letter_exchange="", x_dead_letter_routing_key=retry
    )
    await session.declare(
        channel,
        name=retry,
        x_message_ttl=50,
        x_dead_letter_exchange="",
        x_dead_letter_routing_key=work,
    )
    await publish(channel, work, b"loop", props(message_id="l2"))
    for _ in range(3):
        got = await until(backend, lambda: _get(channel, work), "back in work")
        await channel.basic_reject(got.delivery.delivery_tag, requeue=False)
        await until(backend, lambda: _ready(channel, retry), "in the retry queue")
        await backend.elapse(0.05)
    back = await until(backend, lambda: _get(channel, work), "back in work")
    await channel.basic_ack(back.delivery.delivery_tag)
    headers = back.header.properties.headers
    # routing-keys: the key the message had when it died in that queue (here the DLX keys).
    # Both 3.10 and 4.x keep one entry per (queue, reason), the latest first. Their ``time``
    # differs: 3.10 writes the time of the latest death, 4.x the first (v4.1.0 mc_amqpl.erl,
    # death_table/7 uses first_time); only "recent" is checked.
    check_deaths(
        headers,
        [
            {**death(retry, "expired", 3), "routing-keys": [retry]},
            {**death(work, "rejected", 3), "routing-keys": [work]},
        ],
    )
    assert only(headers, "x-first-death") == first_death(work, "rejected")
    # (3.10 writes an updated entry with its keys sorted (rabbit_misc:sort_field_table):
    # count, exchange, queue, reason, routing-keys, time; 4.x always writes count, reason,
    # queue, time, exchange, routing-keys. Key order is not checked.)


async def _get(channel: aiormq.abc.AbstractChannel, queue: str) -> DeliveredMessage | None:
    message = await channel.basic_get(queue)
    return message if isinstance(message.delivery, Basic.GetOk) else None


async def test_a_cycle_of_expiries_only_is_dropped(session: Session, backend: Backend) -> None:
    """a --expire--> b --expire--> a: RabbitMQ drops the message instead of routing it back
    into a queue already in its x-death with no rejection in between (v3.10.8
    rabbit_dead_letter.erl, detect_cycles/3, is_cycle/2)."""
    channel = await session.channel()
    a, b = session.name(), session.name()
    await session.declare(
        channel, name=a, x_message_ttl=50, x_dead_letter_exchange="", x_dead_letter_routing_key=b
    )
    await session.declare(
        channel, name=b, x_message_ttl=1000, x_dead_letter_exchange="", x_dead_letter_routing_key=a
    )
    await publish(channel, a, b"cycle")
    await backend.elapse(0.05)
    await until(backend, lambda: _is(count(channel, b), (1, 0)), "in b")
    assert await count(channel, a) == (0, 0)
    await backend.elapse(1.0)
    await backend.settle()
    assert await count(channel, a) == (0, 0)
    assert await count(channel, b) == (0, 0)


# Consumers: prefetch, basic.get, cancel, acks.


async def test_prefetch_limits_unacked_deliveries_per_consumer(session: Session) -> None:
    channel = await session.channel()
    queue = await session.declare(channel)
    for n in range(5):
        await publish(channel, queue, str(n).encode())
    consuming = await session.channel()
    await consuming.basic_qos(prefetch_count=2)
    consumer = await Consumer().start(consuming, queue)
    await until(session.backend, lambda: len(consumer.messages) == 2, "two deliveries")
    await session.backend.settle()
    assert consumer.bodies == [b"0", b"1"]
    assert await count(channel, queue) == (3, 1)
    await consuming.basic_ack(consumer.messages[0].delivery.delivery_tag)
    await until(session.backend, lambda: len(consumer.messages) == 3, "a third delivery")
    await session.backend.settle()
    assert consumer.bodies == [b"0", b"1", b"2"]
    # multiple=True acks tags 2 and 3: two more come.
    await consuming.basic_ack(consumer.messages[2].delivery.delivery_tag, multiple=True)
    await until(session.backend, lambda: len(consumer.messages) == 5, "all deliveries")
    assert [m.delivery.delivery_tag for m in consumer.messages] == [1, 2, 3, 4, 5]
    assert [m.delivery.consumer_tag for m in consumer.messages] == [consumer.tag] * 5
    assert await count(channel, queue) == (0, 1)


async def test_basic_get_counts_and_get_empty(session: Session) -> None:
    channel = await session.channel()
    queue = await session.declare(channel)
    await assert_empty(channel, queue)
    for body in (b"a", b"b", b"c"):
        await publish(channel, queue, body)
    got = [await get(channel, queue) for _ in range(3)]
    assert [(m.body, m.delivery.message_count) for m in got] == [(b"a", 2), (b"b", 1), (b"c", 0)]
    assert [m.delivery.delivery_tag for m in got] == [1, 2, 3]
    await assert_empty(channel, queue)
    assert await count(channel, queue) == (0, 0)
    await channel.basic_ack(3, multiple=True)
    await channel.close()
    channel = await session.channel()
    assert await count(channel, queue) == (0, 0)


async def test_basic_cancel_stops_deliveries_and_keeps_unacked_ones_ackable(
    session: Session,
) -> None:
    channel = await session.channel()
    queue = await session.declare(channel)
    await publish(channel, queue, b"before")
    consuming = await session.channel()
    consumer = await Consumer().start(consuming, queue)
    await until(session.backend, lambda: len(consumer.messages) == 1, "a delivery")
    cancelled = await consuming.basic_cancel(consumer.tag)
    assert isinstance(cancelled, Basic.CancelOk)
    assert cancelled.consumer_tag == consumer.tag
    await publish(channel, queue, b"after")
    await session.backend.settle()
    assert consumer.bodies == [b"before"]
    assert await count(channel, queue) == (1, 0)
    await consuming.basic_ack(consumer.messages[0].delivery.delivery_tag)
    await consuming.close()
    assert await count(channel, queue) == (1, 0)
    assert (await get(channel, queue, no_ack=True)).body == b"after"


@pytest.mark.parametrize("multiple", [False, True])
async def test_acking_an_unknown_delivery_tag_closes_the_channel_406(
    session: Session, multiple: bool
) -> None:
    """Also with multiple=True: the tag itself must be one the channel holds (rabbit_channel
    collect_acks), though 0 with multiple means "all"."""
    channel = await session.channel()
    queue = await session.declare(channel)
    await publish(channel, queue, b"x")
    message = await get(channel, queue)
    await channel.basic_ack(message.delivery.delivery_tag)
    # Twice: unknown now.
    await channel.basic_ack(message.delivery.delivery_tag, multiple=multiple)
    # The ack has no reply; the channel.close comes instead of the reply to the next method.
    with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed) as failed:
        await channel.basic_get(queue)
    close = closed(failed.value)
    assert (close.reply_code, close.reply_text) == (
        406,
        "PRECONDITION_FAILED - unknown delivery tag 1",
    )
    channel = await session.channel()
    assert await count(channel, queue) == (0, 0)


async def test_queue_purge_and_delete_return_counts(session: Session) -> None:
    channel = await session.channel()
    queue = await session.declare(channel)
    for body in (b"1", b"2", b"3"):
        await publish(channel, queue, body)
    held = await get(channel, queue)  # unacked: neither purged nor counted
    purged = await channel.queue_purge(queue)
    assert isinstance(purged, Queue.PurgeOk)
    assert purged.message_count == 2
    assert await count(channel, queue) == (0, 0)
    await channel.basic_reject(held.delivery.delivery_tag, requeue=True)
    await publish(channel, queue, b"4")
    await until(session.backend, lambda: _is(count(channel, queue), (2, 0)), "two ready")
    with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed) as failed:
        await channel.queue_delete(queue, if_empty=True)
    close = closed(failed.value)
    assert (close.reply_code, close.reply_text) == (
        406,
        f"PRECONDITION_FAILED - queue '{queue}' in vhost '/' not empty",
    )
    channel = await session.channel()
    deleted = await channel.queue_delete(queue)
    assert isinstance(deleted, Queue.DeleteOk)
    assert deleted.message_count == 2
    with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
        await channel.queue_declare(queue, passive=True)
    # Deleting a missing queue is not an error in 0-9-1 (RabbitMQ answers DeleteOk, 0).
    channel = await session.channel()
    deleted = await channel.queue_delete(queue)
    assert deleted.message_count == 0


async def _is(value: Awaitable[Any], expected: Any) -> bool:
    return (await value) == expected


# Content: header field types, large bodies.

#: One value of every AMQP 0-9-1 field type RabbitMQ accepts, as qworker.wire types them.
#: (``L`` is pamqp's alone, and a non-finite ``d`` makes RabbitMQ 3.10 close the connection.)
TYPED_HEADERS: dict[str, Any] = {
    "t-true": True,
    "t-false": False,
    "b": ShortShortInt(-100),
    "B": ShortShortUInt(200),
    "s": ShortInt(-30000),
    "u": ShortUInt(60000),
    "I": LongInt(-(2**31)),
    "i": LongUInt(2**32 - 1),
    "l": LongLongInt(-(2**63)),
    "l-max": LongLongInt(2**63 - 1),
    "f": Float32.from_wire(struct.pack(">f", 1.5)),
    "f-odd": Float32.from_wire(bytes.fromhex("3dcccccd")),
    "d": 0.1,
    "d-huge": 1e300,
    "D": Decimal("-123.4567"),
    "S": "unicode \u00e9\u4e2d \U0001f600",
    "S-empty": "",
    "S-bytes": LongBytes(b"\xff\xfe\x00not utf-8"),
    "x": bytearray(b"\x00\x01binary\xff"),
    "T": dt.datetime(2024, 2, 29, 12, 30, 15, tzinfo=dt.UTC),
    "T-raw": RawTimestamp(2**64 - 1),
    "V": None,
    "F": {"inner": LongInt(1), "deeper": {"s": "x", "arr": [ShortInt(2), "y"]}},
    "F-empty": {},
    "A": [True, ShortShortInt(1), LongLongInt(2), 2.5, "s", None, {"k": "v"}, [LongInt(3)]],
    "A-empty": [],
}


def wire_of(headers: dict[str, Any]) -> dict[str, bytes]:
    """Each header's encoded value (type code and bytes)."""
    return {key: encode_value(value) for key, value in headers.items()}


@pytest.mark.parametrize("queue_type", QUEUE_TYPES)
async def test_every_field_type_survives_delivery_and_dead_lettering(
    session: Session, queue_type: str
) -> None:
    channel = await session.channel()
    dlq = await session.declare(channel)
    queue = await session.declare(
        channel, queue_type, x_dead_letter_exchange="", x_dead_letter_routing_key=dlq
    )
    stamp = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    properties = props(
        message_id="typed",
        headers=TYPED_HEADERS,
        timestamp=stamp,
        content_type="application/octet-stream",
        content_encoding="identity",
        delivery_mode=2,
        priority=9,
        correlation_id="c",
        reply_to="r",
        expiration="60000",
        message_type="kind",
        user_id="guest",
        app_id="app",
    )
    await publish(channel, queue, b"typed", properties)
    consuming = await session.channel()
    consumer = await Consumer().start(consuming, queue)
    await until(session.backend, lambda: len(consumer.messages) == 1, "the typed message")
    message = consumer.messages[0]
    delivered = message.header.properties.headers
    # A first delivery to a consumer comes back byte for byte: same table, same key order.
    # (basic.get on a 3.10 quorum queue adds x-delivery-count 0, and a table RabbitMQ 3.10
    # changes is written back with its keys sorted, as after dead-lettering below.)
    assert encode_table(delivered) == encode_table(TYPED_HEADERS)
    got = message.header.properties
    assert (got.timestamp, got.content_type, got.content_encoding, got.delivery_mode) == (
        stamp,
        "application/octet-stream",
        "identity",
        2,
    )
    assert (got.priority, got.correlation_id, got.reply_to, got.expiration) == (
        9,
        "c",
        "r",
        "60000",
    )
    assert (got.message_type, got.user_id, got.app_id) == ("kind", "guest", "app")

    await consuming.basic_reject(message.delivery.delivery_tag, requeue=False)
    dead = await get_eventually(session.backend, channel, dlq)
    headers = dead.header.properties.headers
    # Dead-lettering rewrites the table (x-death added): every value keeps its type and bytes.
    # The key order is not kept: 3.10 writes the table sorted by key (rabbit_misc
    # set_table_value/sort_field_table); not checked.
    kept = {k: v for k, v in headers.items() if not k.startswith("x-")}
    assert wire_of(kept) == wire_of(TYPED_HEADERS)
    check_deaths(headers, [death(queue, "rejected", **{"original-expiration": "60000"})])
    got = dead.header.properties
    assert (got.timestamp, got.priority, got.correlation_id, got.expiration) == (
        stamp,
        9,
        "c",
        None,
    )
    assert (got.message_id, got.message_type, got.user_id, got.app_id) == (
        "typed",
        "kind",
        "guest",
        "app",
    )


@pytest.mark.parametrize("queue_type", QUEUE_TYPES)
async def test_a_large_body_crosses_several_frames_unchanged(
    session: Session, queue_type: str
) -> None:
    channel = await session.channel()
    assert session.connection.connection_tune.frame_max == 131072
    dlq = await session.declare(channel)
    queue = await session.declare(
        channel, queue_type, x_dead_letter_exchange="", x_dead_letter_routing_key=dlq
    )
    body = bytes(range(256)) * 2000 + b"tail"  # 512004 bytes: 4 frames and a bit
    await publish(channel, queue, body, props(message_id="big"))
    consuming = await session.channel()
    consumer = await Consumer().start(consuming, queue)
    await until(session.backend, lambda: len(consumer.messages) == 1, "the big message")
    message = consumer.messages[0]
    assert message.header.body_size == len(body) == 512004
    assert message.body == body
    await consuming.basic_reject(message.delivery.delivery_tag, requeue=False)
    dead = await get_eventually(session.backend, channel, dlq)
    assert dead.body == body
    assert dead.header.properties.message_id == "big"


# Streams.


async def test_stream_publish_and_consume_from_first(session: Session) -> None:
    channel = await session.channel()
    stream = await session.declare(channel, "stream")
    for body in (b"s0", b"s1", b"s2"):
        await publish(channel, stream, body, props(message_id=body.decode()))
    for _ in range(2):  # the second time: acks did not remove anything
        consuming = await session.channel()
        await consuming.basic_qos(prefetch_count=10)  # a stream consumer needs a prefetch
        consumer = await Consumer().start(consuming, stream, arguments={"x-stream-offset": "first"})
        await until(session.backend, lambda c=consumer: len(c.messages) == 3, "three")
        assert consumer.bodies == [b"s0", b"s1", b"s2"]
        offsets = [m.header.properties.headers["x-stream-offset"] for m in consumer.messages]
        assert offsets == [0, 1, 2]
        assert [type(o) for o in offsets] == [LongLongInt] * 3
        for message in consumer.messages:
            await consuming.basic_ack(message.delivery.delivery_tag)
        await consuming.basic_cancel(consumer.tag)
        await consuming.close()
    # (DeclareOk's message_count of a stream comes from periodically updated counters on
    # 3.10 and 4.x (rabbit_stream_queue.erl, stat/1): not checked.)
