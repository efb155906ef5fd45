"""qworker.wire's encoder shortcuts write exactly what the encoder wrote before them.

``encode_table`` remembers encoded keys and writes ASCII strings and small ints inline,
and a delivered timestamp skips re-reading its raw value when it provably reads the same.
Every public encode entry point is checked against a frozen copy of the encoder as it was
before those shortcuts (qworker/wire/_encode.py at bfcdaca, below): the same bytes, or an
error of the same type with the same message, on randomized values of every field type at
its edges, nested; and, where pamqp's own encoder agrees on the types, against pamqp too.
"""

from __future__ import annotations

import calendar
import datetime as dt
import decimal
import logging
import math
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pamqp import encode as pamqp_encode

from qworker import wire
from qworker.wire import _encode
from qworker.wire._decode import _timestamp
from qworker.wire._values import (
    _DEC,
    _EMPTY_TABLE,
    _F32,
    _F64,
    _NEG_DEC,
    _U8,
    _U32,
    _U64,
    _U64_MAX,
    _UTC,
    LOGGER,
    Float32,
    LongBytes,
    NonFinite64,
    RawTable,
    RawTimestamp,
    Timestamp,
    WireInt,
)

# The oracle: the encoder before the shortcuts, verbatim but for the ``_ref`` names.


def _ref_wire_int(value: WireInt) -> bytes:
    try:
        return value.code + value.packer.pack(value)
    except struct.error:
        raise ValueError(f"{value!r} does not fit AMQP type {value.code.decode()}") from None


def _ref_int(value: int) -> bytes:
    encoded: bytes = pamqp_encode.table_integer(value)
    return encoded


def _ref_bool(value: bool) -> bytes:
    return b"t\x01" if value else b"t\x00"


def _ref_float(value: float) -> bytes:
    if not math.isfinite(value):
        raise ValueError(f"RabbitMQ refuses non-finite float headers ({value!r})")
    return b"d" + _F64.pack(value)


def _ref_non_finite64(value: NonFinite64) -> bytes:
    data: bytes | None = getattr(value, "wire", None)
    if data is None:
        return _ref_float(value)
    return b"d" + data


def _ref_float32(value: Float32) -> bytes:
    data: bytes | None = getattr(value, "wire", None)
    if data is not None:
        return b"f" + data
    try:
        return b"f" + _F32.pack(value)
    except (OverflowError, struct.error) as exc:
        raise ValueError(f"{value!r} does not fit a 32-bit float: {exc}") from None


def _ref_decimal(value: decimal.Decimal) -> bytes:
    _, _, exponent = value.as_tuple()
    if not isinstance(exponent, int):
        raise TypeError(f"Cannot encode {value} as a decimal")
    scale = max(0, -exponent)
    if scale > 255:
        raise ValueError("Decimal scale range: 0 to 255")
    mantissa = int(value.scaleb(scale, decimal.Context(prec=100)))
    if 0 <= mantissa <= 0xFFFFFFFF:
        return b"D" + _DEC.pack(scale, mantissa)
    if -(2**31) <= mantissa < 0:
        return b"D" + _NEG_DEC.pack(scale, mantissa)
    raise ValueError(f"Decimal mantissa out of range: {value}")


def _ref_long(value: bytes) -> bytes:
    if len(value) > 0xFFFFFFFF:
        raise ValueError("value exceeds 4294967295 bytes")
    return _U32.pack(len(value)) + value


def _ref_str(value: str) -> bytes:
    return b"S" + _ref_long(value.encode("utf-8"))


def _ref_long_bytes(value: LongBytes) -> bytes:
    return b"S" + _ref_long(bytes(value))


def _ref_bytes(value: bytes | bytearray) -> bytes:
    return b"x" + _ref_long(bytes(value))


def _ref_timestamp_payload(value: object) -> bytes:
    if isinstance(value, RawTimestamp):
        return _U64.pack(value.raw)
    if isinstance(value, dt.datetime):
        raw = getattr(value, "raw", None)
        if raw is not None and _ref_same_instant(raw, value):
            return _U64.pack(raw)
        if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
            value = value.replace(tzinfo=_UTC)
        seconds = int(value.timestamp())
    elif isinstance(value, time.struct_time):
        seconds = calendar.timegm(value)
    else:
        raise TypeError(f"datetime.datetime or time.struct_time required, received {type(value)}")
    if not 0 <= seconds <= _U64_MAX:
        raise ValueError(f"timestamp before 1970 cannot be sent: {value!r}")
    return _U64.pack(seconds)


