"""The x-qworker-* headers (SPEC section 4): types, sizes, hostile input, replay."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pamqp.encode
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qworker import failures
from qworker import headers as h

FAST = settings(max_examples=120, deadline=None)

ORIGIN = h.Origin(
    queue="orders.placed",
    handler="billing.handlers:charge",
    exchange="shop",
    routing_key="order.placed",
    worker="host-1:4242",
)
#: The origin of a later delivery, which came back from a retry queue via the default exchange.
RETRY_ORIGIN = h.Origin(
    queue="orders.placed",
    handler="billing.handlers:charge",
    exchange="",
    routing_key="orders.placed.retry.1s",
    worker="host-2:7",
)
T1 = "2024-05-01T10:00:00.000+00:00"
T2 = "2024-05-01T10:00:02.500+00:00"

OUR_NAMES = h.NAMES
HISTORY_KEYS = {"attempt", "at", "error_type", "error_message"}


def _short_id(value: object) -> str:
    """A readable test id for huge parameters."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:30]}...({len(text)} chars)"


class ChargeDeclined(Exception):
    """A user-defined exception, to check fully qualified type names."""


def _raised(exc: BaseException) -> BaseException:
    """``exc`` with a real traceback."""
    try:
        raise exc
    except BaseException as caught:
        return caught


def _error(exc: BaseException | None = None) -> failures.ErrorInfo:
    return failures.ErrorInfo.from_exception(_raised(exc or ValueError("boom")))


def _fail(
    incoming: Mapping[str, Any] | None,
    *,
    attempt: int = 1,
    error: failures.ErrorInfo | None = None,
    origin: h.Origin = ORIGIN,
    reason: str | None = None,
    at: str | None = None,
) -> dict[str, Any]:
    return h.failure_headers(
        incoming,
        error=error or _error(),
        attempt=attempt,
        classification="permanent" if reason == "permanent_error" else "transient",
        origin=origin,
        reason=reason,
        at=at,
    )


def _ours(headers: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in headers.items() if k.startswith(h.PREFIX)}


