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

from collections.abc import Callable
from typing import Any, Final

from pamqp import decode as _pdecode
from pamqp import encode as _pencode

from qworker.wire._decode import (
    decode_array,
    decode_short_str,
    decode_table,
    decode_timestamp,
    decode_value,
)
from qworker.wire._encode import (
    encode_array,
    encode_short_str,
    encode_table,
    encode_timestamp,
    encode_value,
)
from qworker.wire._values import (
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

__all__ = [
    "Float32",
    "LegacyLongLongInt",
    "LongBytes",
    "LongInt",
    "LongLongInt",
    "LongUInt",
    "NonFinite64",
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
