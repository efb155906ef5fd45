"""The failure path's shortcuts give exactly what the work they skip would give.

``ErrorInfo.from_exception`` remembers failure sites, ``redact`` remembers short texts and
skips texts made of id characters, ``encoded_size`` dispatches on exact types first, and
``_fit`` returns after one pass when the headers fit: each is checked against the plain
computation.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qworker import clock, failures
from qworker import fingerprint as fp
from qworker import headers as h
from qworker.errors import Permanent
from qworker.logging import add_timestamp
from qworker.redact import _INERT, _TRIGGERS, _apply_rules, _redact_remembered, redact


def _fresh(exc: BaseException) -> failures.ErrorInfo:
    """What from_exception computes when it remembers nothing."""
    error_type = failures.error_type_name(exc)
    message = failures.truncate(redact(failures._message(exc)), failures.MESSAGE_LIMIT)
    tb = failures.truncate(
        redact(failures.format_traceback(exc)), failures.TRACEBACK_LIMIT, keep_tail=True
    )
    return failures.ErrorInfo(
        error_type, message, tb, failures.error_code(exc), fp.of_failure(error_type, message, tb)
    )


def _fail_here(message: str, code: str | None = None) -> BaseException:
    try:
        raise Permanent(message, code=code) if code else ValueError(message)
    except Exception as exc:
        return exc


def _fail_there(message: str) -> BaseException:
    try:
        raise ValueError(message)
    except Exception as exc:
        return exc


def _chained(message: str, *, cause: bool) -> BaseException:
    try:
        try:
            raise KeyError("inner token=abc123")
        except KeyError as inner:
            if cause:
                raise RuntimeError(message) from inner
            raise RuntimeError(message)  # noqa: B904 -- the implicit context is the point
    except RuntimeError as exc:
        return exc


def _cases() -> list[BaseException]:
    noted = _fail_here("noted")
    noted.add_note("a note with password=hunter2")
    return [
        _fail_here("boom"),
        _fail_here("boom"),  # the same site again
        _fail_here("other message"),
        _fail_here("boom", code="card_declined"),
        _fail_here("boom", code="other_code"),
        _fail_there("boom"),
        _chained("outer", cause=True),
        _chained("outer", cause=False),
        noted,
        _fail_here("x" * 10_000),  # too long to remember
    ]


def test_a_remembered_site_gives_what_capturing_it_again_gives() -> None:
    """Every case, first and second time, equals the capture without the site cache."""
    failures._SITES.clear()
    for _ in range(2):
        for exc in _cases():
            assert failures.ErrorInfo.from_exception(exc) == _fresh(exc)


def test_sites_differ_by_message_code_frame_chain_and_notes() -> None:
    """Failures that differ in anything captured are different sites."""
    cases = _cases()
    keys = [failures._site(exc, failures.error_code(exc)) for exc in cases]
    assert keys[0] == keys[1]
    distinct = [k for i, k in enumerate(keys) if i != 1 and k is not None]
    assert len(set(distinct)) == len(distinct)
    assert keys[-1] is None  # a message over the limit is not remembered


def test_a_different_note_is_a_different_site() -> None:
    """Notes are printed under the exception: two notes, two sites, two tracebacks."""
    a, b = _fail_here("n"), _fail_here("n")
    a.add_note("first")
    b.add_note("second")
    assert failures._site(a, None) != failures._site(b, None)
    assert "first" in failures.ErrorInfo.from_exception(a).traceback
    assert "second" in failures.ErrorInfo.from_exception(b).traceback


def test_syntax_errors_are_not_remembered() -> None:
    """A SyntaxError prints attributes that are not in the key."""
    try:
        compile("x = (", "<bad>", "exec")
    except SyntaxError as exc:
        assert failures._site(exc, None) is None
        assert failures.ErrorInfo.from_exception(exc) == _fresh(exc)


def test_the_site_cache_stays_small() -> None:
    """At most SITES_KEPT sites are held; the oldest go first."""
    failures._SITES.clear()
    for i in range(failures.SITES_KEPT + 10):
        failures.ErrorInfo.from_exception(_fail_here(f"distinct {i}"))
    assert len(failures._SITES) == failures.SITES_KEPT


def test_the_fingerprint_of_a_remembered_site_is_pinned() -> None:
    """The DLQ tool groups by the fingerprint: remembering sites must not change it."""
    exc = _fail_here("customer cus_NffrFeUfNV2Hib not found")
    first = failures.ErrorInfo.from_exception(exc)
    again = failures.ErrorInfo.from_exception(_fail_here("customer cus_NffrFeUfNV2Hib not found"))
    assert first.fingerprint == again.fingerprint == _fresh(exc).fingerprint


def test_no_trigger_is_made_of_inert_characters_alone() -> None:
    """The id shortcut in redact() is sound: every trigger needs another character."""
    assert all(set(word) - set(_INERT) for word in _TRIGGERS)


@given(st.text(alphabet=_INERT + "ABCDEF", max_size=80))
def test_id_like_text_is_returned_as_is(text: str) -> None:
    """Uuids, hex ids and numbers skip the rules, which would not change them either."""
    assert redact(text) == _apply_rules(text) == text


def test_id_like_text_is_not_remembered() -> None:
    """A worker logs a new message id with every failure: ids must not fill the cache (and
    push out the queue and handler names it is for); other short texts are remembered."""
    ids = [uuid.uuid4().hex for _ in range(50)] + [str(uuid.uuid4()).upper(), "12.5", ""]
    before = _redact_remembered.cache_info()
    assert [redact(text) for text in ids] == ids
    after = _redact_remembered.cache_info()
    assert (after.hits, after.misses) == (before.hits, before.misses)
    assert redact("orders.dlq handler") == "orders.dlq handler"
    assert _redact_remembered.cache_info().misses + _redact_remembered.cache_info().hits == (
        after.misses + after.hits + 1
    )


@given(st.text(max_size=300))
def test_remembered_redaction_equals_the_rules(text: str) -> None:
    """Short texts (remembered) and long ones redact as every rule would, asked twice."""
    assert redact(text) == _apply_rules(text)
    assert redact(text) == _apply_rules(text)


def _old_encoded_size(value: Any) -> int:
    """encoded_size before its exact-type shortcuts."""
    if isinstance(value, str):
        return len(value.encode("utf-8", "replace")) + 5
    if isinstance(value, bytes | bytearray | memoryview):
        return len(value) + 5
    if isinstance(value, Mapping):
        return sum(len(k) + 1 + _old_encoded_size(v) for k, v in value.items()) + 5
    if isinstance(value, list | tuple):
        return sum(_old_encoded_size(v) for v in value) + 5
    return 9


_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary()
    | st.just("\ud800 lone surrogate"),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        | st.tuples(inner, inner)
    ),
    max_leaves=12,
)


@given(_VALUES)
def test_encoded_size_is_unchanged(value: Any) -> None:
    """The exact-type shortcuts give the same estimate as the isinstance chain."""
    assert h.encoded_size(value) == _old_encoded_size(value)


@pytest.mark.parametrize("history", [0, 10, 40])
def test_fit_still_shrinks_what_does_not_fit(history: int) -> None:
    """Headers over TOTAL_LIMIT still lose traceback, then history, as before."""
    ours: dict[str, Any] = {
        h.ERROR_TRACEBACK: "t" * 70_000,
        h.HISTORY: [{"error_message": "m" * 500} for _ in range(history)],
    }
    h._fit(ours)
    assert sum(len(k) + 1 + h.encoded_size(v) for k, v in ours.items()) <= h.TOTAL_LIMIT


def _datetime_at(nanoseconds: int) -> dt.datetime:
    """What ``datetime.now(UTC)`` gives when the clock reads ``nanoseconds``."""
    second, rest = divmod(nanoseconds, 1_000_000_000)
    return dt.datetime.fromtimestamp(second, dt.UTC).replace(microsecond=rest // 1000)


@pytest.mark.parametrize(
    "nanoseconds",
    [
        1_796_000_000_000_000_000,  # a whole second: no fraction in the log form
        1_796_000_000_000_999_999,  # under a microsecond: floored, as datetime.now does
        1_796_000_000_123_456_789,
        1_796_000_000_999_999_999,
        1_796_000_001_000_001_000,  # the next second: the prefix is formatted again
    ],
)
def test_clock_text_is_datetime_isoformat(
    nanoseconds: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """iso_milliseconds and iso_z write what datetime's isoformat (and structlog) write."""
    monkeypatch.setattr(clock.time, "time_ns", lambda: nanoseconds)
    at = _datetime_at(nanoseconds)
    assert clock.iso_milliseconds() == at.isoformat(timespec="milliseconds")
    assert clock.iso_z() == at.isoformat().replace("+00:00", "Z")