def _is_utc_iso(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return False
    return parsed.utcoffset() == timedelta(0)


def _utf8_size(text: str) -> int:
    return len(text.encode("utf-8"))


def _wire_size(ours: Mapping[str, Any]) -> int:
    """The real AMQP field-table encoding of ``ours`` (raises if a value cannot be encoded)."""
    return len(pamqp.encode.field_table(dict(ours)))


def _estimated_size(ours: Mapping[str, Any]) -> int:
    return sum(len(k) + 1 + h.encoded_size(v) for k, v in ours.items())


def _check_sane(out: Mapping[str, Any], attempt: int) -> None:
    """Every x-qworker-* header written is one of ours, well-typed and within its caps."""
    ours = _ours(out)
    assert set(ours) <= OUR_NAMES
    assert ours[h.ATTEMPT] == attempt
    assert type(ours[h.ATTEMPT]) is int
    for name in (h.FIRST_FAILURE_AT, h.LAST_FAILURE_AT):
        assert _is_utc_iso(ours[name]), (name, ours[name])
    for name in (h.ERROR_TYPE, h.CLASSIFICATION, h.QUEUE, h.HANDLER, h.WORKER):
        assert isinstance(ours[name], str)
        assert _utf8_size(ours[name]) <= h.NAME_LIMIT
    for name in (h.ORIGINAL_EXCHANGE, h.ORIGINAL_ROUTING_KEY):
        assert isinstance(ours[name], str)
        assert _utf8_size(ours[name]) <= h.NAME_LIMIT
    assert _utf8_size(ours[h.ERROR_MESSAGE]) <= failures.MESSAGE_LIMIT
    assert _utf8_size(ours[h.ERROR_TRACEBACK]) <= failures.TRACEBACK_LIMIT
    history = ours[h.HISTORY]
    assert isinstance(history, list)
    assert 1 <= len(history) <= h.HISTORY_LENGTH
    for entry in history:
        assert type(entry) is dict
        assert set(entry) == HISTORY_KEYS
        assert type(entry["attempt"]) is int
        # The current attempt may be ATTEMPT_LIMIT + 1 (a clamped forged count, plus one).
        assert 0 <= entry["attempt"] <= h.ATTEMPT_LIMIT + 1
        assert entry["at"] == "" or _is_utc_iso(entry["at"])
        assert isinstance(entry["error_type"], str)
        assert _utf8_size(entry["error_message"]) <= failures.HISTORY_MESSAGE_LIMIT
    assert history[-1]["attempt"] == attempt
    assert history[-1]["at"] == ours[h.LAST_FAILURE_AT]
    if h.REPLAY_COUNT in ours:
        assert type(ours[h.REPLAY_COUNT]) is int
        assert 1 <= ours[h.REPLAY_COUNT] <= h.ATTEMPT_LIMIT
    if h.REPLAYED_AT in ours:
        assert _is_utc_iso(ours[h.REPLAYED_AT])
    assert _estimated_size(ours) < h.TOTAL_LIMIT
    assert _wire_size(ours) < h.TOTAL_LIMIT


# failure_headers: content and types.


def test_failure_headers_sets_every_header_with_the_right_type() -> None:
    """A first failure writes all SPEC section 4 headers, typed as the contract says."""
    error = _error(ChargeDeclined("card declined"))
    out = _fail({}, attempt=1, error=error)
    optional = {h.REASON, h.REPLAY_COUNT, h.REPLAYED_AT, h.REPLAY_ID}
    optional |= {h.DEATHS, h.DROPPED_HEADERS, h.ERROR_CODE, h.RUNBOOK, h.CRASHES}
    optional |= {h.TRACE_ID, h.PREVIOUS_SPAN}  # only when the attempt was traced
    assert set(_ours(out)) == OUR_NAMES - optional
    assert out[h.ATTEMPT] == 1
    assert out[h.ERROR_TYPE] == f"{__name__}.ChargeDeclined"
    assert out[h.ERROR_MESSAGE] == "card declined"
    assert "ChargeDeclined: card declined" in out[h.ERROR_TRACEBACK]
    assert "Traceback (most recent call last)" in out[h.ERROR_TRACEBACK]
    assert out[h.CLASSIFICATION] == "transient"
    assert out[h.QUEUE] == "orders.placed"
    assert out[h.HANDLER] == "billing.handlers:charge"
    assert out[h.ORIGINAL_EXCHANGE] == "shop"
    assert out[h.ORIGINAL_ROUTING_KEY] == "order.placed"
    assert out[h.WORKER] == "host-1:4242"
    assert out[h.FIRST_FAILURE_AT] == out[h.LAST_FAILURE_AT]
    assert out[h.HISTORY] == [
        {
            "attempt": 1,
            "at": out[h.LAST_FAILURE_AT],
            "error_type": f"{__name__}.ChargeDeclined",
            "error_message": "card declined",
        }
    ]
    _check_sane(out, 1)


def test_default_failure_time_is_now_in_utc() -> None:
    """Without ``at``, the failure time is the current UTC time in ISO 8601."""
    before = datetime.now(UTC) - timedelta(seconds=1)
    out = _fail(None)
    stamp = datetime.fromisoformat(out[h.LAST_FAILURE_AT])
    assert stamp.utcoffset() == timedelta(0)
    assert before <= stamp <= datetime.now(UTC) + timedelta(seconds=1)


@pytest.mark.parametrize(
    "reason", ["permanent_error", "retries_exhausted", "decode_error", "timeout"]
)
def test_reason_is_written_for_dead_letters(reason: str) -> None:
    """x-qworker-reason is set exactly as given for a dead letter."""
    out = _fail({}, reason=reason)
    assert out[h.REASON] == reason


def test_reason_is_absent_on_retries_even_if_forged() -> None:
    """A retry copy has no x-qworker-reason, even when the producer sent one."""
    out = _fail({h.REASON: "permanent_error"}, reason=None)
    assert h.REASON not in out


@pytest.mark.parametrize(
    ("exc", "type_name"),
    [
        (ValueError("x"), "builtins.ValueError"),
        (KeyError("k"), "builtins.KeyError"),
        (ChargeDeclined("x"), f"{__name__}.ChargeDeclined"),
        (TimeoutError(), "builtins.TimeoutError"),
        (ConnectionResetError(), "builtins.ConnectionResetError"),
    ],
)
def test_error_type_is_fully_qualified(exc: BaseException, type_name: str) -> None:
    """x-qworker-error-type is ``module.Class``."""
    assert _fail({}, error=_error(exc))[h.ERROR_TYPE] == type_name


def test_error_type_of_a_nested_class_uses_its_qualname() -> None:
    """A class defined inside another keeps its dotted qualified name."""

    class Outer:
        class Inner(Exception):
            pass

    name = failures.error_type_name(Outer.Inner())
    assert name == f"{__name__}.{Outer.Inner.__qualname__}"
    assert name.endswith("Outer.Inner")


def test_user_headers_are_kept_as_they_were_and_x_death_becomes_ours() -> None:
    """Every header not named x-qworker-* passes through untouched, except the broker's death
    history, which is carried inertly as x-qworker-deaths (issue 11: a copied x-death makes
    RabbitMQ 3.x see a dead-letter cycle)."""
    x_death = [{"count": 1, "reason": "expired", "queue": "orders.placed.retry.1s"}]
    blob = {"nested": [1, 2.5, None, b"\x00"], "when": datetime(2020, 1, 1)}
    incoming = {
        "tenant": "acme",
        "trace": blob,
        "amount": Decimal("9.99"),
        "x-qworker": "no dash, not ours",
        "X-QWORKER-ATTEMPT": "other case, not ours",
    }
    out = _fail({**incoming, "x-death": x_death})
    for key, value in incoming.items():
        # Same value; binary strings come back as byte arrays (pamqp cannot encode bytes).
        assert out[key] == value
        assert type(out[key]) is (bytearray if isinstance(value, bytes) else type(value))
    assert "x-death" not in out
    assert out[h.DEATHS] == [{"queue": "orders.placed.retry.1s", "reason": "expired", "count": 1}]


def test_foreign_x_qworker_headers_are_dropped() -> None:
    """Unknown x-qworker-* keys sent by a producer do not survive into the copy."""
    incoming = {
        "x-qworker-evil": "x" * 100_000,
        "x-qworker-": "empty suffix",
        "x-qworker-attempt-bogus": 99,
        "tenant": "acme",
    }
    out = _fail(incoming)
    assert "x-qworker-evil" not in out
    assert "x-qworker-" not in out
    assert "x-qworker-attempt-bogus" not in out
    assert out["tenant"] == "acme"
    assert set(_ours(out)) <= OUR_NAMES


def test_incoming_headers_are_not_mutated() -> None:
    """failure_headers and replay_headers return new mappings."""
    history = [{"attempt": 1}]
    incoming: dict[str, Any] = {"tenant": "acme", h.ATTEMPT: 2, h.HISTORY: history}
    snapshot = {**incoming, h.HISTORY: [dict(e) for e in history]}
    _fail(incoming, attempt=3)
    h.replay_headers(incoming)
    assert incoming == snapshot


def test_first_failure_time_and_original_route_survive_later_failures() -> None:
    """The first failure's time and original exchange/routing key are kept on later failures."""
    first = _fail({"tenant": "acme"}, attempt=1, at=T1)
    second = _fail(first, attempt=2, origin=RETRY_ORIGIN, at=T2)
    assert second[h.FIRST_FAILURE_AT] == T1
    assert second[h.LAST_FAILURE_AT] == T2
    assert second[h.ORIGINAL_EXCHANGE] == "shop"
    assert second[h.ORIGINAL_ROUTING_KEY] == "order.placed"
    assert second[h.WORKER] == "host-2:7"
    assert second["tenant"] == "acme"
    assert [e["attempt"] for e in second[h.HISTORY]] == [1, 2]
    assert [e["at"] for e in second[h.HISTORY]] == [T1, T2]


def test_original_exchange_may_be_the_default_exchange() -> None:
    """An empty original exchange (the default exchange) is kept, not replaced."""
    first = _fail({}, origin=RETRY_ORIGIN, at=T1)
    assert first[h.ORIGINAL_EXCHANGE] == ""
    second = _fail(first, attempt=2, origin=ORIGIN, at=T2)
    assert second[h.ORIGINAL_EXCHANGE] == ""
    assert second[h.ORIGINAL_ROUTING_KEY] == "orders.placed.retry.1s"


def test_history_keeps_the_last_ten_failures() -> None:
    """After 15 failures the history holds attempts 6..15, oldest first."""
    headers: dict[str, Any] = {}
    for attempt in range(1, 16):
        headers = _fail(headers, attempt=attempt, error=_error(ValueError(f"failure {attempt}")))
    history = headers[h.HISTORY]
    assert [e["attempt"] for e in history] == list(range(6, 16))
    assert [e["error_message"] for e in history] == [f"failure {n}" for n in range(6, 16)]
    assert all(type(e) is dict and set(e) == HISTORY_KEYS for e in history)
    _check_sane(headers, 15)


@pytest.mark.parametrize(
    ("forged", "kept"),
    [
        (T1, True),
        ("2024-05-01T10:00:00Z", True),
        ("2024-05-01T12:00:00+02:00", False),
        ("2024-05-01T10:00:00", False),
        ("yesterday", False),
        ("", False),
        ("9" * 10_000, False),
        (b"2024-05-01T10:00:00+00:00", True),
        (1714557600, False),
        (datetime(2024, 5, 1, tzinfo=UTC), False),
        (None, False),
        (["2024-05-01T10:00:00+00:00"], False),
    ],
    ids=_short_id,
)
def test_forged_first_failure_time_is_kept_only_when_iso_utc(forged: Any, kept: bool) -> None:
    """x-qworker-first-failure-at stays an ISO 8601 UTC time whatever the producer sent."""
    out = _fail({h.FIRST_FAILURE_AT: forged}, at=T2)
    assert _is_utc_iso(out[h.FIRST_FAILURE_AT])
    if kept:
        assert datetime.fromisoformat(out[h.FIRST_FAILURE_AT]) == datetime.fromisoformat(T1)
    else:
        assert out[h.FIRST_FAILURE_AT] == T2


# Size caps.


def _deep_traceback(depth: int) -> BaseException:
    """An exception with ``depth`` distinct frames (alternating, so Python does not fold them)."""

    def ping(n: int) -> None:
        if n == 0:
            raise RuntimeError("bottom of the stack")
        pong(n - 1)

    def pong(n: int) -> None:
        ping(n - 1)

    try:
        ping(depth)
    except RuntimeError as exc:
        return exc
    raise AssertionError("unreachable")


def test_error_message_is_capped_at_2_kib() -> None:
    """A 1 MB exception message is cut to at most 2 KiB (UTF-8 bytes) and marked as cut."""
    info = _error(ValueError("é" * 1_000_000))
    assert _utf8_size(info.message) <= failures.MESSAGE_LIMIT
    assert info.message.endswith("[truncated]")
    assert info.message.startswith("éé")


def test_traceback_is_capped_at_16_kib_keeping_the_tail() -> None:
    """A long traceback keeps its end (where the error is), not its beginning."""
    try:
        try:
            raise ValueError("x" * 40_000)
        except ValueError as cause:
            raise RuntimeError("bottom of the stack") from cause
    except RuntimeError as exc:
        info = failures.ErrorInfo.from_exception(exc)
    assert _utf8_size(info.traceback) <= failures.TRACEBACK_LIMIT
    assert info.traceback.startswith("...[truncated]")
    assert info.traceback.rstrip().endswith("RuntimeError: bottom of the stack")


def test_deep_traceback_keeps_its_first_and_last_frames() -> None:
    """300 frames: the first 10 and the last 30 are kept, the rest is counted, not listed."""
    text = failures.format_traceback(_deep_traceback(300))
    assert text.count('  File "') == 40
    assert "frames omitted" in text
    assert text.rstrip().endswith("RuntimeError: bottom of the stack")


def _huge_forged_headers() -> dict[str, Any]:
    entry = {
        "attempt": 10**12,
        "at": "z" * 100_000,
        "error_type": "T" * 100_000,
        "error_message": "m" * 100_000,
    }
    return {
        h.ATTEMPT: 10**12,
        h.HISTORY: [dict(entry) for _ in range(1000)],
        h.ORIGINAL_EXCHANGE: "e" * 1_000_000,
        h.ORIGINAL_ROUTING_KEY: b"r" * 1_000_000,
        h.FIRST_FAILURE_AT: "f" * 1_000_000,
        h.REPLAY_COUNT: 10**12,
        h.REPLAYED_AT: "p" * 1_000_000,
        "x-qworker-evil": "x" * 1_000_000,
    }


def test_all_our_headers_stay_under_64_kib_with_huge_input() -> None:
    """A 1 MB message, a deep traceback and a huge forged history still fit in 64 KiB."""
    exc = _deep_traceback(300)
    exc.args = ("é" * 1_000_000,)
    out = _fail(_huge_forged_headers(), attempt=3, error=failures.ErrorInfo.from_exception(exc))
    ours = _ours(out)
    assert _estimated_size(ours) < h.TOTAL_LIMIT
    assert _wire_size(ours) < h.TOTAL_LIMIT
    assert len(ours[h.HISTORY]) == h.HISTORY_LENGTH
    assert ours[h.HISTORY][-1]["attempt"] == 3
    _check_sane(out, 3)


def test_caps_hold_for_an_error_info_built_by_hand() -> None:
    """failure_headers caps the error fields itself, not only ErrorInfo.from_exception."""
    error = failures.ErrorInfo("T" * 1_000_000, "m" * 1_000_000, "t" * 1_000_000)
    out = _fail({}, error=error)
    _check_sane(out, 1)
    assert len(out[h.HISTORY]) == 1


def test_a_huge_exception_class_name_keeps_the_current_failure_in_history() -> None:
    """An absurdly long class name is capped and does not push the new entry out of history."""
    huge = type("E" * 100_000, (Exception,), {})
    out = _fail({}, error=_error(huge("x")))
    _check_sane(out, 1)
    assert out[h.HISTORY][-1]["error_message"] == "x"


def test_encoded_size_is_an_upper_bound_of_the_wire_size() -> None:
    """encoded_size never underestimates pamqp's real field-table encoding."""
    out = _ours(_fail(_huge_forged_headers(), attempt=2, error=_error(ValueError("v" * 5000))))
    assert _estimated_size(out) + 4 >= _wire_size(out)


@pytest.mark.parametrize(
    "message",
    [
        b"caf\xff".decode("utf-8", "surrogateescape"),
        "\ud800 lone high surrogate",
        "nul \x00 and esc \x1b[31m",
        "emoji 🎉" * 1000,
    ],
    ids=["surrogateescape", "lone-surrogate", "controls", "emoji"],
)
def test_odd_characters_still_encode_as_amqp(message: str) -> None:
    """Messages with lone surrogates or control characters give publishable headers."""
    out = _fail({}, error=_error(ValueError(message)))
    _check_sane(out, 1)
    out[h.ERROR_MESSAGE].encode("utf-8")


def test_exception_with_a_broken_str_is_still_captured() -> None:
    """An exception whose __str__ raises gets a placeholder message, not a crash."""

    class Broken(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no str for you")

    info = _error(Broken())
    assert "Broken" in info.message
    assert "Broken" in info.traceback
    failure = failures.Failure.from_exception(1, Broken())
    assert "Broken" in failure.error_message
    _check_sane(_fail({}, error=info), 1)


# ErrorInfo: chained causes and redaction.


def test_traceback_includes_an_explicit_cause() -> None:
    """``raise X from Y`` keeps Y in the traceback."""
    try:
        try:
            raise ConnectionError("socket closed by peer")
        except ConnectionError as cause:
            raise RuntimeError("charge failed") from cause
    except RuntimeError as exc:
        info = failures.ErrorInfo.from_exception(exc)
    assert "ConnectionError: socket closed by peer" in info.traceback
    assert "direct cause of the following exception" in info.traceback
    assert info.traceback.rstrip().endswith("RuntimeError: charge failed")
    assert info.message == "charge failed"
    assert info.error_type == "builtins.RuntimeError"


def test_traceback_includes_an_implicit_context() -> None:
    """An exception raised while handling another keeps the first in the traceback."""

    def fallback() -> None:
        raise ValueError("lookup failed")

    try:
        try:
            _ = {"other": 1}["sku"]
        except KeyError:
            fallback()
    except ValueError as exc:
        info = failures.ErrorInfo.from_exception(exc)
    assert "KeyError: 'sku'" in info.traceback
    assert "During handling of the above exception" in info.traceback


def test_secrets_are_redacted_in_message_and_traceback() -> None:
    """Credentials in the message, or in a chained cause, never reach the headers."""
    try:
        try:
            raise ConnectionError("cannot reach postgres://app:pg-s3cret@db:5432/shop")
        except ConnectionError as cause:
            raise RuntimeError(
                "login failed with password=hunter2 for amqp://u:mq-pw@h/"
            ) from cause
    except RuntimeError as exc:
        info = failures.ErrorInfo.from_exception(exc)
    out = _fail({}, error=info)
    for secret in ("pg-s3cret", "hunter2", "mq-pw"):
        assert secret not in info.message
        assert secret not in info.traceback
        assert secret not in repr(out)
    assert "postgres://app:***@db:5432/shop" in info.traceback
    assert "password=***" in info.message


def test_history_entry_is_redacted_and_capped() -> None:
    """Failure.from_exception redacts the message and caps it at 512 bytes, without traceback."""
    failure = failures.Failure.from_exception(4, ValueError("token=abc123 " + "x" * 10_000))
    assert "abc123" not in failure.error_message
    assert _utf8_size(failure.error_message) <= failures.HISTORY_MESSAGE_LIMIT
    assert failure.attempt == 4
    assert failure.error_type == "builtins.ValueError"
    assert _is_utc_iso(failure.at)
    assert set(failure.to_header()) == HISTORY_KEYS


# Readers: garbage in, sane values out.

GARBAGE: list[Any] = [
    "3",
    b"3",
    bytearray(b"3"),
    3.0,
    3.7,
    float("nan"),
    float("inf"),
    True,
    False,
    None,
    -1,
    -5,
    10**12,
    -(10**12),
    10**100,
    "x" * 100_000,
    b"\xff" * 100_000,
    [1, 2, 3],
    [[[[]]]],
    {"attempt": 3},
    {"a": {"b": {"c": [None]}}},
    Decimal("3"),
    datetime(2024, 1, 1, tzinfo=UTC),
    (1, 2),
    object(),
]


@pytest.mark.parametrize("value", GARBAGE, ids=lambda v: type(v).__name__)
def test_readers_accept_garbage_without_raising(value: Any) -> None:
    """Every reader returns a sane value of the right type for any header value."""
    headers = {name: value for name in OUR_NAMES}
    attempt = h.read_attempt(headers)
    assert type(attempt) is int
    assert 0 <= attempt <= h.ATTEMPT_LIMIT
    text = h.read_str(headers, h.QUEUE)
    assert text is None or (isinstance(text, str) and _utf8_size(text) <= h.NAME_LIMIT)
    history = h.read_history(headers)
    assert isinstance(history, list)
    assert len(history) <= h.HISTORY_LENGTH
    assert all(isinstance(f, failures.Failure) for f in history)
    _check_sane(_fail(headers, attempt=2), 2)
    replayed = h.replay_headers(headers)
    assert h.read_attempt(replayed) == 0
    assert 1 <= replayed[h.REPLAY_COUNT] <= h.ATTEMPT_LIMIT + 1


@pytest.mark.parametrize(
    ("value", "attempt"),
    [
        (0, 0),
        (3, 3),
        (-5, 0),
        (-1, 0),
        (10**12, h.ATTEMPT_LIMIT),
        (h.ATTEMPT_LIMIT, h.ATTEMPT_LIMIT),
        (True, 0),
        (False, 0),
        ("3", 0),
        (b"3", 0),
        (3.0, 0),
        (Decimal(3), 0),
        (None, 0),
        ([3], 0),
    ],
    ids=_short_id,
)
def test_read_attempt_accepts_only_ints_and_clamps_them(value: Any, attempt: int) -> None:
    """Only a real int counts; it is clamped to 0..ATTEMPT_LIMIT, anything else is 0."""
    assert h.read_attempt({h.ATTEMPT: value}) == attempt


@pytest.mark.parametrize("headers", [None, {}, {"other": 1}])
def test_read_attempt_defaults_to_zero(headers: Mapping[str, Any] | None) -> None:
    """No header (or no headers at all) means no failed attempt yet."""
    assert h.read_attempt(headers) == 0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("orders", "orders"),
        (b"orders", "orders"),
        (bytearray(b"orders"), "orders"),
        (b"caf\xff", "caf\ufffd"),
        ("", ""),
        (None, None),
        (3, None),
        (True, None),
        (["orders"], None),
        ({"q": "orders"}, None),
        (Decimal(1), None),
    ],
    ids=_short_id,
)
def test_read_str_decodes_bytes_and_rejects_non_text(value: Any, expected: str | None) -> None:
    """Text and bytes become str (invalid UTF-8 replaced); anything else is None."""
    assert h.read_str({h.QUEUE: value}, h.QUEUE) == expected