def _ref_same_instant(raw: int, value: dt.datetime) -> bool:
    reading = _timestamp(raw)
    return isinstance(reading, dt.datetime) and reading == value


def _ref_timestamp(value: object) -> bytes:
    return b"T" + _ref_timestamp_payload(value)


def _ref_table_payload(value: Any) -> bytes:
    if not value:
        raw = getattr(value, "raw", None) if type(value) is RawTable else None
        return raw if raw is not None else _EMPTY_TABLE
    if not isinstance(value, dict):
        raise TypeError(f"dict required, received {type(value)}")
    parts: list[bytes] = []
    for key, item in value.items():
        if not isinstance(key, str):
            raise TypeError(f"table keys must be str, received {type(key)}")
        name = key.encode("utf-8", "surrogateescape")
        if len(name) > 255:
            LOGGER.warning("Truncating key %s to 128 bytes", key)
            name = name[:128].decode("utf-8", "ignore").encode("utf-8")
        parts.append(_U8.pack(len(name)))
        parts.append(name)
        try:
            parts.append(ref_encode_value(item))
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{key} error: {exc}") from exc
    return _ref_long(b"".join(parts))


def _ref_table(value: Any) -> bytes:
    return b"F" + _ref_table_payload(value)


def _ref_array_payload(value: Any) -> bytes:
    if not isinstance(value, list):
        raise TypeError(f"list of values required, received {type(value)}")
    return _ref_long(b"".join([ref_encode_value(item) for item in value]))


def _ref_array(value: Any) -> bytes:
    return b"A" + _ref_array_payload(value)


def _ref_void(_: None) -> bytes:
    return b"V"


_REF_ENCODERS: dict[type, Callable[[Any], bytes]] = {
    bool: _ref_bool,
    int: _ref_int,
    float: _ref_float,
    str: _ref_str,
    dict: _ref_table,
    list: _ref_array,
    type(None): _ref_void,
    bytearray: _ref_bytes,
    bytes: _ref_bytes,
    LongBytes: _ref_long_bytes,
    Float32: _ref_float32,
    NonFinite64: _ref_non_finite64,
    decimal.Decimal: _ref_decimal,
    dt.datetime: _ref_timestamp,
    Timestamp: _ref_timestamp,
    RawTimestamp: _ref_timestamp,
    time.struct_time: _ref_timestamp,
    RawTable: _ref_table,
    **{cls: _ref_wire_int for cls in WireInt.__subclasses__()},
}
_REF_FALLBACK: tuple[tuple[type | tuple[type, ...], Callable[[Any], bytes]], ...] = (
    (bool, _ref_bool),
    (WireInt, _ref_wire_int),
    (int, _ref_int),
    (Float32, _ref_float32),
    (NonFinite64, _ref_non_finite64),
    (float, _ref_float),
    (decimal.Decimal, _ref_decimal),
    (str, _ref_str),
    (LongBytes, _ref_long_bytes),
    ((bytes, bytearray), _ref_bytes),
    ((dt.datetime, time.struct_time, RawTimestamp), _ref_timestamp),
    (dict, _ref_table),
    (list, _ref_array),
)


def ref_encode_value(value: Any) -> bytes:
    encoder = _REF_ENCODERS.get(type(value))
    if encoder is None:
        for kind, candidate in _REF_FALLBACK:
            if isinstance(value, kind):
                encoder = candidate
                break
        else:
            raise TypeError(f"Unknown type: {type(value)} ({value!r})")
    try:
        return encoder(value)
    except (OverflowError, struct.error, UnicodeError) as exc:
        raise ValueError(f"cannot encode {type(value).__name__}: {exc}") from None
    except RecursionError:
        raise ValueError("value nested too deeply to encode") from None


def ref_encode_table(value: Any) -> bytes:
    try:
        return _ref_table_payload(value)
    except (OverflowError, struct.error, UnicodeError) as exc:
        raise ValueError(f"cannot encode table: {exc}") from None
    except RecursionError:
        raise ValueError("table nested too deeply to encode") from None