def test_the_log_timestamp_is_the_clock_now() -> None:
    """add_timestamp writes the current time (within a second of datetime's)."""
    event = add_timestamp(None, "info", {})
    written = dt.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
    assert abs((dt.datetime.now(dt.UTC) - written).total_seconds()) < 1
    assert event["timestamp"].endswith("Z")


@given(st.text(max_size=40), st.integers(min_value=0, max_value=60), st.booleans())
def test_truncate_is_unchanged(text: str, limit: int, keep_tail: bool) -> None:
    """The ASCII shortcut in truncate gives what encoding and decoding gives."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        expected = data.decode("utf-8")
    else:
        room = max(0, limit - len(failures._TRUNCATED))
        expected = (
            failures._TRUNCATED + data[-room:].decode("utf-8", "ignore")
            if keep_tail
            else data[:room].decode("utf-8", "ignore") + failures._TRUNCATED
        )
    assert failures.truncate(text, limit, keep_tail=keep_tail) == expected


@given(st.dictionaries(st.text(max_size=8), _VALUES, max_size=6))
def test_table_size_is_the_sum_of_entry_estimates(headers: dict[str, Any]) -> None:
    """table_size (used by _fit and fit_frame) sums what encoded_size estimates per entry."""
    expected = sum(len(k) + 1 + _old_encoded_size(v) for k, v in headers.items())
    assert h.table_size(headers) == expected


def test_the_fingerprint_digest_is_hashlibs_sha1() -> None:
    """fingerprint() uses the interpreter's own SHA-1 (no OpenSSL tables): same ids."""
    import hashlib

    text = "qworker.errors.Permanent\0customer cus_<id> not found\0handlers.py:charge"
    assert fp.fingerprint(*text.split("\0")) == hashlib.sha1(text.encode()).hexdigest()[:12]