@pytest.mark.parametrize(
    "value", ["q" * 100_000, "é" * 100_000, b"q" * 100_000, "\ud800" * 1000], ids=_short_id
)
def test_read_str_caps_long_values(value: Any) -> None:
    """A huge string header is cut to the limit in UTF-8 bytes and stays valid UTF-8."""
    text = h.read_str({h.QUEUE: value}, h.QUEUE)
    assert text is not None
    assert _utf8_size(text) <= h.NAME_LIMIT
    assert h.read_str({h.QUEUE: value}, h.QUEUE, limit=64) is not None


def test_read_history_keeps_only_mappings_and_sanitises_their_fields() -> None:
    """Non-mapping entries are skipped; fields of the wrong type get empty defaults."""
    raw = [
        "not an entry",
        42,
        None,
        ["attempt", 1],
        {"attempt": 1, "at": T1, "error_type": "builtins.ValueError", "error_message": "m"},
        {"attempt": "2", "at": 5, "error_type": None, "error_message": b"bytes msg"},
        {"attempt": -3, "at": "garbage", "error_message": "é" * 10_000},
        {},
    ]
    history = h.read_history({h.HISTORY: raw})
    assert [f.attempt for f in history] == [1, 0, 0, 0]
    assert history[0] == failures.Failure(1, T1, "builtins.ValueError", "m")
    assert history[1].at == ""
    assert history[1].error_type == ""
    assert history[1].error_message == "bytes msg"
    assert history[2].at == ""
    assert _utf8_size(history[2].error_message) <= failures.HISTORY_MESSAGE_LIMIT


