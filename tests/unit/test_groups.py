"""Failure groups in the DLQ tool: the fingerprint read or recomputed, ``--fingerprint`` and
``--error-code``, error codes and runbooks in stats, show and the export format. No broker."""

from __future__ import annotations

import importlib.util
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from qworker import Permanent, failures
from qworker import headers as h
from qworker.cli._terminal import Runbooks, group_record, print_stats
from qworker.dlq.cursor import ScanReport
from qworker.dlq.filters import Filter, parse_fingerprint
from qworker.dlq.jsonl import dumps, parse_line, to_record
from qworker.dlq.records import DeadLetter, computed_fingerprint, dead_letter
from qworker.dlq.stats import Stats, describe
from qworker.errors import FilterError
from qworker.fingerprint import of_failure, top_frame

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
RUNBOOK = "https://runbooks.example/customer-unknown"


def error_of(exc: BaseException) -> failures.ErrorInfo:
    """``exc`` raised and captured as the worker captures it (with a real traceback)."""
    try:
        raise exc
    except BaseException as caught:
        return failures.ErrorInfo.from_exception(caught)


def headers_of(
    error: failures.ErrorInfo,
    *,
    reason: str = "permanent_error",
    runbook: str | None = None,
    handler: str = "billing.handlers:charge",
) -> dict[str, Any]:
    """The headers the worker writes on a dead letter of ``orders`` for ``error``."""
    return h.failure_headers(
        None,
        error=error,
        attempt=1,
        classification="permanent",
        origin=h.Origin("orders", handler, "", "orders", "host:1"),
        reason=reason,
        at="2024-05-01T10:00:00.000+00:00",
        runbook=runbook,
    )


def letter(headers: dict[str, Any] | None, message_id: str = "m1") -> DeadLetter:
    return dead_letter("orders.dlq", b"{}", {"message_id": message_id}, headers)


def without_fingerprint(headers: dict[str, Any]) -> dict[str, Any]:
    """The same dead letter as an older worker (before ``x-qworker-fingerprint``) wrote it."""
    return {k: v for k, v in headers.items() if k != h.FINGERPRINT}


def broker_letter(extra: dict[str, Any] | None = None) -> DeadLetter:
    death = {"reason": "delivery_limit", "queue": "orders", "time": NOW, "count": 1}
    return letter({"x-death": [death], **(extra or {})})


CUSTOMER = error_of(Permanent("customer cus_NffrFeUfNV2Hib not found", code="CUSTOMER_UNKNOWN"))


# The fingerprint: the header when present, else the same algorithm from the headers


def test_the_header_is_the_fingerprint_and_recomputing_it_agrees() -> None:
    """A qworker dead letter's fingerprint is its header, which the tool's own computation
    from the (redacted, capped) headers reproduces: old and new dead letters group together."""
    headers = headers_of(CUSTOMER)
    assert headers[h.FINGERPRINT] == CUSTOMER.fingerprint
    current, older = letter(headers), letter(without_fingerprint(headers))
    assert current.fingerprint == CUSTOMER.fingerprint
    assert older.fingerprint == CUSTOMER.fingerprint
    assert computed_fingerprint(current) == CUSTOMER.fingerprint
    assert describe(current)[0] == describe(older)[0]


@pytest.mark.parametrize(
    ("written", "used"),
    [
        ("0123456789ab", "0123456789ab"),  # well formed: used as is, even if it differs
        (b"0123456789ab", "0123456789ab"),  # bytes, as some clients send strings
        ("0123456789AB", None),  # not as the worker writes it: recomputed
        ("0123456789a", None),
        ("0123456789abc", None),
        ("zzzzzzzzzzzz", None),
        (12345678901, None),
        ("", None),
    ],
)
def test_a_garbled_fingerprint_header_is_recomputed(written: Any, used: str | None) -> None:
    headers = {**without_fingerprint(headers_of(CUSTOMER)), h.FINGERPRINT: written}
    dl = letter(headers)
    assert dl.fingerprint == (used or CUSTOMER.fingerprint)


