"""Every AMQP field type, sent by a producer that is not aio-pika, through a real worker.

A pika producer publishes the hand-built corpus of tests/unit/test_wire.py (pika cannot
send most types, so its encoder is taught to emit pre-built raw fields), plus a
``timestamp`` property past year 9999 and a message_id that is not UTF-8. Three paths:
success, one transient failure then success (retry tier, dead-lettered back by the
broker), and a permanent failure (DLQ). The dead letter is read back with pika, its raw
content header captured and split by a small parser here that knows only type codes and
sizes, so wire type codes and bytes are compared without pamqp or qworker.wire.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pika
import pika.data
import pika.exceptions
import pika.spec
import pytest

from qworker import App, Context, Permanent, RetryPolicy, Transient, wire
from qworker.testing import running
from tests.support.broker import eventually
from tests.unit.test_wire import CORPUS

pytestmark = pytest.mark.rabbitmq

#: A timestamp property far past year 9999 (microseconds sent by mistake).
TIMESTAMP = 1_700_000_000_000_000
#: A message id that is not UTF-8.
MESSAGE_ID = b"wire-\xff-id"
#: Read back as qworker sees it (surrogate escapes), and as the CLI prints it.
MESSAGE_ID_TEXT = MESSAGE_ID.decode("utf-8", "surrogateescape")
MESSAGE_ID_PRINTABLE = "wire-\\xff-id"  # the non-UTF-8 byte escaped, never raw

#: RabbitMQ 3.10 refuses a non-finite f/d header on publish (541 INTERNAL_ERROR closes the
#: publisher's connection: Erlang floats have no NaN/inf), so these stay unit-tested only;
#: test_broker_refuses_non_finite_floats checks that this exclusion is still needed.
NOT_ACCEPTED = {k for k in CORPUS if k[:2] in ("f-", "d-") and ("nan" in k or "inf" in k)}

#: Headers of binary long strings (S that is not UTF-8), alone and nested in an array.
BINARY_STRINGS = ("S-not-utf8", "A-nested")


class RawField:
    """A pre-encoded field value (type code and bytes) for pika's table encoder."""

    def __init__(self, data: bytes) -> None:
        self.data = data


@contextmanager
def pika_raw_fields() -> Iterator[None]:
    """Teach pika.data.encode_value (looked up at call time, nested too) to emit RawField."""
    original = pika.data.encode_value

    def encode_value(pieces: list[bytes], value: Any) -> int:
        if isinstance(value, RawField):
            pieces.append(value.data)
            return len(value.data)
        return original(pieces, value)

    pika.data.encode_value = encode_value  # type: ignore[assignment]
    try:
        yield
    finally:
        pika.data.encode_value = original  # type: ignore[assignment]


def _params(broker_url: str) -> pika.URLParameters:
    return pika.URLParameters(broker_url)


def pika_publish(broker_url: str, queue: str, headers: dict[str, bytes]) -> None:
    """Publish one message with raw headers, a timestamp past 9999 and a binary message_id."""
    with pika_raw_fields():
        connection = pika.BlockingConnection(_params(broker_url))
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            properties = pika.BasicProperties(
                headers={k: RawField(v) for k, v in headers.items()},
                timestamp=TIMESTAMP,
                message_id=MESSAGE_ID,  # type: ignore[arg-type]
                delivery_mode=2,
            )
            channel.basic_publish("", queue, b"payload", properties, mandatory=True)
        finally:
            if connection.is_open:
                connection.close()


# A parser that knows type codes and sizes only: it splits raw bytes, it decodes nothing.

_FIXED = {b"t": 1, b"b": 1, b"B": 1, b"s": 2, b"u": 2, b"I": 4, b"i": 4, b"l": 8}
_FIXED.update({b"L": 8, b"f": 4, b"d": 8, b"D": 5, b"T": 8, b"V": 0})
_SIZED = {b"S", b"x", b"A", b"F"}


def split_fields(table: bytes) -> dict[str, bytes]:
    """Field table payload (no length) -> key: raw field (type code included)."""
    fields: dict[str, bytes] = {}
    pos = 0
    while pos < len(table):
        key_len = table[pos]
        key = table[pos + 1 : pos + 1 + key_len].decode("utf-8", "surrogateescape")
        pos += 1 + key_len
        code = table[pos : pos + 1]
        sized = code in _SIZED
        size = 4 + struct.unpack_from(">I", table, pos + 1)[0] if sized else _FIXED[code]
        fields[key] = table[pos : pos + 1 + size]
        pos += 1 + size
    assert pos == len(table)
    return fields