def test_read_history_keeps_only_the_last_ten_of_a_long_forged_list() -> None:
    """A forged history of 100 000 entries is read as its last 10."""
    raw = [{"attempt": n} for n in range(100_000)]
    history = h.read_history({h.HISTORY: raw})
    assert [f.attempt for f in history] == list(range(99_990, 100_000))


@pytest.mark.parametrize("value", [(), ({"attempt": 1},), "[]", b"[]", {"attempt": 1}, 5])
def test_read_history_of_other_containers(value: Any) -> None:
    """A tuple is read like a list; anything that is not a sequence of entries is empty."""
    history = h.read_history({h.HISTORY: value})
    expected = [1] if isinstance(value, tuple) and value else []
    assert [f.attempt for f in history] == expected


# Replay.


def test_replay_resets_failure_headers_and_keeps_origin_and_user_headers() -> None:
    """Replay clears the failure context, counts the replay and keeps where the message began."""
    death = {"count": 1, "reason": "delivery_limit", "queue": "orders.placed"}
    dead = _fail({"tenant": "acme", "x-death": [death]}, reason="permanent_error", at=T1)
    replayed = h.replay_headers(dead, at=T2)
    for name in h.FAILURE_HEADERS:
        assert name not in replayed
    assert replayed[h.REPLAY_COUNT] == 1
    assert replayed[h.REPLAYED_AT] == T2
    assert replayed[h.QUEUE] == "orders.placed"
    assert replayed[h.HANDLER] == "billing.handlers:charge"
    assert replayed[h.ORIGINAL_EXCHANGE] == "shop"
    assert replayed[h.ORIGINAL_ROUTING_KEY] == "order.placed"
    assert replayed["tenant"] == "acme"
    assert "x-death" not in replayed
    assert replayed[h.DEATHS] == [death]
    assert h.read_attempt(replayed) == 0