def test_stats_groups_by_header_and_by_recomputed_fingerprint_alike() -> None:
    """Table: (headers, group) — a mix of new and older dead letters of two kinds."""
    other = error_of(Permanent("card 4242 declined", code="CARD_DECLINED"))
    cases = [
        (headers_of(CUSTOMER), CUSTOMER.fingerprint),
        (without_fingerprint(headers_of(CUSTOMER)), CUSTOMER.fingerprint),
        (
            headers_of(error_of(Permanent("customer cus_Zq9 not found", code="CUSTOMER_UNKNOWN"))),
            CUSTOMER.fingerprint,
        ),
        (headers_of(other), other.fingerprint),
        (without_fingerprint(headers_of(other)), other.fingerprint),
    ]
    stats = Stats()
    for i, (headers, _) in enumerate(cases):
        stats.add(letter(headers, f"m{i}"))
    groups = {g.key.fingerprint: g.count for g in stats.ranked()}
    assert groups == {CUSTOMER.fingerprint: 3, other.fingerprint: 2}
    for headers, expected in cases:
        assert describe(letter(headers))[0].fingerprint == expected


def test_broker_dead_letters_are_computed_and_ignore_forged_qworker_headers() -> None:
    """On a message RabbitMQ dead-lettered, group headers can only come from the producer."""
    forged = {h.FINGERPRINT: "0123456789ab", h.ERROR_CODE: "OK", h.RUNBOOK: "https://evil"}
    plain, with_forgery = broker_letter(), broker_letter(forged)
    assert with_forgery.from_broker
    assert with_forgery.fingerprint == plain.fingerprint == computed_fingerprint(plain)
    assert with_forgery.fingerprint != "0123456789ab"
    assert with_forgery.error_code is None and with_forgery.runbook is None


# A redeploy must not split a group

_HANDLER = """\
{padding}
class CustomerUnknown(Exception):
    pass


def charge(customer):
{more_padding}
    raise CustomerUnknown(f"customer {{customer}} not found")
"""


def _raise_from(path: Path, padding: int, customer: str) -> failures.ErrorInfo:
    """Load ``path`` (written with ``padding`` extra lines) as module ``handlers`` and fail."""
    path.parent.mkdir(parents=True)
    path.write_text(_HANDLER.format(padding="\n" * padding, more_padding="    x = 1\n" * padding))
    spec = importlib.util.spec_from_file_location("handlers", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["handlers"] = module
    try:
        spec.loader.exec_module(module)
        try:
            module.charge(customer)
        except Exception as exc:
            return failures.ErrorInfo.from_exception(exc)
    finally:
        del sys.modules["handlers"]
    raise AssertionError("charge did not raise")


def test_a_redeploy_with_other_line_numbers_and_another_path_keeps_the_group(
    tmp_path: Path,
) -> None:
    """Same failure, same function: other line numbers, another release directory, another
    customer id — one fingerprint, in the worker and recomputed by the tool."""
    v1 = _raise_from(tmp_path / "srv" / "app-v1" / "handlers.py", 0, "cus_NffrFeUfNV2Hib")
    v2 = _raise_from(tmp_path / "srv" / "app-v2" / "handlers.py", 7, "cus_Q8mLkPz21aXw")
    assert "app-v1" in v1.traceback and "app-v2" in v2.traceback
    lines = [line for line in v1.traceback.splitlines() if "handlers.py" in line]
    assert lines and all(line not in v2.traceback for line in lines)  # line numbers differ
    assert v1.fingerprint == v2.fingerprint
    assert letter(without_fingerprint(headers_of(v1))).fingerprint == v2.fingerprint
    assert top_frame(v1.traceback) == top_frame(v2.traceback) == "handlers.py:charge"


@pytest.mark.parametrize(
    ("one", "other"),
    [
        (
            '  File "/srv/app-v1/handlers.py", line 12, in charge\n',
            '  File "/srv/app-v2/handlers.py", line 40, in charge\n',
        ),
        (
            '  File "/srv/app/handlers.py", line 12, in charge\n',
            '  File "/opt/releases/2024-05-01/app/handlers.py", line 13, in charge\n',
        ),
        (
            '  File "/usr/lib/python3.11/site-packages/httpx/_client.py", line 1, in send\n',
            '  File "/venv/lib/python3.12/site-packages/httpx/_client.py", line 9, in send\n',
        ),
    ],
)
def test_top_frame_keeps_only_file_name_and_function(one: str, other: str) -> None:
    def tb(frame: str) -> str:
        return f"Traceback (most recent call last):\n{frame}    raise X\napp.X: boom\n"

    assert top_frame(tb(one)) == top_frame(tb(other))
    assert of_failure("app.X", "boom", tb(one)) == of_failure("app.X", "boom", tb(other))


def test_another_function_is_another_group() -> None:
    def tb(function: str) -> str:
        return f'  File "/srv/app/handlers.py", line 12, in {function}\napp.X: boom\n'

    assert of_failure("app.X", "boom", tb("charge")) != of_failure("app.X", "boom", tb("refund"))


# --fingerprint and --error-code


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("abcdef", "abcdef"),
        ("ABCDEF", "abcdef"),
        (" 0a1B2c ", "0a1b2c"),
        ("0123456789ab", "0123456789ab"),
        ("abcde", None),  # shorter than 6
        ("", None),
        ("0123456789abc", None),  # longer than a fingerprint
        ("abcdeg", None),  # not hex
        ("abc-def", None),
    ],
)
def test_fingerprint_filter_takes_a_hex_prefix_of_6_to_12(text: str, parsed: str | None) -> None:
    if parsed is None:
        with pytest.raises(FilterError, match="at least 6"):
            Filter.parse(fingerprint=text)
    else:
        assert parse_fingerprint(text) == parsed
        assert Filter.parse(fingerprint=text).fingerprint == parsed