def ref_encode_array(value: Any) -> bytes:
    try:
        return _ref_array_payload(value)
    except (OverflowError, struct.error, UnicodeError) as exc:
        raise ValueError(f"cannot encode array: {exc}") from None
    except RecursionError:
        raise ValueError("array nested too deeply to encode") from None


def ref_encode_timestamp(value: Any) -> bytes:
    return _ref_timestamp_payload(value)


# Comparing outcomes.


def outcome(encode: Callable[[Any], bytes], value: Any) -> tuple[Any, ...]:
    """The bytes, or the error's type and message."""
    try:
        return ("bytes", encode(value))
    except Exception as exc:  # which one is the point
        return ("error", type(exc), str(exc))


PAIRS: list[tuple[str, Callable[[Any], bytes], Callable[[Any], bytes]]] = [
    ("table", wire.encode_table, ref_encode_table),
    ("value", wire.encode_value, ref_encode_value),
    ("array", _encode.encode_array, ref_encode_array),
    ("timestamp", _encode.encode_timestamp, ref_encode_timestamp),
]


def assert_same(value: Any) -> None:
    for name, new, ref in PAIRS:
        expected = outcome(ref, value)
        assert outcome(new, value) == expected, name
        assert outcome(new, value) == expected, f"{name}, keys remembered"


@pytest.fixture(autouse=True)
def _codec_installed() -> Iterator[None]:
    assert wire.installed()
    yield
    wire.install()


# Values of every field type, at their edges.


class TextSubclass(str):
    __slots__ = ()


class OddKey(str):
    """A str whose encode() is its own: a remembered plain key must not stand in for it."""

    __slots__ = ()

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return b"odd:" + str.encode(self, encoding, errors)


class IntSubclass(int):
    __slots__ = ()


class TableSubclass(dict[str, Any]):
    pass


_WIDTHS = (7, 8, 15, 16, 31, 32, 63, 64)
INT_EDGES = sorted(
    {sign * (2**bits) + delta for bits in _WIDTHS for sign in (1, -1) for delta in (-1, 0, 1)}
    | {0, 1, -1, 5}
)
ints = st.one_of(st.sampled_from(INT_EDGES), st.integers(-(2**65), 2**65), st.integers(-300, 300))
wire_ints = st.sampled_from(WireInt.__subclasses__()).flatmap(
    lambda cls: st.one_of(st.sampled_from(INT_EDGES), st.integers(-(2**64), 2**64)).map(cls)
)

SPECIAL_TEXT = [
    "",
    "a",
    "x" * 70_000,
    "é" * 300,
    "héllo ✓ 𝄞",
    "\x00\x7f",
    "\udcff",  # a surrogate escape: refused in a value (strict UTF-8), octet 0xff in a key
    "ok\ud800",  # a lone surrogate: refused in a value and in a key
    "k" * 255,
    "k" * 256,
    "é" * 127 + "k",  # 255 bytes
    "é" * 128,  # 256 bytes: a key is cut to 128
    "x-qworker-attempt",
    "x-qworker-history",
]
texts = st.one_of(
    st.sampled_from(SPECIAL_TEXT),
    st.text(max_size=40),
    st.text(alphabet=st.characters(max_codepoint=127), max_size=300),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=40),
    st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), max_size=3),
)
_key_texts = st.one_of(  # the long texts above, but one over 255 bytes is enough
    st.sampled_from([t for t in SPECIAL_TEXT if len(t) < 1000]),
    st.text(max_size=40),
    st.text(alphabet=st.characters(max_codepoint=127), max_size=300),
    st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), max_size=3),
)
keys = st.one_of(
    _key_texts,
    _key_texts.map(TextSubclass),
    _key_texts.map(OddKey),
    st.sampled_from([1, b"bytes-key", None]),  # refused: keys must be str
)


def _float32(data: bytes) -> Float32:
    return Float32.from_wire(data)


def _non_finite(data: bytes, keep_wire: bool) -> NonFinite64:
    value = NonFinite64(struct.unpack(">d", data)[0])
    if keep_wire:
        value.wire = data
    return value


floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 0.1, 1e300, -1e300, 5e-324, 1.7976931348623157e308]),
    st.binary(min_size=4, max_size=4).map(_float32),
    st.floats(allow_nan=True, allow_infinity=True).map(Float32),  # no wire bytes: packed
    st.tuples(
        st.sampled_from([math.inf, -math.inf, math.nan, 1.5]).map(lambda v: struct.pack(">d", v)),
        st.booleans(),
    ).map(lambda args: _non_finite(*args)),
)
decimals = st.one_of(
    st.decimals(allow_nan=True, allow_infinity=True),
    st.decimals(allow_nan=False, allow_infinity=False, places=3),
    st.sampled_from(
        [
            decimal.Decimal("0"),
            decimal.Decimal("-0"),
            decimal.Decimal("12.345"),
            decimal.Decimal("1E+5"),
            decimal.Decimal(f"{2**32 - 1}E-255"),
            decimal.Decimal(f"{2**32}"),
            decimal.Decimal(f"-{2**31}"),
            decimal.Decimal(f"-{2**31 + 1}"),
            decimal.Decimal("1E-256"),
            decimal.Decimal("sNaN"),
        ]
    ),
)

_YEAR_9999_S = 253402300799
RAW_EDGES = [
    0,
    1,
    1_764_457_394,
    2**32 - 1,
    2**32,
    _YEAR_9999_S,
    _YEAR_9999_S * 1000 + 999,
    (_YEAR_9999_S + 1) * 1000,
    1_700_000_000_000_000,
    2**63 - 1,
    2**64 - 1,
]
raws = st.one_of(st.sampled_from(RAW_EDGES), st.integers(0, 2**64 - 1), st.integers(0, 2**32))
offsets = st.builds(
    dt.timezone, st.timedeltas(min_value=dt.timedelta(hours=-23), max_value=dt.timedelta(hours=23))
)


class ForeignStamp(dt.datetime):
    """A datetime from elsewhere with a ``raw`` and its own equality (compared first if asked)."""

    raw: Any = None

    def __eq__(self, other: object) -> bool:
        return True

    __hash__ = dt.datetime.__hash__


def _foreign(moment: dt.datetime, raw: Any) -> ForeignStamp:
    value = ForeignStamp.fromisoformat(moment.isoformat())
    value.raw = raw
    return value


def _tampered(raw: int, other: Any) -> Any:
    """A delivered timestamp whose ``raw`` was changed by hand: it may no longer read the same."""
    value = _timestamp(raw)
    if isinstance(value, Timestamp):
        value.raw = other
    return value


def _hand_made(moment: dt.datetime, raw: Any) -> Timestamp:
    value = Timestamp(
        moment.year,
        moment.month,
        moment.day,
        moment.hour,
        moment.minute,
        moment.second,
        moment.microsecond,
        tzinfo=moment.tzinfo,
        fold=moment.fold,
    )
    value.raw = raw
    return value


datetimes = st.datetimes(
    min_value=dt.datetime(1, 1, 2),
    max_value=dt.datetime(9999, 12, 30),
    timezones=st.one_of(st.none(), st.just(_UTC), offsets),
    allow_imaginary=True,
)
timestamps = st.one_of(
    raws.map(_timestamp),  # as delivered: a Timestamp, or a RawTimestamp past 9999
    st.builds(
        _tampered,
        raws,
        st.one_of(raws, st.integers(-5, 5), st.sampled_from([-1, 5.0, 5.5, "5", True, None])),
    ),
    st.builds(_hand_made, datetimes, st.one_of(raws, st.integers(-(2**33), -1))),
    st.builds(_foreign, datetimes, raws),
    datetimes,
    raws.map(RawTimestamp),
    st.integers(-(2**31), 2**34).map(time.gmtime),
)


def _raw_table(data: bytes, extra: dict[str, Any]) -> RawTable:
    table = RawTable(extra)
    table.raw = data
    return table


binaries = st.binary(max_size=300)
scalars = st.one_of(
    texts,
    texts.map(TextSubclass),
    ints,
    ints.map(IntSubclass),
    wire_ints,
    st.booleans(),
    floats,
    decimals,
    timestamps,
    binaries,
    binaries.map(bytearray),
    binaries.map(LongBytes),
    st.none(),
    st.sampled_from([memoryview(b"mv"), (1, 2), {1, 2}, frozenset(), object(), 1j]),  # unknown
    st.builds(_raw_table, binaries, st.sampled_from([{}, {"added": 1}])),
    st.just(RawTable()),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=6),
        st.dictionaries(keys, children, max_size=8),
        st.dictionaries(_key_texts, children, max_size=8).map(TableSubclass),
    ),
    max_leaves=40,
)
tables = st.dictionaries(keys, values, max_size=12)