def test_replay_count_increments_across_replays_and_survives_failures() -> None:
    """A second replay counts 2; failures in between keep the count and the replay time."""
    once = h.replay_headers(_fail({}, reason="permanent_error"), at=T1)
    failed_again = _fail(once, attempt=1, reason="permanent_error", at=T2)
    assert failed_again[h.REPLAY_COUNT] == 1
    assert failed_again[h.REPLAYED_AT] == T1
    assert failed_again[h.ATTEMPT] == 1
    assert failed_again[h.FIRST_FAILURE_AT] == T2
    twice = h.replay_headers(failed_again, at=T2)
    assert twice[h.REPLAY_COUNT] == 2


@pytest.mark.parametrize(
    ("forged", "count"),
    [
        (None, 1),
        ("7", 1),
        (b"7", 1),
        (7.0, 1),
        (True, 1),
        (-3, 1),
        ([7], 1),
        (0, 1),
        (7, 8),
        (10**12, h.ATTEMPT_LIMIT + 1),
    ],
    ids=_short_id,
)
def test_replay_count_from_garbage_starts_at_one(forged: Any, count: int) -> None:
    """A garbage replay count is treated as no replay yet."""
    assert h.replay_headers({h.REPLAY_COUNT: forged})[h.REPLAY_COUNT] == count


