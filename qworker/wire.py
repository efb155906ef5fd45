"""A type-preserving AMQP field codec, installed into pamqp when qworker is imported.

qworker publishes *copies* of failed messages (retry tiers, DLQ). pamqp decodes a
header table into plain Python values and re-encodes them by Python type, which
loses the AMQP field type and can fail outright: a ``d`` double became an ``f``
float (``1e300`` raised ``OverflowError``, ``0.1`` became ``0.100000001``), an ``l``
5 became a ``b`` 5, a non-UTF-8 ``S`` string could not be encoded at all, and a
timestamp past year 9999 made *decoding* raise, which aiormq turns into a closed
connection before qworker ever sees the message.

This module replaces the decode and encode functions pamqp's table, array,
timestamp and short-string paths go through (``pamqp.decode.METHODS`` /
``pamqp.encode.METHODS`` and the module functions). Decoded values are plain
Python values, or small subclasses of them that remember their wire type; the
encoder writes those back with the same type code and the same bytes.

=====  ===================  =============================  ===========================
code   AMQP type            decoded as                     plain Python value encodes
=====  ===================  =============================  ===========================
t      boolean              ``bool`` (0/1; other octets    ``bool`` -> t
                            read as True, written as 1)
b      int8                 :class:`ShortShortInt` (int)   ``int`` -> smallest of
B      uint8                :class:`ShortShortUInt` (int)  b, s, u, I, i, l (as pamqp)
s      int16                :class:`ShortInt` (int)
u      uint16               :class:`ShortUInt` (int)
I      int32                :class:`LongInt` (int)
i      uint32               :class:`LongUInt` (int)
l      int64                :class:`LongLongInt` (int)
L      int64 (pamqp only)   :class:`LegacyLongLongInt`
f      float32              :class:`Float32` (float; keeps  --
                            the 4 bytes, NaN payloads too)
d      float64              ``float``                      ``float`` -> d (not f)
D      decimal              ``decimal.Decimal``            ``Decimal`` -> D
S      long string          ``str`` (UTF-8) or             ``str`` -> S (UTF-8)
                            :class:`LongBytes` (bytes)
x      byte array           ``bytearray``                  ``bytearray``/``bytes`` -> x
T      timestamp (uint64)   :class:`Timestamp` (datetime)  ``datetime`` -> T (seconds)
                            or :class:`RawTimestamp`
F      table                ``dict``                       ``dict`` -> F
A      array                ``list``                       ``list`` -> A
V      void                 ``None``                       ``None`` -> V
=====  ===================  =============================  ===========================

Typed values behave exactly like their base type (``LongInt(5) == 5``, ``json.dumps``
writes ``5``); arithmetic on them returns plain values, which encode the plain way.
A plain ``float`` encodes as a 64-bit ``d`` (what other clients send; nothing is lost).

Timestamps: the wire value is an unsigned 64-bit count. The datetime a handler sees
is pamqp's reading of it (values above 2**32-1 are taken as milliseconds), so
existing code sees the same datetimes as before, but :attr:`Timestamp.raw` keeps the
exact integer and a copy carries the same 8 bytes. A value whose reading is past
year 9999 decodes to a :class:`RawTimestamp` (not a datetime; ``.raw``, ``.datetime``
is None) instead of failing the frame. aio-pika's timestamp converters accept it.

Robustness: decoding a header table never raises for a valid frame; a table that
cannot be parsed (unknown type code, a nested table deeper than Python's recursion
limit, a length running past its table) decodes to an empty :class:`RawTable` that
re-encodes to the same bytes, instead of closing the connection. Table keys and
short strings (``message_id``, ``type`` ...) that are not UTF-8 decode with
``surrogateescape`` and encode back to the same octets. Every encode failure is a
``TypeError`` or ``ValueError``.
"""

from __future__ import annotations

import calendar
import datetime as _dt
import decimal as _decimal
import logging
import math
import struct
import time
from collections.abc import Callable
from typing import Any, ClassVar, Final

from pamqp import decode as _pdecode
from pamqp import encode as _pencode

__all__ = [
    "Float32",
    "LegacyLongLongInt",
    "LongBytes",
    "LongInt",
    "LongLongInt",
    "LongUInt",
    "RawTable",
    "RawTimestamp",
    "ShortInt",
    "ShortShortInt",
    "ShortShortUInt",
    "ShortUInt",
    "Timestamp",
    "WireInt",
    "decode_table",
    "decode_value",
    "encode_table",
    "encode_value",
    "install",
    "installed",
    "uninstall",
]