_CHECKS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_CHECKS
@given(tables)
def test_tables_encode_as_before(table: dict[Any, Any]) -> None:
    assert_same(table)


@_CHECKS
@given(values)
def test_values_encode_as_before(value: Any) -> None:
    assert_same(value)


@_CHECKS
@given(st.lists(values, max_size=6))
def test_arrays_encode_as_before(items: list[Any]) -> None:
    assert_same(items)


@_CHECKS
@given(timestamps)
def test_timestamps_encode_as_before(value: Any) -> None:
    assert_same(value)
    assert_same({"time": value})


@pytest.mark.parametrize("value", INT_EDGES + list(range(-130, 131)))
def test_every_int_width_boundary_encodes_as_before(value: int) -> None:
    assert_same({"n": value, "m": IntSubclass(value)})
    for cls in WireInt.__subclasses__():
        assert_same({"n": cls(value)})


@pytest.mark.parametrize("value", [*SPECIAL_TEXT, *(chr(c) for c in range(0, 0x300, 7))])
def test_special_strings_encode_as_before(value: str) -> None:
    assert_same({"s": value, value: "as a key", "sub": TextSubclass(value)})


def test_small_ints_are_pamqps_fields_in_both_of_its_modes() -> None:
    try:
        for enabled in (False, True):
            pamqp_encode.support_deprecated_rabbitmq(enabled)
            for value in range(-128, 128):
                assert _encode._SMALL_INT_FIELDS[value + 128] == pamqp_encode.table_integer(value)
                assert wire.encode_table({"n": value}) == ref_encode_table({"n": value})
            # outside -128..127 the modes differ; the table still follows pamqp's choice
            assert wire.encode_table({"n": 40000}) == ref_encode_table({"n": 40000})
    finally:
        pamqp_encode.support_deprecated_rabbitmq(False)


def _failure_headers() -> dict[str, Any]:
    """Headers like a third failure's DLQ copy: the incoming copy's (typed) and fresh ones."""
    at = "2026-11-29T23:03:14.927+00:00"
    history = [
        {"attempt": n, "at": at, "error_type": "app.Upstream", "error_message": "503 for 8812"}
        for n in (1, 2, 3)
    ]
    incoming = {
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "x-tenant": "acmé",
        "x-priority-class": 3,
        "x-qworker-attempt": 2,
        "x-death": [
            {
                "count": 2,
                "reason": "expired",
                "queue": "orders.retry.1",
                "exchange": "",
                "routing-keys": ["orders.retry.1"],
                "time": dt.datetime(2026, 11, 29, 23, 3, 14, tzinfo=_UTC),
            }
        ],
    }
    typed = wire.decode_table(wire.encode_table(incoming))[1]
    return {
        **typed,
        "x-qworker-attempt": 3,
        "x-qworker-first-failure-at": at,
        "x-qworker-error-type": "app.Upstream",
        "x-qworker-error-message": "503 for 8812 (Zürich)",
        "x-qworker-error-traceback": 'Traceback (most recent call last):\n  File "a.py"\n' * 20,
        "x-qworker-original-exchange": "",
        "x-qworker-history": history,
        "x-qworker-deaths": [{"queue": "orders.retry.1", "count": 2, "time": typed["x-death"][0]}],
        "x-qworker-flag": True,
    }


def test_failure_headers_encode_as_before_and_round_trip() -> None:
    headers = _failure_headers()
    first = wire.encode_table(headers)
    assert first == ref_encode_table(headers)
    assert wire.encode_table(headers) == first  # keys remembered now
    assert wire.encode_table(wire.decode_table(first)[1]) == first


def test_a_delivered_timestamp_property_keeps_its_raw_value() -> None:
    for raw in RAW_EDGES:
        value = _timestamp(raw)
        assert wire.encode_value(value) == b"T" + struct.pack(">Q", raw)
        assert _encode.encode_timestamp(value) == struct.pack(">Q", raw)


