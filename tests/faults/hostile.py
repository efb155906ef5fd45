"""Hypothesis strategies for hostile messages, and a thread-hosted event loop for sync tests.

A hostile message is what a buggy or malicious producer can put on the wire: any body (binary,
huge, deeply nested JSON, invalid UTF-8), any content type and encoding, and headers of every
AMQP type and size, forged ``x-qworker-*`` ones included.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, TypeVar

from hypothesis import strategies as st

from qworker import headers as h

T = TypeVar("T")

SUFFIXES = ("json", "model", "text", "bytes")
QWORKER_HEADERS = sorted(h.NAMES)
INT64 = 2**63 - 1
#: Text that can be encoded as UTF-8 (no lone surrogates), as AMQP strings must be.
_text = st.characters(exclude_categories=["Cs"])


@dataclass(frozen=True)
class Hostile:
    """One message to publish raw (the test sets its ``message_id``)."""

    suffix: str
    body: bytes
    content_type: str | None
    content_encoding: str | None
    headers: dict[str, Any]
    expiration: int | None
    priority: int | None
    correlation_id: str | None

    def describe(self) -> str:
        return (
            f"{self.suffix} body={len(self.body)}B ct={self.content_type!r} "
            f"ce={self.content_encoding!r} headers={sorted(self.headers)[:6]}"
        )


def _nested_json(depth: int, kind: str) -> bytes:
    return (
        ("[" * depth) + ("]" * depth) if kind == "list" else '{"a":' * depth + "1" + "}" * depth
    ).encode()


bodies = st.one_of(
    st.binary(max_size=2_000),
    st.text(max_size=500).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=50),
        lambda inner: (
            st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
        ),
        max_leaves=30,
    ).map(lambda v: json.dumps(v).encode()),
    st.builds(
        lambda i, mode: json.dumps({"id": str(i), "mode": mode}).encode(),
        st.integers(),
        st.sampled_from(["ok", "permanent", "", "\x00"]),
    ),
    st.builds(_nested_json, st.integers(1, 200_000), st.sampled_from(["list", "dict"])),
    st.builds(lambda n, b: bytes([b]) * n, st.integers(0, 3_000_000), st.integers(0, 255)),
    st.sampled_from([b"\xff\xfe\xfd", b'{"id": "\xc3\x28"}', b"\xed\xa0\x80", b"\x00" * 10, b""]),
)

content_types = st.one_of(
    st.none(),
    st.sampled_from(
        [
            "application/json",
            "application/json; charset=utf-8",
            "text/json",
            "application/problem+json",
            "text/plain",
            "application/octet-stream",
            "",
            "JSON",
            "\x1b[31mred",
        ]
    ),
    st.text(_text, max_size=60),
)
content_encodings = st.one_of(
    st.none(),
    st.sampled_from(["identity", "gzip", "utf-8", "UTF8", ""]),
    st.text(_text, max_size=30),
)

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-INT64 - 1, INT64),
    # AMQP tables carry 32-bit floats (pamqp packs "f"); a NaN or infinity makes RabbitMQ close
    # the publisher's connection (INTERNAL_ERROR), so it can never reach a worker.
    st.floats(width=32, allow_nan=False, allow_infinity=False),
    st.decimals(min_value=Decimal("-1e6"), max_value=Decimal("1e6"), places=3, allow_nan=False),
    st.text(_text, max_size=200),
    st.builds(lambda n, c: c * n, st.integers(0, 40_000), st.sampled_from(["x", "é", "\x00"])),
    st.binary(max_size=200).map(bytearray),
    st.datetimes(min_value=dt.datetime(1970, 1, 2), max_value=dt.datetime(2100, 1, 1)),
)
header_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.text(_text, max_size=20), inner, max_size=5)
    ),
    max_leaves=12,
)
#: Headers the broker itself reads when it dead-letters (RabbitMQ 3.10.8's dead-letter worker
#: crashes on an ``x-death`` array of non-tables; see ``test_forged_headers.py``).
BROKER_HEADERS = ["x-first-death-reason", "x-first-death-queue", "x-first-death-exchange"]
header_names = st.one_of(
    st.sampled_from(QWORKER_HEADERS + BROKER_HEADERS),
    st.text(_text, max_size=20).map(lambda s: "x-qworker-" + s),
    st.text(_text, min_size=1, max_size=40),
)
x_death = st.one_of(
    header_values,
    st.lists(_scalars, min_size=1, max_size=3),
    st.lists(st.dictionaries(st.text(_text, max_size=20), header_values, max_size=6), max_size=3),
    st.lists(
        st.fixed_dictionaries(
            {
                "reason": st.sampled_from(["expired", "rejected", "maxlen", "delivery_limit"]),
                "queue": st.text(_text, max_size=30),
                "count": st.integers(-(2**31), 2**31 - 1),
                "exchange": st.text(_text, max_size=10),
            }
        ),
        max_size=3,
    ),
)
headers = st.builds(
    lambda forged, death, fail: {
        **forged,
        **({"x-death": death[0]} if death else {}),
        **({"fail": fail} if fail else {}),
    },
    st.dictionaries(header_names, header_values, max_size=8),
    st.one_of(st.none(), st.tuples(x_death)),
    st.sampled_from([None, None, "permanent", "transient"]),
)

hostile_messages = st.builds(
    Hostile,
    suffix=st.sampled_from(SUFFIXES),
    body=bodies,
    content_type=content_types,
    content_encoding=content_encodings,
    headers=headers,
    expiration=st.one_of(st.none(), st.none(), st.none(), st.integers(0, 2_000)),
    priority=st.one_of(st.none(), st.integers(0, 255)),
    correlation_id=st.one_of(st.none(), st.text(_text, max_size=60)),
)


class LoopThread:
    """An asyncio loop in a daemon thread, so a sync hypothesis test can use aio-pika."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