def test_filter_errors_are_one_line() -> None:
    with pytest.raises(FilterError) as caught:
        Filter.parse(fingerprint="ab\ncd")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("raw", "matches"),
    [
        ({"fingerprint": CUSTOMER.fingerprint[:6]}, True),
        ({"fingerprint": CUSTOMER.fingerprint[:6].upper()}, True),
        ({"fingerprint": CUSTOMER.fingerprint}, True),
        ({"fingerprint": CUSTOMER.fingerprint[1:7]}, False),  # a prefix, not a substring
        ({"error_code": "CUSTOMER_UNKNOWN"}, True),
        ({"error_code": "customer_unknown"}, False),  # exact
        ({"error_code": "CUSTOMER"}, False),
        ({"error_code": "CUSTOMER_UNKNOWN", "fingerprint": CUSTOMER.fingerprint[:8]}, True),
        ({"error_code": "CARD_DECLINED", "fingerprint": CUSTOMER.fingerprint[:8]}, False),
    ],
)
def test_fingerprint_and_error_code_filters_match(raw: dict[str, str], matches: bool) -> None:
    chosen = Filter.parse(**raw)
    assert chosen.matches(letter(headers_of(CUSTOMER))) is matches
    # An older dead letter of the same failure is selected the same way.
    assert chosen.matches(letter(without_fingerprint(headers_of(CUSTOMER)))) is matches


def test_error_code_filter_never_matches_a_dead_letter_without_code() -> None:
    uncoded = letter(headers_of(error_of(ValueError("bad"))))
    assert uncoded.error_code is None
    assert not Filter.parse(error_code="CUSTOMER_UNKNOWN").matches(uncoded)
    assert not Filter.parse(error_code="CUSTOMER_UNKNOWN").matches(broker_letter())


@pytest.mark.parametrize("code", ["", "has space", "x" * 65, "semi;colon"])
def test_an_error_code_that_cannot_exist_is_a_usage_error(code: str) -> None:
    with pytest.raises(FilterError):
        Filter.parse(error_code=code)


# Error codes and runbooks read, grouped and shown


@pytest.mark.parametrize(
    ("extra", "code", "runbook"),
    [
        ({h.ERROR_CODE: "CUSTOMER_UNKNOWN", h.RUNBOOK: RUNBOOK}, "CUSTOMER_UNKNOWN", RUNBOOK),
        ({h.ERROR_CODE: b"billing.card:declined"}, "billing.card:declined", None),
        ({h.ERROR_CODE: "not a code"}, None, None),
        ({h.ERROR_CODE: 404}, None, None),
        ({h.ERROR_CODE: "x" * 65}, None, None),
        ({h.RUNBOOK: ""}, None, None),
        ({h.RUNBOOK: 7}, None, None),
        ({h.RUNBOOK: "https://x/\x1b[31m"}, None, "https://x/\x1b[31m"),  # escaped when printed
    ],
)
def test_error_code_and_runbook_are_read_safely(
    extra: dict[str, Any], code: str | None, runbook: str | None
) -> None:
    base = headers_of(error_of(ValueError("bad")))
    dl = letter({**base, **extra})
    assert (dl.error_code, dl.runbook) == (code, runbook)