_CHANGED_RAWS = [
    (raw, raw + delta)
    for raw in RAW_EDGES
    if isinstance(_timestamp(raw), Timestamp)
    for delta in (-(2**32), -1000, -1, 1, 1000, 2**32)
    if raw + delta >= 0
]


@pytest.mark.parametrize(("raw", "changed"), _CHANGED_RAWS)
def test_a_timestamp_whose_raw_was_changed_encodes_as_before(raw: int, changed: int) -> None:
    value = _timestamp(raw)
    assert isinstance(value, Timestamp)
    value.raw = changed
    assert_same(value)
    if raw <= 2**32 - 1:  # read as seconds: the datetime's own seconds are sent
        assert wire.encode_value(value) == b"T" + struct.pack(">Q", raw)


def test_a_foreign_datetime_with_a_raw_compares_as_before() -> None:
    moment = dt.datetime(2026, 11, 29, 23, 3, 14, tzinfo=_UTC)
    seconds = int(moment.timestamp())
    for raw in (5, seconds - 1, seconds, 2**32 + 5):
        value = _foreign(moment, raw)
        assert_same(value)
        # the reading's own comparison is asked first, not ForeignStamp's "always equal"
        assert wire.encode_value(value) == b"T" + struct.pack(">Q", seconds)


def test_remembered_keys_are_bounded_and_only_plain_short_keys() -> None:
    _encode._key_memo.clear()
    many = {f"producer-key-{i}": i for i in range(_encode._KEY_MEMO_SIZE + 500)}
    assert wire.encode_table(many) == ref_encode_table(many)
    assert 0 < len(_encode._key_memo) <= _encode._KEY_MEMO_SIZE
    long_key = "k" * 256
    odd = OddKey("x-odd")
    wire.encode_table({"x-odd": 1, odd: 2, TextSubclass("x-sub"): 3, long_key: 4})
    assert _encode._key_memo["x-odd"] == b"\x05x-odd"
    assert "x-sub" not in _encode._key_memo
    assert long_key not in _encode._key_memo
    # odd == "x-odd", and "x-odd" is remembered: odd still encodes its own way
    assert wire.encode_table({odd: 2}) == ref_encode_table({odd: 2})
    assert wire.encode_table({odd: 2})[4:10] == b"\x09odd:x"


def test_an_over_long_key_is_logged_every_time(caplog: pytest.LogCaptureFixture) -> None:
    table = {"k" * 300: 1}
    expected = ref_encode_table(table)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER.name):
        for _ in range(3):
            assert wire.encode_table(table) == expected
    assert sum("Truncating key" in r.getMessage() for r in caplog.records) == 3


def _nested(depth: int) -> dict[str, Any]:
    """A table holding an array holding a table ... ``depth`` times (one chain, no sharing)."""
    table: dict[str, Any] = {"leaf": "text", "n": 5}
    for _ in range(depth):
        table = {"a": [{"t": table}, "x"]}
    return table


def test_deep_nesting_is_still_a_value_error() -> None:
    with pytest.raises(ValueError, match="nested too deeply"):
        wire.encode_table(_nested(5000))
    moderate = _nested(60)
    assert wire.encode_table(moderate) == ref_encode_table(moderate)


# pamqp's own encoder, where it agrees on the types: text, 64-bit ints, bools, void, byte
# arrays, and tables (pamqp sorts their keys; cuts keys at 128 bytes) and arrays of them.

_pamqp_keys = st.text(alphabet=st.characters(codec="utf-8"), max_size=20)
_pamqp_values = st.recursive(
    st.one_of(
        st.text(alphabet=st.characters(codec="utf-8"), max_size=60),
        st.integers(-(2**63), 2**63 - 1),
        st.booleans(),
        st.none(),
        st.binary(max_size=30).map(bytearray),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=5), st.dictionaries(_pamqp_keys, children, max_size=5)
    ),
    max_leaves=25,
)


def _sorted_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted_keys(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted_keys(v) for v in value]
    return value


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(_pamqp_keys, _pamqp_values, max_size=10))
def test_tables_encode_as_pamqp_does_where_types_agree(table: dict[str, Any]) -> None:
    table = _sorted_keys(table)
    ours = wire.encode_table(table)
    wire.uninstall()
    try:
        theirs = pamqp_encode.field_table(table)
    finally:
        wire.install()
    assert ours == theirs
