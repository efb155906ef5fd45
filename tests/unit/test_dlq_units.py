"""The DLQ tool's pure logic: dead letters, origins, filters, fingerprints, export format."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import IntEnum
from typing import Any

import pytest

from qworker import headers as h
from qworker.dlq.filters import Filter, FilterError, parse_when
from qworker.dlq.jsonl import BadRecord, dumps, jsonable, parse_line, read_records
from qworker.dlq.records import DeadLetter, dead_letter, origin, replay_properties
from qworker.dlq.stats import Stats, describe
from qworker.fingerprint import normalise, top_frame
from qworker.wire import RawTimestamp
from tests.support.cli import run_python
from tests.support.dlq import failure

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def letter(
    headers: dict[str, Any] | None = None,
    *,
    queue: str = "orders.dlq",
    body: bytes = b'{"order": 1}',
    **properties: Any,
) -> DeadLetter:
    return dead_letter(queue, body, {"message_id": "m1", **properties}, headers)


def qworker_letter(**failure_kw: Any) -> DeadLetter:
    return letter(failure("orders", **failure_kw))


def broker_letter(reason: str = "delivery_limit", queue: str = "orders") -> DeadLetter:
    death = {"reason": reason, "queue": queue, "time": NOW, "count": 1, "exchange": ""}
    return letter({"x-death": [death], "x-delivery-count": 3})


# Reading dead letters


def test_qworker_dead_letter_fields_come_from_its_headers() -> None:
    """Reason, error type, message, handler, attempt and failure time are read from x-qworker-*."""
    dl = qworker_letter(at="2024-05-01T11:00:00+00:00", attempt=4)
    assert (dl.reason, dl.error_type, dl.handler) == (
        "permanent_error",
        "builtins.KeyError",
        "billing.handlers:charge",
    )
    assert dl.error_message == "customer 42 not found"
    assert dl.attempt == 4
    assert dl.failed_at == datetime(2024, 5, 1, 11, tzinfo=UTC)
    assert not dl.from_broker


@pytest.mark.parametrize("reason", ["delivery_limit", "rejected", "expired", "maxlen"])
def test_broker_dead_letter_reason_and_time_come_from_x_death(reason: str) -> None:
    """A message RabbitMQ dead-lettered itself shows the x-death reason, queue and time."""
    dl = broker_letter(reason)
    assert dl.from_broker
    assert dl.reason == reason
    assert dl.failed_at == NOW
    assert dl.error_type is None
    assert dl.summary_line() == f"dead-lettered by RabbitMQ ({reason} in orders)"


@pytest.mark.parametrize(
    "headers",
    [
        None,
        {h.REASON: "made_up", h.ATTEMPT: -5, h.LAST_FAILURE_AT: "not a time"},
        {h.REASON: 7, h.ERROR_TYPE: ["x"], h.ATTEMPT: "3", "x-death": "garbage"},
        {"x-death": [1, 2], h.REPLAY_COUNT: True, h.HANDLER: b"\xff\xfe"},
    ],
)
def test_garbage_headers_read_as_safe_defaults(headers: dict[str, Any] | None) -> None:
    """Forged or malformed headers never raise: unknown reason, attempt 0, no time."""
    dl = letter(headers)
    assert dl.reason == "unknown"
    assert dl.attempt == 0
    assert dl.failed_at is None
    assert dl.replay_count == 0


def test_failure_time_falls_back_to_the_message_timestamp() -> None:
    """Without qworker or x-death times, the AMQP timestamp is the failure time."""
    assert letter({}, timestamp=NOW).failed_at == NOW


# Origins


@pytest.mark.parametrize(
    ("queue", "header", "expected", "problem"),
    [
        ("orders.dlq", None, "orders", None),
        ("orders.dlq", "orders", "orders", None),
        ("orders.dlq", "payments", None, "not 'orders'"),
        ("orders.dlq", "amq.foo", None, "not 'orders'"),
        ("orders.dlq", "x" * 100_000, None, "not 'orders'"),
        ("orders.dlq", 42, None, "a int"),
        ("orders.dlq", ["orders"], None, "a list"),
        ("failed", "orders", "orders", None),
        ("failed", None, None, "no origin"),
        ("failed", "amq.direct", None, "reserved"),
        ("failed", "failed", None, "the DLQ itself"),
        ("failed", "bad\x1b[2Jname", None, "control characters"),
    ],
)
def test_origin_is_the_dlq_base_name_and_headers_cannot_redirect_it(
    queue: str, header: Any, expected: str | None, problem: str | None
) -> None:
    """Q.dlq replays only to Q; a header is trusted only for DLQs not named *.dlq, and checked."""
    headers = {} if header is None else {h.QUEUE: header}
    route = origin(letter(headers, queue=queue))
    assert route.queue == expected
    if problem is None:
        assert route.problem is None
    else:
        assert route.problem is not None and problem in route.problem
        assert len(route.problem) < 300


def test_replayed_copy_resets_failure_headers_and_counts_the_replay() -> None:
    """Ids and user headers kept; failure headers, expiration, user_id, x-delivery-count dropped."""
    incoming = {**failure("orders", incoming={"tenant": "acme"}), "x-delivery-count": 5}
    dl = letter(incoming, correlation_id="c1", expiration="60000", user_id="mallory")
    body, properties = replay_properties(dl)
    assert body == dl.body
    assert properties["message_id"] == "m1" and properties["correlation_id"] == "c1"
    assert "expiration" not in properties and "user_id" not in properties
    assert properties["delivery_mode"] == 2
    headers = properties["headers"]
    assert headers["tenant"] == "acme"
    assert headers[h.REPLAY_COUNT] == 1 and h.REPLAYED_AT in headers
    assert not (set(headers) & h.FAILURE_HEADERS)
    assert "x-delivery-count" not in headers


# Filters


@pytest.mark.parametrize(
    ("chosen", "matches"),
    [
        (Filter(), True),
        (Filter(error_type="KeyError"), True),
        (Filter(error_type="builtins.KeyError"), True),
        (Filter(error_type="Error"), False),
        (Filter(reason="permanent_error"), True),
        (Filter(reason="retries_exhausted"), False),
        (Filter(handler="charge"), True),
        (Filter(handler="billing.handlers:charge"), True),
        (Filter(handler="refund"), False),
        (Filter(message_id="m1"), True),
        (Filter(message_id="m2"), False),
        (Filter(grep="customer 42"), True),
        (Filter(grep='"order"'), True),
        (Filter(grep="nowhere"), False),
        (Filter(since=NOW - timedelta(hours=2)), True),
        (Filter(since=NOW), False),
        (Filter(until=NOW - timedelta(hours=2)), False),
        (Filter(error_type="KeyError", reason="timeout"), False),
    ],
)
def test_filter_matches_each_condition(chosen: Filter, matches: bool) -> None:
    """Every condition is checked; all set conditions must hold."""
    dl = qworker_letter(at=(NOW - timedelta(hours=1)).isoformat())
    assert chosen.matches(dl) is matches


def test_time_filters_never_match_a_message_without_a_time() -> None:
    """--since/--until exclude messages whose failure time is unknown."""
    assert not Filter(since=NOW).matches(letter({}))
    assert Filter().matches(letter({}))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2h", NOW - timedelta(hours=2)),
        ("30m", NOW - timedelta(minutes=30)),
        ("1d12h", NOW - timedelta(days=1, hours=12)),
        ("2024-04-30T10:00:00Z", datetime(2024, 4, 30, 10, tzinfo=UTC)),
        ("2024-04-30", datetime(2024, 4, 30, tzinfo=UTC)),
    ],
)
def test_times_are_iso_or_relative(text: str, expected: datetime) -> None:
    """ISO 8601 (UTC unless stated) or a duration before now."""
    assert parse_when(text, NOW) == expected


@pytest.mark.parametrize(
    "raw",
    [
        {"since": "yesterday"},
        {"until": "2h30"},
        {"reason": "exploded"},
        {"error_type": ""},
        {"since": "1h", "until": "2h"},
    ],
)
def test_bad_filter_values_are_usage_errors(raw: dict[str, str]) -> None:
    """Unreadable times, unknown reasons, empty values and empty windows raise FilterError."""
    with pytest.raises(FilterError):
        Filter.parse(now=NOW, **raw)


# Fingerprints and grouping


def test_normalise_replaces_ids_numbers_and_hex() -> None:
    """Varying parts become placeholders so that one kind of failure is one group."""
    text = (
        "order 42 of 3f2b8c9e-1a2b-4c3d-9e8f-0a1b2c3d4e5f at 0xdeadbeef: ord_991 sha 9f86d081884c"
    )
    assert normalise(text) == "order <n> of <uuid> at <hex>: ord_<n> sha <hex>"


def test_top_frame_is_the_innermost_frame_without_line_number() -> None:
    """The last File line of the traceback, as file:function."""
    tb = (
        'Traceback:\n  File "/a/outer.py", line 1, in main\n'
        '  File "/srv/app/inner.py", line 99, in charge\nKeyError: 1\n'
    )
    assert top_frame(tb) == "inner.py:charge"
    assert top_frame("no traceback") == ""


def test_stats_group_by_reason_type_handler_and_fingerprint() -> None:
    """Same kind with different ids is one group; another message or handler splits it."""
    stats = Stats()
    for i in range(5):
        stats.add(qworker_letter(message=f"customer {i} not found", at=f"2024-05-01T10:0{i}:00Z"))
    stats.add(qworker_letter(message="card declined"))
    stats.add(qworker_letter(handler="billing.handlers:refund"))
    stats.add(broker_letter())
    groups = stats.ranked()
    assert [g.count for g in groups] == [5, 1, 1, 1]
    top = groups[0]
    assert top.pattern == "customer <n> not found"
    assert top.frame == "handlers.py:charge"
    assert top.first_seen == datetime(2024, 5, 1, 10, tzinfo=UTC)
    assert top.last_seen == datetime(2024, 5, 1, 10, 4, tzinfo=UTC)
    assert top.sample_message_id == "m1"
    assert stats.total == 8
    assert stats.reasons == {"permanent_error": 7, "delivery_limit": 1}
    assert describe(broker_letter())[0].error_type == "-"


# Export format


def test_export_record_round_trips_body_properties_and_headers() -> None:
    """Text and binary bodies, properties and headers survive dumps -> parse_line."""
    for body in (b'{"a": "\\u00e9\xc3\xa9"}', b"\x00\xff\x1b[31m"):
        dl = dead_letter(
            "orders.dlq",
            body,
            {"message_id": "m1", "timestamp": NOW, "content_type": "application/json"},
            {**failure("orders"), "blob": b"\xff\x00", "when": NOW},
        )
        line = dumps(dl)
        assert "\x1b" not in line and "\n" not in line
        back = parse_line(line, "f:1")
        assert back.body == body
        assert back.properties == dl.properties
        assert back.headers[h.ERROR_TYPE] == "builtins.KeyError"
        assert back.headers["blob"] == base64.b64encode(b"\xff\x00").decode()
        assert back.headers["when"] == NOW.isoformat()
        assert json.loads(line)["body_encoding"] == ("utf-8" if body[0] == ord("{") else "base64")


class _Headers(Mapping[str, Any]):
    """A header table that is a Mapping but not a dict."""

    def __init__(self, items: dict[str, Any]) -> None:
        self._items = items

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


class _Count(IntEnum):
    ONE = 1


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("text", "text"),
        (-(2**63), -(2**63)),
        (1.5, 1.5),
        (True, True),
        (None, None),
        (_Count.ONE, _Count.ONE),  # an int subclass: left to json, as before
        (NOW, NOW.isoformat()),
        (RawTimestamp(253402300800), 253402300800),  # past year 9999: integer seconds
        (b"caf\xc3\xa9", "café"),
        (bytearray(b"\xff\x00"), base64.b64encode(b"\xff\x00").decode()),
        (Decimal("1.50"), "1.50"),
        ({"a": [b"x", {"b": NOW}], 7: None}, {"a": ["x", {"b": NOW.isoformat()}], "7": None}),
        (_Headers({"k": b"v"}), {"k": "v"}),
        ((1, b"y"), [1, "y"]),
    ],
)
def test_jsonable_gives_each_header_type_its_json_form(value: Any, expected: Any) -> None:
    assert jsonable(value) == expected


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"queue": "q"}', "body"),
        ('{"queue": "q", "body": "x", "body_encoding": "rot13"}', "body_encoding"),
        ('{"queue": "q", "body": "***", "body_encoding": "base64"}', "not valid base64"),
        ('{"queue": "q", "body": "x", "properties": {"priority": 999}}', "priority"),
        ('{"queue": "q", "body": "x", "properties": {"evil": 1}}', "evil"),
        ('{"queue": "q", "body": "x", "headers": {"n": 99999999999999999999}}', "64-bit"),
    ],
)
def test_bad_record_names_file_and_line(line: str, problem: str) -> None:
    """Every kind of bad line is a BadRecord saying where and what."""
    with pytest.raises(BadRecord) as caught:
        list(read_records(["", line], "dump.jsonl"))
    assert str(caught.value).startswith("dump.jsonl:2: ")
    assert problem in str(caught.value)


# Packaging


@pytest.mark.parametrize("module", ["qworker.cli.dlq", "qworker.cli._dlq_options", "qworker.dlq"])
def test_each_dlq_module_can_be_imported_first(module: str) -> None:
    """qworker.cli and the dlq CLI import each other; any of them may be imported first."""
    check = (
        f"import {module}, click; from qworker.cli import cli; "
        "print(cli.get_command(click.Context(cli), 'dlq').commands)"
    )
    done = run_python(check)
    assert done.returncode == 0, done.stderr
    assert "replay" in done.stdout
