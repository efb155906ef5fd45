"""Decoding AMQP field tables, arrays and timestamps into typed values (see :mod:`qworker.wire`)."""

from __future__ import annotations

import decimal as _decimal
import math
import struct
from collections.abc import Callable
from typing import Any, Final

from qworker.wire._values import (
    _DEC,
    _F64,
    _MS_ABOVE,
    _U32,
    _U64,
    _UTC,
    LOGGER,
    Float32,
    LegacyLongLongInt,
    LongBytes,
    LongInt,
    LongLongInt,
    LongUInt,
    NonFinite64,
    RawTable,
    RawTimestamp,
    ShortInt,
    ShortShortInt,
    ShortShortUInt,
    ShortUInt,
    Timestamp,
    WireInt,
)

# Decoding. Each decoder takes the frame bytes and the offset just past the type
# code, and returns the value and the offset just past it.

_Decoder = Callable[[bytes, int], tuple[Any, int]]


def _int_decoder(cls: type[WireInt]) -> _Decoder:
    unpack = cls.packer.unpack_from
    size = cls.packer.size

    def decode(data: bytes, pos: int) -> tuple[Any, int]:
        return cls(unpack(data, pos)[0]), pos + size

    return decode


def _d_bool(data: bytes, pos: int) -> tuple[Any, int]:
    return data[pos] != 0, pos + 1


def _d_f32(data: bytes, pos: int) -> tuple[Any, int]:
    end = pos + 4
    if end > len(data):
        raise ValueError("truncated float")
    return Float32.from_wire(data[pos:end]), end


def _d_f64(data: bytes, pos: int) -> tuple[Any, int]:
    value = _F64.unpack_from(data, pos)[0]
    if not math.isfinite(value):  # kept with its bytes: only delivered ones are sent back
        value = NonFinite64(value)
        value.wire = bytes(data[pos : pos + 8])
    return value, pos + 8


def _d_decimal(data: bytes, pos: int) -> tuple[Any, int]:
    scale, raw = _DEC.unpack_from(data, pos)
    return _decimal.Decimal(f"{raw}E-{scale}"), pos + 5


def _sized(data: bytes, pos: int) -> tuple[int, int]:
    start = pos + 4
    end = start + _U32.unpack_from(data, pos)[0]
    if end > len(data):
        raise ValueError("length runs past the data")
    return start, end


def _d_longstr(data: bytes, pos: int) -> tuple[Any, int]:
    start, end = _sized(data, pos)
    raw = data[start:end]
    try:
        return raw.decode("utf-8"), end
    except UnicodeDecodeError:
        return LongBytes(raw), end


def _d_bytearray(data: bytes, pos: int) -> tuple[Any, int]:
    start, end = _sized(data, pos)
    return bytearray(data[start:end]), end


def _timestamp(raw: int) -> Timestamp | RawTimestamp:
    try:
        value = Timestamp.fromtimestamp(raw / 1000.0 if raw > _MS_ABOVE else raw, _UTC)
    except (OverflowError, ValueError, OSError):
        return RawTimestamp(raw)
    value.raw = raw
    return value


def _d_timestamp(data: bytes, pos: int) -> tuple[Any, int]:
    return _timestamp(_U64.unpack_from(data, pos)[0]), pos + 8


def _d_table(data: bytes, pos: int) -> tuple[Any, int]:
    start, end = _sized(data, pos)
    table: dict[str, Any] = {}
    decoders = _DECODERS
    while start < end:
        key_end = start + 1 + data[start]
        key = data[start + 1 : key_end].decode("utf-8", "surrogateescape")
        table[key], start = decoders[data[key_end]](data, key_end + 1)
    if start != end:
        raise ValueError("a field runs past its table")
    return table, end


def _d_array(data: bytes, pos: int) -> tuple[Any, int]:
    start, end = _sized(data, pos)
    items: list[Any] = []
    decoders = _DECODERS
    while start < end:
        value, start = decoders[data[start]](data, start + 1)
        items.append(value)
    if start != end:
        raise ValueError("a field runs past its array")
    return items, end


def _d_void(data: bytes, pos: int) -> tuple[Any, int]:
    return None, pos


_DECODERS: Final[dict[int, _Decoder]] = {
    ord("t"): _d_bool,
    ord("b"): _int_decoder(ShortShortInt),
    ord("B"): _int_decoder(ShortShortUInt),
    ord("s"): _int_decoder(ShortInt),
    ord("u"): _int_decoder(ShortUInt),
    ord("I"): _int_decoder(LongInt),
    ord("i"): _int_decoder(LongUInt),
    ord("l"): _int_decoder(LongLongInt),
    ord("L"): _int_decoder(LegacyLongLongInt),
    ord("f"): _d_f32,
    ord("d"): _d_f64,
    ord("D"): _d_decimal,
    ord("S"): _d_longstr,
    ord("x"): _d_bytearray,
    ord("T"): _d_timestamp,
    ord("F"): _d_table,
    ord("A"): _d_array,
    ord("V"): _d_void,
    0: _d_void,  # pamqp reads a NUL type as void ("seen in the wild"); encodes back as V
}

_MALFORMED: Final = (ValueError, KeyError, IndexError, struct.error, RecursionError)


def decode_value(data: bytes) -> tuple[int, Any]:
    """Decode one typed field value (type code first): ``(bytes consumed, value)``."""
    if not data:
        return 0, None
    try:
        value, end = _DECODERS[data[0]](data, 1)
    except _MALFORMED as exc:
        raise ValueError(f"cannot decode field value: {exc!r}") from None
    if end > len(data):
        raise ValueError("field value runs past the data")
    return end, value


def decode_table(data: bytes) -> tuple[int, dict[str, Any]]:
    """Decode a field table (4-byte length first): ``(bytes consumed, table)``.

    A table that cannot be parsed, but whose length fits the data, becomes an empty
    :class:`RawTable` keeping its bytes, so one bad header cannot fail the frame.
    """
    try:
        value, end = _d_table(data, 0)
        return end, value
    except _MALFORMED as exc:
        try:
            _, end = _sized(data, 0)
        except (ValueError, struct.error):
            raise ValueError(f"cannot decode field table: {exc!r}") from None
        # The type only: the exception's text may quote header bytes (a secret, say).
        LOGGER.warning("undecodable AMQP field table kept as raw bytes: %s", type(exc).__name__)
        table = RawTable()
        table.raw = bytes(data[:end])
        return end, table


def decode_array(data: bytes) -> tuple[int, list[Any]]:
    """Decode a field array (4-byte length first): ``(bytes consumed, list)``."""
    try:
        value, end = _d_array(data, 0)
    except _MALFORMED as exc:
        raise ValueError(f"cannot decode field array: {exc!r}") from None
    return end, value


def decode_timestamp(data: bytes) -> tuple[int, Timestamp | RawTimestamp]:
    """Decode a 64-bit timestamp; never fails on its value."""
    try:
        return 8, _timestamp(_U64.unpack_from(data, 0)[0])
    except struct.error as exc:
        raise ValueError("Could not unpack timestamp value") from exc


def decode_short_str(data: bytes) -> tuple[int, str]:
    """Decode a short string; octets that are not UTF-8 are kept as surrogate escapes."""
    if not data:
        raise ValueError("Could not unpack short string value")
    end = 1 + data[0]
    if end > len(data):
        raise ValueError("short string runs past the data")
    return end, data[1:end].decode("utf-8", "surrogateescape")
