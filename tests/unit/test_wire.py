"""qworker.wire: every AMQP 0-9-1 field type survives decode + re-encode byte for byte.

Inputs are built by hand with ``struct`` (never with pamqp's or our encoder), decoded
through pamqp's own entry points (with the codec installed by ``import qworker``),
and re-encoded: the bytes must be identical.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import math
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest
from pamqp import commands, decode, encode, header

import qworker  # noqa: F401  (installs the codec)
from qworker import wire

# Raw field builders.


def f(code: str, fmt: str = "", *values: Any) -> bytes:
    """One typed field value: type code, then the struct-packed payload."""
    return code.encode() + (struct.pack(fmt, *values) if fmt else b"")


def longstr(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def shortstr(data: bytes) -> bytes:
    return struct.pack(">B", len(data)) + data


def table_bytes(pairs: list[tuple[bytes, bytes]]) -> bytes:
    """A field table (length included) from (raw key, raw field) pairs, in this order."""
    return longstr(b"".join(shortstr(k) + v for k, v in pairs))


def array_bytes(fields: list[bytes]) -> bytes:
    return longstr(b"".join(fields))


def bits32(value: int) -> bytes:
    return b"f" + struct.pack(">I", value)


def bits64(value: int) -> bytes:
    return b"d" + struct.pack(">Q", value)


_YEAR_9999_S = 253402300799  # 9999-12-31T23:59:59Z in seconds
_NESTED_TABLE = b"F" + table_bytes(
    [
        (b"inner-l", f("l", ">q", 5)),
        (b"inner-d", f("d", ">d", 0.1)),
        (b"inner-T", f("T", ">Q", 2**63 - 1)),
        (b"deeper", b"F" + table_bytes([(b"s", f("s", ">h", -1)), (b"V", b"V")])),
        (b"empty", b"F" + table_bytes([])),
    ]
)
_NESTED_ARRAY = b"A" + array_bytes(
    [
        f("b", ">b", 1),
        f("u", ">H", 1),
        b"S" + longstr(b"\xff"),
        b"A" + array_bytes([f("i", ">I", 7), b"V", _NESTED_TABLE]),
        b"A" + array_bytes([]),
    ]
)

#: name -> one raw field value, as RabbitMQ accepts them (rabbit_binary_parser).
CORPUS: dict[str, bytes] = {
    "t-false": f("t", ">B", 0),
    "t-true": f("t", ">B", 1),
    "b-min": f("b", ">b", -128),
    "b-max": f("b", ">b", 127),
    "b-zero": f("b", ">b", 0),
    "B-min": f("B", ">B", 0),
    "B-max": f("B", ">B", 255),
    "B-5": f("B", ">B", 5),
    "s-min": f("s", ">h", -32768),
    "s-max": f("s", ">h", 32767),
    "s-5": f("s", ">h", 5),
    "u-min": f("u", ">H", 0),
    "u-max": f("u", ">H", 65535),
    "I-min": f("I", ">i", -(2**31)),
    "I-max": f("I", ">i", 2**31 - 1),
    "I-5": f("I", ">i", 5),
    "i-min": f("i", ">I", 0),
    "i-max": f("i", ">I", 2**32 - 1),
    "l-min": f("l", ">q", -(2**63)),
    "l-max": f("l", ">q", 2**63 - 1),
    "l-5": f("l", ">q", 5),
    "f-0.1": f("f", ">f", 0.1),
    "f-max": f("f", ">f", 3.4028234663852886e38),
    "f-inf": f("f", ">f", math.inf),
    "f-minus-inf": f("f", ">f", -math.inf),
    "f-minus-zero": f("f", ">f", -0.0),
    "f-nan": bits32(0x7FC00000),
    "f-signalling-nan": bits32(0x7F800001),  # a C double cast would quiet it
    "f-denormal": bits32(0x00000001),
    "d-0.1": f("d", ">d", 0.1),
    "d-1e300": f("d", ">d", 1e300),
    "d-max": f("d", ">d", 1.7976931348623157e308),
    "d-inf": f("d", ">d", math.inf),
    "d-minus-inf": f("d", ">d", -math.inf),
    "d-minus-zero": f("d", ">d", -0.0),
    "d-nan": bits64(0x7FF8000000000000),
    "d-nan-payload": bits64(0x7FF0000000000001),
    "d-denormal": bits64(0x0000000000000001),
    "D-12.345": f("D", ">BI", 3, 12345),
    "D-zero-scaled": f("D", ">BI", 2, 0),
    "D-max": f("D", ">BI", 255, 2**32 - 1),
    "D-above-int32": f("D", ">BI", 0, 2**31),
    "S-empty": b"S" + longstr(b""),
    "S-utf8": b"S" + longstr("héllo ✓ 𝄞".encode()),
    "S-not-utf8": b"S" + longstr(b"\xff\xfe\x00bin\x80"),
    "x-empty": b"x" + longstr(b""),
    "x-bytes": b"x" + longstr(b"\x00\xff\x10"),
    "x-utf8-looking": b"x" + longstr(b"text"),
    "T-zero": f("T", ">Q", 0),
    "T-2^32-1": f("T", ">Q", 2**32 - 1),
    "T-2^32": f("T", ">Q", 2**32),  # pamqp's "milliseconds" heuristic edge
    "T-9999-seconds": f("T", ">Q", _YEAR_9999_S),
    "T-9999-millis": f("T", ">Q", _YEAR_9999_S * 1000 + 999),  # last in-range reading
    "T-10000-millis": f("T", ">Q", (_YEAR_9999_S + 1) * 1000),  # first out-of-range reading
    "T-micros": f("T", ">Q", 1_700_000_000_000_000),  # microseconds sent by mistake
    "T-2^63-1": f("T", ">Q", 2**63 - 1),
    "T-2^64-1": f("T", ">Q", 2**64 - 1),
    "F-nested": _NESTED_TABLE,
    "A-nested": _NESTED_ARRAY,
    "V": b"V",
}


def properties_bytes(flags: int, *parts: bytes) -> bytes:
    """A content-header frame payload (class 60, weight 0, body size 3) with raw properties."""
    return struct.pack(">HHQH", 60, 0, 3, flags) + b"".join(parts)


_HEADERS_FLAG = 1 << 13
_MESSAGE_ID_FLAG = 1 << 7
_TIMESTAMP_FLAG = 1 << 6


def roundtrip_headers(raw_table: bytes) -> tuple[dict[str, Any], bytes]:
    """Decode a headers table through pamqp's content-header path, then marshal it again."""
    frame = properties_bytes(_HEADERS_FLAG, raw_table)
    content = header.ContentHeader()
    content.unmarshal(frame)
    headers = content.properties.headers
    assert isinstance(headers, dict)
    return headers, content.marshal()[12:]  # marshal() has no class/weight/size prefix quirks