def test_stats_groups_carry_error_code_and_latest_runbook() -> None:
    stats = Stats()
    old = {**headers_of(CUSTOMER, runbook="https://old"), h.LAST_FAILURE_AT: "2024-05-01T09:00Z"}
    new = {**headers_of(CUSTOMER, runbook="https://new"), h.LAST_FAILURE_AT: "2024-05-01T11:00Z"}
    for i, headers in enumerate([new, old, headers_of(CUSTOMER)]):
        stats.add(letter(headers, f"m{i}"))
    # The same message with another code is another group (same fingerprint).
    stats.add(letter({**headers_of(CUSTOMER), h.ERROR_CODE: "CUSTOMER_GONE"}, "m9"))
    first, second = stats.ranked()
    assert (first.count, first.key.error_code, first.runbook) == (
        3,
        "CUSTOMER_UNKNOWN",
        "https://new",
    )
    assert (second.count, second.key.error_code, second.runbook) == (1, "CUSTOMER_GONE", None)
    assert first.key.fingerprint == second.key.fingerprint == CUSTOMER.fingerprint
    record = group_record(first)
    assert (record["error_code"], record["runbook"]) == ("CUSTOMER_UNKNOWN", "https://new")
    assert record["fingerprint"] == CUSTOMER.fingerprint


def _report(matched: int) -> ScanReport:
    return ScanReport(queue="orders.dlq", depth=matched, matched=matched)


def test_stats_table_shows_code_and_runbook_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    stats = Stats()
    stats.add(letter(headers_of(CUSTOMER, runbook="https://x/\x1b[2J\x07")))
    print_stats(stats, _report(1), as_json=False)
    out = capsys.readouterr().out
    assert "ERROR CODE" in out and "CUSTOMER_UNKNOWN" in out
    assert "runbook: https://x/" in out
    assert "\x1b" not in out and "\x07" not in out
    print_stats(stats, _report(1), as_json=True)
    (line,) = capsys.readouterr().out.splitlines()
    assert "\x1b" not in line
    assert json.loads(line)["runbook"] == "https://x/\x1b[2J\x07"


def test_show_lists_each_runbook_once_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    runbooks = Runbooks()
    for i in range(3):
        runbooks.add(letter(headers_of(CUSTOMER, runbook=RUNBOOK), f"m{i}"))
    runbooks.add(letter(headers_of(CUSTOMER, runbook="https://y/\x1b]8;;evil\x07")))
    runbooks.add(letter(headers_of(error_of(ValueError("x")))))  # no runbook
    runbooks.print()
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "runbooks:"
    assert f"  {RUNBOOK}  (3 shown; CUSTOMER_UNKNOWN)" in out.splitlines()
    assert "\x1b" not in out and "\x07" not in out and len(out.splitlines()) == 3


# The export format


def test_record_carries_fingerprint_error_code_and_runbook() -> None:
    dl = letter(without_fingerprint(headers_of(CUSTOMER, runbook=RUNBOOK)))
    record = to_record(dl)
    assert record["fingerprint"] == CUSTOMER.fingerprint  # computed for an older dead letter
    assert (record["error_code"], record["runbook"]) == ("CUSTOMER_UNKNOWN", RUNBOOK)
    back = parse_line(dumps(dl), "f:1")
    assert (back.fingerprint, back.error_code, back.runbook) == (
        CUSTOMER.fingerprint,
        "CUSTOMER_UNKNOWN",
        RUNBOOK,
    )


@pytest.mark.parametrize(
    "derived",
    [
        {},  # an export written before these fields existed
        {"fingerprint": "ffffffffffff", "error_code": "LIES", "runbook": "https://evil"},
    ],
)
def test_derived_record_fields_are_ignored_when_read_back(derived: dict[str, str]) -> None:
    """Older exports still read; an edited derived field cannot change the group or code."""
    record = to_record(letter(headers_of(CUSTOMER, runbook=RUNBOOK)))
    for name in ("fingerprint", "error_code", "runbook"):
        record.pop(name)
    back = parse_line(json.dumps({**record, **derived}), "f:1")
    assert (back.fingerprint, back.error_code, back.runbook) == (
        CUSTOMER.fingerprint,
        "CUSTOMER_UNKNOWN",
        RUNBOOK,
    )


def test_broker_dead_letter_record_has_a_fingerprint_and_no_code() -> None:
    record = to_record(broker_letter())
    assert len(record["fingerprint"]) == 12
    assert record["error_code"] is None and record["runbook"] is None