def test_replay_drops_garbage_origin_headers_and_caps_long_ones() -> None:
    """Origin headers are kept only as sanitised text."""
    replayed = h.replay_headers(
        {h.QUEUE: 5, h.HANDLER: b"mod:fn", h.ORIGINAL_EXCHANGE: "e" * 10_000, "x-qworker-evil": 1}
    )
    assert h.QUEUE not in replayed
    assert replayed[h.HANDLER] == "mod:fn"
    assert _utf8_size(replayed[h.ORIGINAL_EXCHANGE]) <= h.NAME_LIMIT
    assert "x-qworker-evil" not in replayed
    assert _is_utc_iso(replayed[h.REPLAYED_AT])


# Property-based: any AMQP-like headers.

_big_text = st.builds(
    lambda char, n: char * n,
    st.characters(),
    st.sampled_from([0, 1, 300, 3000, 70_000]),
)
_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=30)
    | st.binary(max_size=30)
    | _big_text
    | st.sampled_from([T1, "2024-05-01T10:00:00Z", "2024-05-01T10:00:00+02:00"])
)
_amqp_values = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=15,
)
_history_entries = st.fixed_dictionaries(
    {},
    optional={
        "attempt": _amqp_values,
        "at": _amqp_values,
        "error_type": _amqp_values,
        "error_message": _amqp_values,
    },
)
_keys = st.sampled_from(
    sorted(OUR_NAMES | h.BROKER_HEADERS | {"tenant", "x-qworker-evil"})
) | st.text(max_size=20)
_headers = st.builds(
    lambda base, history: {**base, **({h.HISTORY: history} if history is not None else {})},
    st.dictionaries(_keys, _amqp_values, max_size=10),
    st.none() | st.lists(_history_entries | _amqp_values, max_size=25),
)