@pytest.fixture(autouse=True)
def _codec_installed() -> Iterator[None]:
    assert wire.installed()
    yield
    wire.install()  # a test that uninstalls must not leak that


@pytest.mark.parametrize("name", list(CORPUS))
def test_every_field_type_round_trips_byte_for_byte(name: str) -> None:
    raw = table_bytes([(name.encode(), CORPUS[name])])
    headers, again = roundtrip_headers(raw)
    assert list(headers) == [name]
    assert again == struct.pack(">H", _HEADERS_FLAG) + raw
    assert wire.encode_value(headers[name]) == CORPUS[name]


def test_whole_corpus_in_one_table_keeps_order_and_bytes() -> None:
    raw = table_bytes([(k.encode(), v) for k, v in CORPUS.items()])
    headers, again = roundtrip_headers(raw)
    assert list(headers) == list(CORPUS)
    assert again[2:] == raw


def _decoded(name: str) -> Any:
    return wire.decode_table(table_bytes([(b"k", CORPUS[name])]))[1]["k"]


@pytest.mark.parametrize(
    ("name", "kind", "value"),
    [
        ("t-true", bool, True),
        ("b-min", wire.ShortShortInt, -128),
        ("B-max", wire.ShortShortUInt, 255),
        ("s-5", wire.ShortInt, 5),
        ("u-max", wire.ShortUInt, 65535),
        ("I-5", wire.LongInt, 5),
        ("i-max", wire.LongUInt, 2**32 - 1),
        ("l-5", wire.LongLongInt, 5),
        ("d-0.1", float, 0.1),
        ("d-1e300", float, 1e300),
        ("D-12.345", decimal.Decimal, decimal.Decimal("12.345")),
        ("S-utf8", str, "héllo ✓ 𝄞"),
        ("S-not-utf8", wire.LongBytes, b"\xff\xfe\x00bin\x80"),
        ("x-bytes", bytearray, bytearray(b"\x00\xff\x10")),
        ("V", type(None), None),
    ],
)
def test_decoded_values_are_their_plain_python_selves(name: str, kind: type, value: Any) -> None:
    decoded = _decoded(name)
    assert type(decoded) is kind
    assert decoded == value
    if isinstance(value, int | float | str) or value is None:
        assert json.dumps(decoded) == json.dumps(value)