LOGGER = logging.getLogger(__name__)

_U8: Final = struct.Struct(">B")
_U32: Final = struct.Struct(">I")
_U64: Final = struct.Struct(">Q")
_F32: Final = struct.Struct(">f")
_F64: Final = struct.Struct(">d")
_DEC: Final = struct.Struct(">BI")
_NEG_DEC: Final = struct.Struct(">Bi")
_UTC: Final = _dt.UTC
_MS_ABOVE: Final = 0xFFFFFFFF  # pamqp reads larger timestamps as milliseconds
_U64_MAX: Final = 2**64 - 1
_EMPTY_TABLE: Final = b"\x00\x00\x00\x00"


# Typed values.


class WireInt(int):
    """An integer that remembers its AMQP field type; behaves as a plain ``int``."""

    __slots__ = ()
    code: ClassVar[bytes] = b""
    packer: ClassVar[struct.Struct]


class ShortShortInt(WireInt):
    """``b``: signed 8-bit."""

    __slots__ = ()
    code = b"b"
    packer = struct.Struct(">b")


class ShortShortUInt(WireInt):
    """``B``: unsigned 8-bit."""

    __slots__ = ()
    code = b"B"
    packer = struct.Struct(">B")


class ShortInt(WireInt):
    """``s``: signed 16-bit (RabbitMQ's reading; not the 0-9-1 short string)."""

    __slots__ = ()
    code = b"s"
    packer = struct.Struct(">h")


class ShortUInt(WireInt):
    """``u``: unsigned 16-bit."""

    __slots__ = ()
    code = b"u"
    packer = struct.Struct(">H")


class LongInt(WireInt):
    """``I``: signed 32-bit."""

    __slots__ = ()
    code = b"I"
    packer = struct.Struct(">i")


class LongUInt(WireInt):
    """``i``: unsigned 32-bit."""

    __slots__ = ()
    code = b"i"
    packer = struct.Struct(">I")


class LongLongInt(WireInt):
    """``l``: signed 64-bit."""

    __slots__ = ()
    code = b"l"
    packer = struct.Struct(">q")


class LegacyLongLongInt(WireInt):
    """``L``: not a RabbitMQ type; pamqp reads it as signed 64-bit, so do we."""

    __slots__ = ()
    code = b"L"
    packer = struct.Struct(">q")


class NonFinite64(float):
    """A delivered ``d`` that is NaN or infinite, with its 8 wire bytes.

    A plain non-finite ``float`` is refused on encode (RabbitMQ 3.10 closes the connection
    of a publisher that sends one); one the broker itself delivered is sent back as it came.
    """

    wire: bytes


class Float32(float):
    """``f``: a 32-bit float; keeps the 4 wire bytes (a float32 NaN payload survives)."""

    __slots__ = ("wire",)
    wire: bytes

    @classmethod
    def from_wire(cls, data: bytes) -> Float32:
        value = cls(_F32.unpack(data)[0])
        value.wire = data
        return value


class LongBytes(bytes):
    """``S``: a long string whose octets are not UTF-8; encodes back as ``S``."""

    __slots__ = ()


class Timestamp(_dt.datetime):
    """``T`` (or the ``timestamp`` property) read as a UTC datetime; ``raw`` is the wire value.

    The datetime is pamqp's reading (above 2**32-1 the value is taken as milliseconds).
    A Timestamp derived by arithmetic or ``replace()`` has no ``raw`` and encodes
    from its datetime value, like any datetime.
    """

    __slots__ = ("raw",)
    raw: int


class RawTimestamp:
    """A ``T`` value whose datetime reading would be past year 9999 (or before 1970).

    Not a datetime: ``datetime`` is None. Encodes back to the same 8 bytes.
    """

    __slots__ = ("raw",)
    raw: int

    def __init__(self, raw: int) -> None:
        if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= _U64_MAX:
            raise ValueError(f"timestamp must be an int within 0..2**64-1: {raw!r}")
        object.__setattr__(self, "raw", int(raw))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("RawTimestamp is immutable")

    @property
    def datetime(self) -> None:
        return None

    def __int__(self) -> int:
        return self.raw

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RawTimestamp):
            return self.raw == other.raw
        return NotImplemented

    def __hash__(self) -> int:
        return hash(("RawTimestamp", self.raw))

    def __repr__(self) -> str:
        return f"RawTimestamp({self.raw})"

    def __reduce__(self) -> tuple[type[RawTimestamp], tuple[int]]:
        return RawTimestamp, (self.raw,)