@FAST
@given(_headers, st.integers(min_value=1, max_value=h.ATTEMPT_LIMIT + 1))
def test_failure_headers_are_sane_for_any_incoming_headers(
    incoming: dict[str, Any], attempt: int
) -> None:
    """Whatever a producer sent, the copy's x-qworker-* headers are ours, typed and capped,
    no broker header rides along, and every other header is passed through unchanged."""
    out = _fail(incoming, attempt=attempt, reason="retries_exhausted")
    _check_sane(out, attempt)
    assert not set(out) & h.BROKER_HEADERS
    for key, value in incoming.items():
        if not key.startswith(h.PREFIX) and key not in h.BROKER_HEADERS:
            assert out[key] == value


@FAST
@given(_headers)
def test_readers_and_replay_are_sane_for_any_incoming_headers(incoming: dict[str, Any]) -> None:
    """Readers never raise; replay resets failures, counts from >= 1 and keeps user headers."""
    assert 0 <= h.read_attempt(incoming) <= h.ATTEMPT_LIMIT
    for name in OUR_NAMES:
        text = h.read_str(incoming, name)
        assert text is None or _utf8_size(text) <= h.NAME_LIMIT
    assert len(h.read_history(incoming)) <= h.HISTORY_LENGTH
    replayed = h.replay_headers(incoming)
    assert not (set(replayed) & h.FAILURE_HEADERS)
    assert set(_ours(replayed)) <= OUR_NAMES
    assert 1 <= replayed[h.REPLAY_COUNT] <= h.ATTEMPT_LIMIT + 1
    assert _wire_size(_ours(replayed)) < h.TOTAL_LIMIT
    assert not set(replayed) & h.BROKER_HEADERS
    for key, value in incoming.items():
        if not key.startswith(h.PREFIX) and key not in h.BROKER_HEADERS:
            assert replayed[key] == value