def test_float32_reads_as_the_float_it_is() -> None:
    value = _decoded("f-0.1")
    assert isinstance(value, wire.Float32)
    assert value == struct.unpack(">f", struct.pack(">f", 0.1))[0]
    assert math.isnan(_decoded("f-signalling-nan"))


def test_timestamps_in_range_are_datetimes_with_the_raw_value() -> None:
    zero = _decoded("T-zero")
    assert isinstance(zero, wire.Timestamp)
    assert zero == dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    assert zero.raw == 0
    edge = _decoded("T-2^32")
    assert isinstance(edge, dt.datetime)
    assert edge.raw == 2**32
    # pamqp's reading (milliseconds above 2**32-1) is kept for handlers; raw is exact
    assert edge == dt.datetime.fromtimestamp(2**32 / 1000, dt.UTC)
    last = _decoded("T-9999-millis")
    assert isinstance(last, dt.datetime)
    assert last.year == 9999


@pytest.mark.parametrize("name", ["T-10000-millis", "T-micros", "T-2^63-1", "T-2^64-1"])
def test_timestamps_out_of_range_are_raw_not_errors(name: str) -> None:
    value = _decoded(name)
    assert isinstance(value, wire.RawTimestamp)
    assert not isinstance(value, dt.datetime)
    assert value.datetime is None
    assert value.raw == struct.unpack(">Q", CORPUS[name][1:])[0]
    assert value == wire.RawTimestamp(value.raw)
    assert wire.encode_value(value) == CORPUS[name]


def test_a_timestamp_changed_by_arithmetic_encodes_its_new_value() -> None:
    value = _decoded("T-2^32")  # raw 2**32, read as milliseconds
    later = value + dt.timedelta(seconds=10)
    expected_seconds = int(later.timestamp())
    assert wire.encode_value(later) == f("T", ">Q", expected_seconds)
    assert wire.encode_value(value.replace(year=2001)) != CORPUS["T-2^32"]


def test_basic_properties_timestamp_past_9999_decodes_and_reencodes_identically() -> None:
    for raw_ts in (_YEAR_9999_S * 1000 + 1000, 1_700_000_000_000_000, 2**63 - 1, 2**64 - 1):
        payload = struct.pack(">Q", raw_ts)
        frame = properties_bytes(_TIMESTAMP_FLAG, payload)
        content = header.ContentHeader()
        content.unmarshal(frame)
        stamp = content.properties.timestamp
        assert isinstance(stamp, wire.RawTimestamp)
        assert stamp.raw == raw_ts
        assert content.marshal()[12:] == struct.pack(">H", _TIMESTAMP_FLAG) + payload


