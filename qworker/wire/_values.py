"""Typed AMQP field values: plain Python values that remember their wire type.

See :mod:`qworker.wire`.
"""

from __future__ import annotations

import datetime as _dt
import logging
import struct
from typing import Any, ClassVar, Final

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
