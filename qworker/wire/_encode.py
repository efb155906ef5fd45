"""Encoding typed (and plain) values to AMQP fields: the same type code and bytes they came with.

See :mod:`qworker.wire`.
"""

from __future__ import annotations

import calendar
import datetime as _dt
import decimal as _decimal
import math
import struct
import time
from collections.abc import Callable
from typing import Any, Final

from pamqp import encode as _pencode

from qworker.wire._decode import _timestamp
from qworker.wire._values import (
    _DEC,
    _EMPTY_TABLE,
    _F32,
    _F64,
    _MS_ABOVE,
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

# Encoding. Each encoder returns the type code and the value's bytes.

_Encoder = Callable[[Any], bytes]


def _e_wire_int(value: WireInt) -> bytes:
    try:
        return value.code + value.packer.pack(value)
    except struct.error:
        raise ValueError(f"{value!r} does not fit AMQP type {value.code.decode()}") from None


def _e_int(value: int) -> bytes:
    encoded: bytes = _pencode.table_integer(value)
    return encoded  # smallest type; TypeError outside 64 bits


# pamqp's fields for -128..127 (attempt numbers, counts), looked up by ``value + 128``. Both
# of pamqp's integer modes (``support_deprecated_rabbitmq``) write these as ``b``.
_SMALL_INT_FIELDS: Final[tuple[bytes, ...]] = tuple(_e_int(i) for i in range(-128, 128))


def _e_bool(value: bool) -> bytes:
    return b"t\x01" if value else b"t\x00"


def _e_float(value: float) -> bytes:
    # RabbitMQ (3.10 checked) refuses a non-finite float header by closing the publisher's
    # *connection* (541, Erlang floats have no NaN/inf): on a worker's connection that would
    # take every consumer down. Refused here instead, as one failed publish.
    if not math.isfinite(value):
        raise ValueError(f"RabbitMQ refuses non-finite float headers ({value!r})")
    return b"d" + _F64.pack(value)


def _e_non_finite64(value: NonFinite64) -> bytes:
    wire: bytes | None = getattr(value, "wire", None)
    if wire is None:
        return _e_float(value)
    return b"d" + wire


def _e_float32(value: Float32) -> bytes:
    wire: bytes | None = getattr(value, "wire", None)
    if wire is not None:
        return b"f" + wire
    try:
        return b"f" + _F32.pack(value)
    except (OverflowError, struct.error) as exc:
        raise ValueError(f"{value!r} does not fit a 32-bit float: {exc}") from None


def _decimal_payload(value: _decimal.Decimal) -> bytes:
    _, _, exponent = value.as_tuple()
    if not isinstance(exponent, int):
        raise TypeError(f"Cannot encode {value} as a decimal")
    scale = max(0, -exponent)
    if scale > 255:
        raise ValueError("Decimal scale range: 0 to 255")
    mantissa = int(value.scaleb(scale, _decimal.Context(prec=100)))
    if 0 <= mantissa <= 0xFFFFFFFF:
        return _DEC.pack(scale, mantissa)
    if -(2**31) <= mantissa < 0:
        return _NEG_DEC.pack(scale, mantissa)  # as pamqp wrote negative decimals
    raise ValueError(f"Decimal mantissa out of range: {value}")


def _e_decimal(value: _decimal.Decimal) -> bytes:
    return b"D" + _decimal_payload(value)


_LONG_MAX: Final = 0xFFFFFFFF  # longest long string or table


def _long(value: bytes) -> bytes:
    if len(value) > _LONG_MAX:
        raise ValueError("value exceeds 4294967295 bytes")
    return _U32.pack(len(value)) + value


def _e_str(value: str) -> bytes:
    return b"S" + _long(value.encode("utf-8"))


def _e_long_bytes(value: LongBytes) -> bytes:
    return b"S" + _long(bytes(value))


def _e_bytes(value: bytes | bytearray) -> bytes:
    return b"x" + _long(bytes(value))


def _timestamp_payload(value: object) -> bytes:
    if isinstance(value, RawTimestamp):
        return _U64.pack(value.raw)
    if isinstance(value, _dt.datetime):
        raw = getattr(value, "raw", None)
        if raw is not None and _same_instant(raw, value):
            return _U64.pack(raw)
        if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
            value = value.replace(tzinfo=_UTC)  # naive: taken as UTC, as pamqp does
        seconds = int(value.timestamp())
    elif isinstance(value, time.struct_time):
        seconds = calendar.timegm(value)
    else:
        raise TypeError(f"datetime.datetime or time.struct_time required, received {type(value)}")
    if not 0 <= seconds <= _U64_MAX:
        raise ValueError(f"timestamp before 1970 cannot be sent: {value!r}")
    return _U64.pack(seconds)


_EPOCH: Final = _dt.datetime(1970, 1, 1, tzinfo=_UTC)


def _same_instant(raw: int, value: _dt.datetime) -> bool:
    """True when ``raw`` still reads as ``value`` (a ``raw`` set by hand may not)."""
    if type(value) is Timestamp and type(raw) is int and 0 <= raw <= _MS_ABOVE:
        # A delivered timestamp in seconds, the usual case: its reading is exactly _EPOCH
        # plus raw seconds (no float rounding below 2**32), so this is the comparison below
        # without building a Timestamp. (Exact type only: a subclass may compare its own way.)
        return _EPOCH + _dt.timedelta(0, raw) == value
    reading = _timestamp(raw)
    return isinstance(reading, _dt.datetime) and reading == value


def _e_timestamp(value: object) -> bytes:
    return b"T" + _timestamp_payload(value)


# Table keys: the same names (qworker's, the broker's, a producer's) are encoded for every
# copy, so their short-string form is remembered. Producers choose keys too, so the memo is
# bounded: exact ``str`` keys only (a subclass may encode its own way), names that fit a
# short string only (a longer one is cut and logged each time), and it starts again empty
# when full rather than grow.
_KEY_MEMO_SIZE: Final = 4096
_key_memo: dict[str, bytes] = {}


def _encode_key(key: Any) -> bytes:
    """A table key as a short string: length octet, then the octets (surrogate escapes become
    the octets they stand for). Remembered as above."""
    if not isinstance(key, str):
        raise TypeError(f"table keys must be str, received {type(key)}")
    name = key.encode("utf-8", "surrogateescape")
    if len(name) > 255:  # pamqp's behaviour for over-long names
        LOGGER.warning("Truncating key %s to 128 bytes", key)
        name = name[:128].decode("utf-8", "ignore").encode("utf-8")
        return _U8.pack(len(name)) + name
    encoded = _U8.pack(len(name)) + name
    if type(key) is str:
        if len(_key_memo) >= _KEY_MEMO_SIZE:
            _key_memo.clear()
        _key_memo[key] = encoded
    return encoded


def _table_payload(value: Any) -> bytes:
    if not value:
        raw = getattr(value, "raw", None) if type(value) is RawTable else None
        return raw if raw is not None else _EMPTY_TABLE
    if not isinstance(value, dict):
        raise TypeError(f"dict required, received {type(value)}")
    memo = _key_memo
    parts: list[bytes] = []
    append = parts.append
    for key, item in value.items():
        encoded_key = memo.get(key) if type(key) is str else None
        append(_encode_key(key) if encoded_key is None else encoded_key)
        # Most failure headers are ASCII text and small counts: written here, the bytes
        # _e_str and _e_int write, without encode_value's dispatch. Everything else, and
        # anything that could fail, goes through encode_value (same bytes, same errors).
        kind = type(item)
        if kind is str and item.isascii() and len(item) <= _LONG_MAX:
            append(b"S" + _U32.pack(len(item)) + item.encode("ascii"))
        elif kind is int and -128 <= item <= 127:
            append(_SMALL_INT_FIELDS[item + 128])
        else:
            try:  # inline, not a helper: a nested table costs no more stack than before
                append(encode_value(item))
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{key} error: {exc}") from exc
    return _long(b"".join(parts))


def _e_table(value: Any) -> bytes:
    return b"F" + _table_payload(value)


def _array_payload(value: Any) -> bytes:
    if not isinstance(value, list):
        raise TypeError(f"list of values required, received {type(value)}")
    return _long(b"".join([encode_value(item) for item in value]))


def _e_array(value: Any) -> bytes:
    return b"A" + _array_payload(value)


def _e_void(_: None) -> bytes:
    return b"V"


_ENCODERS: Final[dict[type, _Encoder]] = {
    bool: _e_bool,
    int: _e_int,
    float: _e_float,
    str: _e_str,
    dict: _e_table,
    list: _e_array,
    type(None): _e_void,
    bytearray: _e_bytes,
    bytes: _e_bytes,
    LongBytes: _e_long_bytes,
    Float32: _e_float32,
    NonFinite64: _e_non_finite64,
    _decimal.Decimal: _e_decimal,
    _dt.datetime: _e_timestamp,
    Timestamp: _e_timestamp,
    RawTimestamp: _e_timestamp,
    time.struct_time: _e_timestamp,
    RawTable: _e_table,
    **{cls: _e_wire_int for cls in WireInt.__subclasses__()},
}

# Subclasses of the types above, most specific first (bool before int).
_FALLBACK: Final[tuple[tuple[type | tuple[type, ...], _Encoder], ...]] = (
    (bool, _e_bool),
    (WireInt, _e_wire_int),
    (int, _e_int),
    (Float32, _e_float32),
    (NonFinite64, _e_non_finite64),
    (float, _e_float),
    (_decimal.Decimal, _e_decimal),
    (str, _e_str),
    (LongBytes, _e_long_bytes),
    ((bytes, bytearray), _e_bytes),
    ((_dt.datetime, time.struct_time, RawTimestamp), _e_timestamp),
    (dict, _e_table),
    (list, _e_array),
)


def encode_value(value: Any) -> bytes:
    """Encode one field value with its type code. Raises only TypeError or ValueError."""
    encoder = _ENCODERS.get(type(value))
    if encoder is None:
        for kind, candidate in _FALLBACK:
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


def encode_table(value: Any) -> bytes:
    """Encode a field table (4-byte length first). Raises only TypeError or ValueError."""
    try:
        return _table_payload(value)
    except (OverflowError, struct.error, UnicodeError) as exc:
        raise ValueError(f"cannot encode table: {exc}") from None
    except RecursionError:
        raise ValueError("table nested too deeply to encode") from None


def encode_array(value: Any) -> bytes:
    """Encode a field array (4-byte length first). Raises only TypeError or ValueError."""
    try:
        return _array_payload(value)
    except (OverflowError, struct.error, UnicodeError) as exc:
        raise ValueError(f"cannot encode array: {exc}") from None
    except RecursionError:
        raise ValueError("array nested too deeply to encode") from None


def encode_timestamp(value: Any) -> bytes:
    """Encode a timestamp property: a Timestamp/RawTimestamp keeps its wire value."""
    return _timestamp_payload(value)


def encode_short_str(value: Any) -> bytes:
    """Encode a short string; surrogate escapes become the octets they stand for."""
    if not isinstance(value, str):
        raise TypeError(f"str required, received {type(value)}")
    data = value.encode("utf-8", "surrogateescape")
    if len(data) > 255:
        raise TypeError("string exceeds maximum length of 255 bytes")
    return _U8.pack(len(data)) + data