_PROPERTY_ORDER = [
    ("content_type", "short"),
    ("content_encoding", "short"),
    ("headers", "table"),
    ("delivery_mode", 1),
    ("priority", 1),
    ("correlation_id", "short"),
    ("reply_to", "short"),
    ("expiration", "short"),
    ("message_id", "short"),
    ("timestamp", 8),
    ("type", "short"),
    ("user_id", "short"),
    ("app_id", "short"),
    ("cluster_id", "short"),
]


def split_properties(raw: bytes) -> dict[str, bytes]:
    """Raw Basic properties (flags first) -> name: raw value bytes."""
    (flags,) = struct.unpack_from(">H", raw, 0)
    assert not flags & 1, "no continuation flags expected"
    pos, found = 2, {}
    for bit, (name, kind) in zip(range(15, 1, -1), _PROPERTY_ORDER, strict=True):
        if not flags & (1 << bit):
            continue
        if kind == "short":
            size = 1 + raw[pos]
        elif kind == "table":
            size = 4 + struct.unpack_from(">I", raw, pos)[0]
        else:
            assert isinstance(kind, int)
            size = kind
        found[name] = raw[pos : pos + size]
        pos += size
    return found


def pika_get_raw(broker_url: str, queue: str) -> tuple[dict[str, bytes], bytes] | None:
    """basic.get one message with pika; return its raw properties split, and its body.

    pika's own property decoder is bypassed (it cannot read a T past 9999): the raw
    bytes are captured before it would run.
    """
    captured: list[bytes] = []
    original = pika.spec.BasicProperties.decode

    def capture(self: pika.spec.BasicProperties, encoded: bytes, offset: int = 0) -> Any:
        captured.append(bytes(encoded[offset:]))
        return self

    pika.spec.BasicProperties.decode = capture  # type: ignore[method-assign]
    try:
        connection = pika.BlockingConnection(_params(broker_url))
        try:
            channel = connection.channel()
            method, _, body = channel.basic_get(queue, auto_ack=False)
            if method is None:
                return None
            channel.basic_nack(method.delivery_tag, requeue=True)
        finally:
            connection.close()
    finally:
        pika.spec.BasicProperties.decode = original  # type: ignore[method-assign]
    return split_properties(captured[-1]), body


def typed(headers: Any, names: list[str]) -> dict[str, bytes]:
    """Each named header as the codec would put it on the wire (type code and bytes)."""
    return {name: wire.encode_value(headers[name]) for name in names if name in headers}


def test_split_fields_is_a_real_parser() -> None:
    """The raw splitter recovers exactly the corpus it is given (guards the comparisons)."""
    payload = b"".join(bytes([len(k)]) + k.encode() + v for k, v in CORPUS.items())
    assert split_fields(payload) == CORPUS


def count_reaches(items: list[Any], n: int) -> Any:
    async def check() -> bool:
        return len(items) >= n

    return check


def _corpus(exclude: set[str] = frozenset()) -> dict[str, bytes]:  # type: ignore[assignment]
    return {k: v for k, v in CORPUS.items() if k not in exclude | NOT_ACCEPTED}


def test_broker_refuses_non_finite_floats(broker_url: str, queue_name: str) -> None:
    assert len(NOT_ACCEPTED) == 8
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker):
        pika_publish(broker_url, queue_name, {"d-nan": CORPUS["d-nan"]})


async def test_success_path_sees_every_type_without_reconnecting(
    broker_url: str, queue_name: str, cleanup: list[str]
) -> None:
    app = App(broker_url)
    seen: list[tuple[dict[str, bytes], str | None]] = []

    @app.handler(queue_name)
    async def handle(body: bytes, ctx: Context) -> None:
        seen.append((typed(ctx.headers, list(CORPUS)), ctx.message_id))

    cleanup.extend(s.name for s in app.topology())
    async with running(app) as worker:
        await asyncio.to_thread(pika_publish, broker_url, queue_name, _corpus())
        await eventually(count_reaches(seen, 1), timeout=10)
        await asyncio.sleep(0.5)  # a storm would reconnect here
        assert worker.connections == 1
    assert len(seen) == 1
    headers, message_id = seen[0]
    assert headers == _corpus()
    assert message_id == MESSAGE_ID_TEXT