def test_basic_properties_in_range_timestamp_keeps_raw_even_as_milliseconds() -> None:
    payload = struct.pack(">Q", 1_700_000_000_123)  # ms: pamqp reads 2023, writes seconds
    content = header.ContentHeader()
    content.unmarshal(properties_bytes(_TIMESTAMP_FLAG, payload))
    assert isinstance(content.properties.timestamp, dt.datetime)
    assert content.properties.timestamp.year == 2023
    assert content.marshal()[12:] == struct.pack(">H", _TIMESTAMP_FLAG) + payload


def test_message_id_that_is_not_utf8_decodes_and_reencodes_identically() -> None:
    raw = shortstr(b"id-\xff\xfe")
    content = header.ContentHeader()
    content.unmarshal(properties_bytes(_MESSAGE_ID_FLAG, raw))
    assert isinstance(content.properties.message_id, str)
    assert content.marshal()[12:] == struct.pack(">H", _MESSAGE_ID_FLAG) + raw


def test_aio_pika_accepts_a_raw_timestamp_property() -> None:
    import aio_pika

    stamp = wire.RawTimestamp(2**63 - 1)
    message = aio_pika.Message(b"x", timestamp=stamp)  # type: ignore[arg-type]
    assert message.timestamp is stamp
    assert message.info()["timestamp"] is stamp
    frame = header.ContentHeader(0, 1, message.properties).marshal()
    back = header.ContentHeader()
    back.unmarshal(frame)
    assert back.properties.timestamp == stamp
    assert struct.pack(">Q", 2**63 - 1) in frame


# Plain Python values: pamqp's choices, except float -> d and no OverflowError.


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1e300, f("d", ">d", 1e300)),
        (0.1, f("d", ">d", 0.1)),
        (5, f("b", ">b", 5)),
        (40000, f("u", ">H", 40000)),
        (2**40, f("l", ">q", 2**40)),
        (True, f("t", ">B", 1)),
        ("text", b"S" + longstr(b"text")),
        (b"\xff", b"x" + longstr(b"\xff")),
        (bytearray(b"\xff"), b"x" + longstr(b"\xff")),
        (decimal.Decimal("-1.5"), f("D", ">Bi", 1, -15)),
        (dt.datetime(2024, 1, 1, tzinfo=dt.UTC), f("T", ">Q", 1704067200)),
        (dt.datetime(2024, 1, 1), f("T", ">Q", 1704067200)),  # naive is UTC, as pamqp
        (time.gmtime(86400), f("T", ">Q", 86400)),
        (None, b"V"),
        ([1, "a"], b"A" + array_bytes([f("b", ">b", 1), b"S" + longstr(b"a")])),
        ({"a": 1}, b"F" + table_bytes([(b"a", f("b", ">b", 1))])),
    ],
)
def test_plain_values_encode_as_documented(value: Any, expected: bytes) -> None:
    assert wire.encode_value(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        2**70,
        -(2**63) - 1,
        "\ud800",  # lone surrogate: not UTF-8
        decimal.Decimal("NaN"),
        decimal.Decimal("1E-300"),
        decimal.Decimal(2**40),
        dt.datetime(1960, 1, 1, tzinfo=dt.UTC),
        wire.Float32(1e300),
        wire.LongInt(2**40),
        (1, 2),
        object(),
        {1: "non-str key"},
    ],
)
def test_unencodable_values_raise_type_or_value_error_only(value: Any) -> None:
    with pytest.raises((TypeError, ValueError)) as caught:
        commands.Basic.Properties(headers={"k": value}).marshal()
    assert not isinstance(caught.value, OverflowError)


def test_deep_nesting_on_encode_is_a_value_error() -> None:
    deep: Any = 1
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(ValueError):
        commands.Basic.Properties(headers={"k": deep}).marshal()


def test_derived_plain_values_lose_the_wire_type() -> None:
    value = _decoded("l-5")
    assert wire.encode_value(value) == CORPUS["l-5"]
    assert wire.encode_value(value + 0) == f("b", ">b", 5)
    assert wire.encode_value(int(value)) == f("b", ">b", 5)


# Tables the codec cannot parse never fail the frame.