def test_recursion_limit_is_not_a_concern_for_deeply_nested_values() -> None:
    """A deeply nested user header is passed through without being walked."""
    deep: Any = []
    for _ in range(sys.getrecursionlimit() * 2):
        deep = [deep]
    out = _fail({"deep": deep, h.HISTORY: deep})
    assert out["deep"] is deep
    _check_sane(out, 1)


@pytest.mark.parametrize(
    "forged",
    [None, "x", 5, [[]], [5], [{"count": "1"}], [{"routing-keys": [1]}], [{"count": True}]],
)
def test_malformed_x_death_is_dropped_from_copies(forged: Any) -> None:
    """A forged x-death (it crashes RabbitMQ 3.10's at-least-once dead-letter worker when
    a retry tier dead-letters the copy) is not carried into copies; a real one is kept."""
    assert "x-death" not in _fail({"x-death": forged})
    assert "x-death" not in h.replay_headers({"x-death": forged})


def test_broker_death_headers_are_carried_as_x_qworker_deaths_merged_by_queue_and_reason() -> None:
    """The broker's own death headers never ride on a copy as such; their content is kept in
    x-qworker-deaths, merged with earlier history by (queue, reason), counts summed."""
    death = [
        {
            "count": 2,
            "reason": "expired",
            "queue": "orders.retry.1s",
            "exchange": "",
            "routing-keys": ["orders.retry.1s"],
            "time": datetime(2026, 1, 1, tzinfo=UTC),
        }
    ]
    out = _fail({"x-death": death, "x-first-death-queue": "orders.retry.1s"})
    assert "x-death" not in out and "x-first-death-queue" not in out
    expected = {k: death[0][k] for k in ("queue", "reason", "count", "time", "exchange")}
    assert out[h.DEATHS] == [expected]
    again = _fail({**out, "x-death": death})
    assert again[h.DEATHS] == [{**expected, "count": 4}]