async def _retried_headers(
    broker_url: str, queue_name: str, cleanup: list[str], names: list[str]
) -> tuple[dict[str, bytes], dict[str, bytes], int]:
    app = App(broker_url)
    seen: list[tuple[int, dict[str, bytes]]] = []

    @app.handler(queue_name, retry=RetryPolicy(max_attempts=3, initial_delay=0.2, jitter=0))
    async def handle(body: bytes, ctx: Context) -> None:
        seen.append((ctx.attempt, typed(ctx.headers, names)))
        if ctx.attempt == 1:
            raise Transient("once")

    cleanup.extend(s.name for s in app.topology())
    async with running(app) as worker:
        await asyncio.to_thread(pika_publish, broker_url, queue_name, {k: CORPUS[k] for k in names})
        await eventually(count_reaches(seen, 2), timeout=15)
        connections = worker.connections
    assert [a for a, _ in seen] == [1, 2]
    return seen[0][1], seen[1][1], connections


async def test_retry_path_keeps_every_type(
    broker_url: str, queue_name: str, cleanup: list[str]
) -> None:
    names = list(_corpus(set()))
    first, retried, connections = await _retried_headers(broker_url, queue_name, cleanup, names)
    assert first == {k: CORPUS[k] for k in names}
    assert retried == first
    assert connections == 1


@pytest.mark.parametrize("name", BINARY_STRINGS)
async def test_retry_path_keeps_a_binary_long_string(
    broker_url: str, queue_name: str, cleanup: list[str], name: str
) -> None:
    first, retried, _ = await _retried_headers(broker_url, queue_name, cleanup, [name])
    assert first == {name: CORPUS[name]}
    assert retried == first


async def _dead_letter(
    broker_url: str, queue_name: str, cleanup: list[str], headers: dict[str, bytes]
) -> dict[str, bytes]:
    app = App(broker_url)
    calls: list[int] = []

    @app.handler(queue_name, retry=RetryPolicy(max_attempts=3, initial_delay=0.2, jitter=0))
    async def handle(body: bytes, ctx: Context) -> None:
        calls.append(ctx.attempt)
        raise Permanent("no")

    cleanup.extend(s.name for s in app.topology())
    dlq = f"{queue_name}.dlq"
    async with running(app) as worker:
        await asyncio.to_thread(pika_publish, broker_url, queue_name, headers)
        got: list[tuple[dict[str, bytes], bytes]] = []

        async def arrived() -> bool:
            found = await asyncio.to_thread(pika_get_raw, broker_url, dlq)
            if found is not None:
                got.append(found)
            return found is not None

        await eventually(arrived, timeout=15)
        assert worker.connections == 1
    assert calls == [1]
    properties, body = got[0]
    assert body == b"payload"
    assert properties["timestamp"] == struct.pack(">Q", TIMESTAMP)
    assert properties["message_id"] == bytes([len(MESSAGE_ID)]) + MESSAGE_ID
    return split_fields(properties["headers"][4:])


async def test_dead_letter_path_keeps_every_type_and_the_dlq_tool_shows_it(
    broker_url: str, queue_name: str, cleanup: list[str]
) -> None:
    corpus = _corpus(set())
    fields = await _dead_letter(broker_url, queue_name, cleanup, corpus)
    assert {k: v for k, v in fields.items() if k in CORPUS} == corpus
    assert fields["x-qworker-classification"][:1] == b"S"

    out = await dlq_show(broker_url, f"{queue_name}.dlq")
    assert MESSAGE_ID_PRINTABLE in out, out


async def dlq_show(broker_url: str, dlq: str, *extra: str) -> str:
    """Run the DLQ tool as users do; assert it succeeds; return its output."""
    shown = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "qworker", "dlq", "show", dlq, "--url", broker_url, *extra],
        capture_output=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert shown.returncode == 0, shown.stderr.decode("utf-8", "replace")
    return shown.stdout.decode("utf-8", "replace")


async def test_dlq_tool_json_shows_a_timestamp_past_9999(
    broker_url: str, queue_name: str, cleanup: list[str]
) -> None:
    await _dead_letter(broker_url, queue_name, cleanup, {"l-5": CORPUS["l-5"]})
    out = await dlq_show(broker_url, f"{queue_name}.dlq", "--json")
    record = json.loads(out.splitlines()[0])
    assert record["headers"]["l-5"] == 5
    assert record["message_id"] == MESSAGE_ID_TEXT  # JSON keeps the surrogate escape
    assert record["properties"]["timestamp"] == TIMESTAMP  # past 9999: integer seconds


@pytest.mark.parametrize("name", BINARY_STRINGS)
async def test_dead_letter_path_keeps_a_binary_long_string(
    broker_url: str, queue_name: str, cleanup: list[str], name: str
) -> None:
    fields = await _dead_letter(broker_url, queue_name, cleanup, {name: CORPUS[name]})
    assert fields[name] == CORPUS[name]