def test_unknown_type_code_keeps_the_table_raw() -> None:
    raw = table_bytes([(b"ok", f("b", ">b", 1)), (b"bad", b"Z\x00\x00")])
    headers, again = roundtrip_headers(raw)
    assert isinstance(headers, wire.RawTable)
    assert headers == {}
    assert again[2:] == raw


def test_nesting_deeper_than_the_recursion_limit_keeps_the_table_raw() -> None:
    inner = b"V"
    for _ in range(3000):
        inner = b"A" + array_bytes([inner])
    raw = table_bytes([(b"deep", inner)])
    headers, again = roundtrip_headers(raw)
    assert isinstance(headers, wire.RawTable)
    assert again[2:] == raw


def test_non_utf8_table_key_round_trips() -> None:
    raw = table_bytes([(b"k\xff", f("l", ">q", 5))])
    headers, again = roundtrip_headers(raw)
    assert list(headers) == ["k\udcff"]
    assert again[2:] == raw


def test_a_raw_table_that_was_changed_encodes_its_new_content() -> None:
    headers, _ = roundtrip_headers(table_bytes([(b"bad", b"Z")]))
    headers["new"] = 1
    assert wire.encode_table(headers) == table_bytes([(b"new", f("b", ">b", 1))])


def test_a_table_whose_length_runs_past_the_frame_is_still_an_error() -> None:
    with pytest.raises(ValueError):
        decode.field_table(struct.pack(">I", 100) + b"\x01a")


def test_field_running_past_its_table_is_malformed() -> None:
    # the table claims 7 bytes but its 'l' needs 9: the codec must not read past it
    body = shortstr(b"k") + f("l", ">q", 5)
    raw = struct.pack(">I", 7) + body
    _, table = wire.decode_table(raw)
    assert isinstance(table, wire.RawTable)


# The codec really is what pamqp runs (a control: without it these round trips fail).


def test_install_is_idempotent_and_hooks_pamqp_entry_points() -> None:
    wire.install()
    wire.install()
    assert decode.METHODS["table"] is wire.decode_table
    assert encode.METHODS["table"] is wire.encode_table
    assert decode.METHODS["timestamp"] is wire.decode_timestamp
    assert encode.encode_table_value is wire.encode_value


def test_without_the_codec_pamqp_loses_types_and_fails() -> None:
    wire.uninstall()
    try:
        assert not wire.installed()
        _, again = roundtrip_headers(table_bytes([(b"k", CORPUS["l-5"])]))
        assert again[2:] != table_bytes([(b"k", CORPUS["l-5"])])
        with pytest.raises(OverflowError):
            roundtrip_headers(table_bytes([(b"k", CORPUS["d-1e300"])]))
        with pytest.raises((OverflowError, ValueError)):
            roundtrip_headers(table_bytes([(b"k", CORPUS["T-2^63-1"])]))
    finally:
        wire.install()
    assert wire.installed()


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_plain_non_finite_float_header_is_refused_on_encode(value: float) -> None:
    """RabbitMQ closes the connection of a publisher that sends NaN/inf (541); qworker refuses
    such a header as a ValueError (one failed publish) instead of losing the connection."""
    from pamqp import encode

    with pytest.raises(ValueError, match="non-finite"):
        encode.field_table({"ratio": value})


def test_an_exported_timestamp_past_9999_is_read_back_as_the_same_raw_value() -> None:
    """dlq export writes a timestamp no datetime can hold as its integer seconds; replay
    --from-file reads it back as the same raw value, so the replayed copy carries the same 8
    bytes."""
    import json

    from qworker.dlq.jsonl import parse_line, to_record
    from qworker.dlq.records import dead_letter
    from qworker.wire import RawTimestamp

    stamp = RawTimestamp(2**62)
    letter = dead_letter("orders.dlq", b"{}", {"timestamp": stamp, "message_id": "m-1"}, {})
    line = json.dumps(to_record(letter))
    assert json.loads(line)["properties"]["timestamp"] == 2**62
    again = parse_line(line, "export.jsonl:1")
    assert again.properties["timestamp"] == stamp