class RawTable(dict[str, Any]):
    """A header table that could not be parsed: empty, re-encodes to its original bytes.

    ``raw`` is the whole table on the wire (4-byte length included). Adding keys
    makes it an ordinary table again.
    """

    __slots__ = ("raw",)
    raw: bytes


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


def _long(value: bytes) -> bytes:
    if len(value) > 0xFFFFFFFF:
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


def _same_instant(raw: int, value: _dt.datetime) -> bool:
    reading = _timestamp(raw)
    return isinstance(reading, _dt.datetime) and reading == value


def _e_timestamp(value: object) -> bytes:
    return b"T" + _timestamp_payload(value)


def _table_payload(value: Any) -> bytes:
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
        if len(name) > 255:  # pamqp's behaviour for over-long names
            LOGGER.warning("Truncating key %s to 128 bytes", key)
            name = name[:128].decode("utf-8", "ignore").encode("utf-8")
        parts.append(_U8.pack(len(name)))
        parts.append(name)
        try:
            parts.append(encode_value(item))
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


# Installation into pamqp (and aio-pika's timestamp converters).

_DECODE_PATCH: Final[dict[str, Callable[..., Any]]] = {
    "field_table": decode_table,
    "field_array": decode_array,
    "timestamp": decode_timestamp,
    "short_str": decode_short_str,
    "embedded_value": decode_value,
}
_DECODE_METHODS: Final[dict[str, Callable[..., Any]]] = {
    "table": decode_table,
    "array": decode_array,
    "timestamp": decode_timestamp,
    "shortstr": decode_short_str,
}
_ENCODE_PATCH: Final[dict[str, Callable[..., Any]]] = {
    "field_table": encode_table,
    "field_array": encode_array,
    "timestamp": encode_timestamp,
    "short_string": encode_short_str,
    "encode_table_value": encode_value,
}
_ENCODE_METHODS: Final[dict[str, Callable[..., Any]]] = {
    "table": encode_table,
    "field_array": encode_array,
    "timestamp": encode_timestamp,
    "shortstr": encode_short_str,
}
_saved: dict[str, Any] = {}


def installed() -> bool:
    """True when pamqp currently uses this codec."""
    return _pdecode.METHODS.get("table") is decode_table


def install() -> None:
    """Install the codec into pamqp (idempotent)."""
    if installed():
        return
    for name, fn in _DECODE_PATCH.items():
        _saved.setdefault(f"decode.{name}", getattr(_pdecode, name))
        setattr(_pdecode, name, fn)
    for name, fn in _ENCODE_PATCH.items():
        _saved.setdefault(f"encode.{name}", getattr(_pencode, name))
        setattr(_pencode, name, fn)
    for name, fn in _DECODE_METHODS.items():
        _saved.setdefault(f"decode.METHODS.{name}", _pdecode.METHODS[name])
        _pdecode.METHODS[name] = fn
    for name, fn in _ENCODE_METHODS.items():
        _saved.setdefault(f"encode.METHODS.{name}", _pencode.METHODS[name])
        _pencode.METHODS[name] = fn
    _register_aio_pika()


def uninstall() -> None:
    """Put pamqp's own functions back (for comparisons and benchmarks)."""
    for key, fn in _saved.items():
        module, _, name = key.partition(".")
        target = _pdecode if module == "decode" else _pencode
        if name.startswith("METHODS."):
            target.METHODS[name.removeprefix("METHODS.")] = fn
        else:
            setattr(target, name, fn)


def _register_aio_pika() -> None:
    """Let aio-pika's Message/IncomingMessage carry a RawTimestamp through unchanged."""
    try:
        from aio_pika import message
    except ImportError:  # pragma: no cover - aio-pika is a dependency
        return
    for converter in (message.decode_timestamp, message.encode_timestamp):
        if RawTimestamp not in converter.registry:
            converter.register(RawTimestamp, _same)


def _same(value: Any) -> Any:
    return value


install()
