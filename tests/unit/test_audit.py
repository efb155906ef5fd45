"""The audit record (JSON round trip, hostile records) and MTTD/MTTR (pure, table-driven)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from qworker.dlq import audit, mttr
from qworker.dlq.audit import AuditRecord
from qworker.dlq.filters import Filter
from qworker.dlq.records import dead_letter
from qworker.dlq.send import Canary, ReplayResult
from qworker.dlq.trail import Acted, filter_of

T0 = datetime(2024, 5, 1, 1, 0, 0, tzinfo=UTC)


def at(minutes: float) -> str:
    return (T0 + timedelta(minutes=minutes)).isoformat()


def test_record_round_trips_through_json() -> None:
    record = AuditRecord(
        "replay",
        dlq="orders.dlq",
        actor="alice@host",
        filter={"error_type": "KeyError", "limit": 10},
        counts={"replayed": 3, "skipped": 1, "failed": 0},
        message_ids=["a", "b", "c"],
        replay_id=audit.new_id(),
        fingerprints=["5b1f0c2a9e11"],
        outcome="partial",
        options={"canary": 2, "to": "other"},
        first_failures={"5b1f0c2a9e11": at(0)},
        source=None,
        came_back={"0123456789abcdef": at(5)},
    )
    assert AuditRecord.from_json(record.to_json()) == record


def test_message_ids_are_capped_and_outcome_redacted() -> None:
    record = AuditRecord(
        "purge",
        message_ids=[str(i) for i in range(audit.MESSAGE_IDS_LIMIT + 5)],
        outcome="error: amqp://bob:hunter2@host failed",
    )
    data = json.loads(record.to_json())
    assert len(data["message_ids"]) == audit.MESSAGE_IDS_LIMIT
    assert "hunter2" not in data["outcome"]


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"\xff\xfe",
        b"[1, 2]",
        b'"replay"',
        b'{"at": "2024-05-01T00:00:00+00:00"}',  # no action
        b'{"action": "", "at": "2024-05-01T00:00:00+00:00"}',
        b'{"action": 7, "at": "2024-05-01T00:00:00+00:00"}',
        b'{"action": "replay"}',  # no time
        b'{"action": "replay", "at": "yesterday"}',
        b'{"action": "replay", "at": 12}',
        b'{"action": "replay", "at": "2024-05-01T00:00:00Z", "counts": {"replayed": "9"}}',
        b'{"action": "replay", "at": "2024-05-01T00:00:00Z", "counts": {"replayed": true}}',
        b'{"action": "replay", "at": "2024-05-01T00:00:00Z", "counts": [1]}',
        b'{"action": "replay", "at": "2024-05-01T00:00:00Z", "message_ids": "abc"}',
        b'{"action": "replay", "at": "2024-05-01T00:00:00Z", "message_ids": [1, 2]}',
        b'{"action": "alert", "at": "2024-05-01T00:00:00Z", "fingerprints": [{"x": 1}]}',
        b'{"action": "replay", "at": "2024-05-01T00:00:00Z", "replay_id": ["x"]}',
        b'{"action": "replay", "at": "2024-05-01T00:00:00Z", "dlq": {"q": 1}}',
        b"[" * 100_000 + b"]" * 100_000,
    ],
)
def test_hostile_records_are_ignored(body: bytes) -> None:
    assert AuditRecord.from_json(body) is None


def test_hostile_fields_are_cut_and_dropped() -> None:
    body = json.dumps(
        {
            "action": "replay",
            "at": "2024-05-01T00:00:00",  # naive: read as UTC
            "actor": "x" * 100_000,
            "outcome": "\x1b[31mok",
            "filter": {"grep": "a", "nested": {"deep": 1}},
            "first_failures": {"abc": "not a time", "def": at(1)},
            "message_ids": ["m"] * (audit.MESSAGE_IDS_LIMIT * 3),
            "unknown_field": 1,
        }
    ).encode()
    record = AuditRecord.from_json(body)
    assert record is not None
    assert len(record.actor) == audit.TEXT_LIMIT
    assert record.filter == {"grep": "a"}
    assert record.first_failures == {"def": at(1)}
    assert len(record.message_ids) == audit.MESSAGE_IDS_LIMIT
    assert record.when == datetime(2024, 5, 1, tzinfo=UTC)


def test_filter_is_recorded_by_option_names() -> None:
    chosen = Filter(error_type="KeyError", since=T0)
    assert filter_of(chosen, 5) == {
        "error_type": "KeyError",
        "since": T0.isoformat(),
        "limit": 5,
    }
    assert filter_of(None) == {}


def test_acted_notes_ids_groups_first_failures_and_earlier_replays() -> None:
    acted = Acted()
    for i, first in enumerate((at(3), at(1))):
        acted.add(
            dead_letter(
                "orders.dlq",
                b"{}",
                {"message_id": f"m{i}"},
                {
                    "x-qworker-fingerprint": "5b1f0c2a9e11",
                    "x-qworker-first-failure-at": first,
                    "x-qworker-last-failure-at": at(9),
                    "x-qworker-error-type": "builtins.KeyError",
                    "x-qworker-replay-id": "r1",
                },
            )
        )
    record = acted.record("purge", counts={"purged": acted.count})
    assert record.dlq == "orders.dlq"
    assert record.message_ids == ["m0", "m1"]
    assert record.fingerprints == ["5b1f0c2a9e11"]
    assert record.first_failures == {"5b1f0c2a9e11": at(1)}
    assert record.came_back == {"r1": at(9)}


@pytest.mark.parametrize(
    ("result", "outcome"),
    [
        (ReplayResult(replayed=3), "ok"),
        (ReplayResult(replayed=3, skipped=1), "partial"),
        (ReplayResult(replayed=1, canary=Canary.DIED, dead_canaries=["m1"]), "canary-failed: m1"),
        (ReplayResult(replayed=1, canary=Canary.TIMED_OUT), "canary-failed: not handled"),
        (ReplayResult(replayed=1, error="no confirm within 10s"), "error: no confirm"),
    ],
)
def test_replay_outcome(result: ReplayResult, outcome: str) -> None:
    assert result.outcome.startswith(outcome)


# MTTD and MTTR

FP = "aaaaaaaaaaaa"
FP2 = "bbbbbbbbbbbb"


def replay(minutes: float, rid: str, fps: dict[str, float], outcome: str = "ok", n: int = 1):
    return AuditRecord(
        "replay",
        dlq="orders.dlq",
        at=at(minutes),
        replay_id=rid,
        counts={"replayed": n, "skipped": 0, "failed": 0},
        fingerprints=list(fps),
        first_failures={fp: at(m) for fp, m in fps.items()},
        outcome=outcome,
    )


def alert(minutes: float, *fps: str) -> AuditRecord:
    return AuditRecord("alert", at=at(minutes), fingerprints=list(fps), outcome="dlq-rate")


CASES = [
    # (name, records, first_failures, came_back, {fp: (mttd minutes, mttr minutes, resolved_by)})
    ("open: only in the DLQ", [], {FP: T0}, {}, {FP: (None, None, None)}),
    ("alert, no replay", [alert(4, FP)], {FP: T0}, {}, {FP: (4, None, None)}),
    ("alert then replay", [alert(4, FP), replay(30, "r1", {FP: 0})], {}, {}, {FP: (4, 30, "r1")}),
    ("replay without alert", [replay(10, "r1", {FP: 2})], {}, {}, {FP: (None, 8, "r1")}),
    (
        "first failure from the DLQ is earlier than the record's",
        [replay(10, "r1", {FP: 2})],
        {FP: T0},
        {},
        {FP: (None, 10, "r1")},
    ),
    (
        "replay came back: open",
        [replay(10, "r1", {FP: 0})],
        {},
        {"r1": T0 + timedelta(minutes=12)},
        {FP: (None, None, None)},
    ),
    (
        "came back after the window: resolved",
        [replay(10, "r1", {FP: 0})],
        {},
        {"r1": T0 + timedelta(hours=3)},
        {FP: (None, 10, "r1")},
    ),
    (
        "came back at an unknown time: open",
        [replay(10, "r1", {FP: 0})],
        {},
        {"r1": None},
        {FP: (None, None, None)},
    ),
    (
        "several replays: the first that stayed resolves",
        [replay(10, "r1", {FP: 0}), replay(20, "r2", {FP: 0}), replay(40, "r3", {FP: 0})],
        {},
        {"r1": T0 + timedelta(minutes=11)},
        {FP: (None, 20, "r2")},
    ),
    (
        "came back noted by a later action's record",
        [
            replay(10, "r1", {FP: 0}),
            AuditRecord(
                "purge",
                dlq="orders.dlq",
                at=at(30),
                came_back={"r1": at(15)},
                first_failures={FP: at(12)},
                fingerprints=[FP],
            ),
        ],
        {},
        {},
        {FP: (None, None, None)},
    ),
    (
        "canary failed and errors do not resolve",
        [
            replay(10, "r1", {FP: 0}, "canary-failed: m1 dead-lettered again"),
            replay(20, "r2", {FP: 0}, "error: connection lost"),
        ],
        {},
        {},
        {FP: (None, None, None)},
    ),
    ("partial resolves", [replay(10, "r1", {FP: 0}, "partial")], {}, {}, {FP: (None, 10, "r1")}),
    (
        "nothing replayed does not resolve",
        [replay(10, "r1", {FP: 0}, n=0)],
        {},
        {},
        {FP: (None, None, None)},
    ),
    (
        "alert before the first failure (clock skew) counts as 0",
        [alert(-1, FP), alert(5, FP)],
        {FP: T0},
        {},
        {FP: (0, None, None)},
    ),
    (
        "two groups, one replay resolves only the group it names",
        [alert(3, FP, FP2), replay(10, "r1", {FP: 0})],
        {FP2: T0 + timedelta(minutes=1)},
        {},
        {FP: (3, 10, "r1"), FP2: (2, None, None)},
    ),
    ("an alert about an unknown group is no group", [alert(3, FP)], {}, {}, {}),
]


@pytest.mark.parametrize(
    ("records", "first", "back", "expected"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_mttd_mttr(records, first, back, expected) -> None:  # type: ignore[no-untyped-def]
    found = {g.fingerprint: g for g in mttr.groups(records, first_failures=first, came_back=back)}
    got = {
        fp: (
            None if g.mttd is None else g.mttd / timedelta(minutes=1),
            None if g.mttr is None else g.mttr / timedelta(minutes=1),
            g.resolved_by,
        )
        for fp, g in found.items()
    }
    assert got == expected


def test_durations_are_seconds_per_group() -> None:
    found = mttr.groups([alert(4, FP), replay(30, "r1", {FP: 0}), replay(5, "r2", {FP2: 1})])
    assert mttr.durations(found) == mttr.Durations(mttd=[240.0], mttr=[1800.0, 240.0])


def test_a_hostile_record_cannot_break_the_computation() -> None:
    bad = AuditRecord.from_json(
        json.dumps(
            {
                "action": "replay",
                "at": at(1),
                "replay_id": "r9",
                "fingerprints": [FP],
                "counts": {"replayed": 1},
                "outcome": "ok",
                "first_failures": {FP: "garbage"},
            }
        ).encode()
    )
    assert bad is not None
    found = mttr.groups([bad], first_failures={FP: T0})
    assert [(g.fingerprint, g.resolved_by) for g in found] == [(FP, "r9")]
