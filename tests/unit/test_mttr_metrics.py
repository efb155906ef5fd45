"""The MTTD/MTTR tracker of the DLQ poller: audit records in, observations out, each once.

Table-driven: each case is a list of steps ``(minutes after T0, records appended, the
observations expected at that moment)``; a replay that came back within the window is never
observed; memory stays bounded; the histograms render what was observed.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from qworker.dlq.audit import AuditRecord
from qworker.dlq.mttr import Observation
from qworker.metrics import Metrics, MttrHistograms
from qworker.watch import MttrTracker

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
DLQS = {"orders.dlq": "orders", "mail.dlq": "mail"}


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def iso(minutes: float) -> str:
    return at(minutes).isoformat()


def failed(fingerprint: str, minutes: float) -> dict[str, str]:
    return {fingerprint: iso(minutes)}


def alert(minutes: float, *fingerprints: str, dlq: str | None = "orders.dlq") -> AuditRecord:
    return AuditRecord(
        "alert",
        dlq=dlq,
        at=iso(minutes),
        fingerprints=list(fingerprints),
        outcome="new fingerprint",
    )


def replay(
    minutes: float,
    replay_id: str,
    first: dict[str, str],
    *,
    dlq: str = "orders.dlq",
    outcome: str = "ok",
    replayed: int = 3,
) -> AuditRecord:
    return AuditRecord(
        "replay",
        dlq=dlq,
        at=iso(minutes),
        replay_id=replay_id,
        fingerprints=list(first),
        first_failures=first,
        counts={"replayed": replayed},
        outcome=outcome,
    )


def action(minutes: float, name: str, first: dict[str, str], **came_back: float) -> AuditRecord:
    """An ``export-remove``/``purge``/``edit`` that found copies of replays (``came_back``)."""
    return AuditRecord(
        name,
        dlq="orders.dlq",
        at=iso(minutes),
        fingerprints=list(first),
        first_failures=first,
        came_back={k: iso(v) for k, v in came_back.items()},
    )


Step = tuple[float, list[AuditRecord], set[tuple[str, str, float]]]

CASES: dict[str, list[Step]] = {
    "alert then replay: MTTD at the replay, MTTR once the window passed": [
        (5, [alert(5, "fa")], set()),  # no first failure known yet
        (30, [replay(30, "r1", failed("fa", 0))], {("mttd", "orders", 300.0)}),
        (60, [], set()),
        (89.9, [], set()),  # the replay is 59.9 minutes old
        (90, [], {("mttr", "orders", 1800.0)}),
        (200, [], set()),
        (300, [alert(300, "fa"), replay(300, "r2", failed("fa", 0))], set()),  # never twice
        (400, [], set()),
    ],
    "first failure known first, alert later": [
        (10, [action(10, "export-remove", failed("fb", 2))], set()),
        (20, [alert(20, "fb")], {("mttd", "orders", 1080.0)}),
    ],
    "a replay that came back within the window is never observed": [
        (0, [alert(0, "fc")], set()),
        (10, [replay(10, "r1", failed("fc", 0))], {("mttd", "orders", 0.0)}),
        (40, [action(40, "purge", failed("fc", 0), r1=35)], set()),  # died 25 min after r1
        (200, [], set()),
        (300, [replay(300, "r2", failed("fc", 0))], set()),
        (359, [], set()),
        (360, [], {("mttr", "orders", 18000.0)}),  # r2 resolved it, not r1
    ],
    "came back known only after the window: counted as resolved (the limit)": [
        (0, [alert(0, "fd"), replay(0, "r1", failed("fd", 0))], {("mttd", "orders", 0.0)}),
        (60, [], {("mttr", "orders", 0.0)}),
        (90, [action(90, "purge", failed("fd", 0), r1=30)], set()),
        (500, [replay(500, "r2", failed("fd", 0))], set()),
        (600, [], set()),
    ],
    "a failed or empty replay does not resolve": [
        (0, [alert(0, "fe")], set()),
        (1, [replay(1, "r1", failed("fe", 0), outcome="error: x")], {("mttd", "orders", 0.0)}),
        (2, [replay(2, "r2", failed("fe", 0), replayed=0)], set()),
        (500, [], set()),
    ],
    "groups of other DLQs are not followed": [
        (0, [alert(0, "ff", dlq="other.dlq")], set()),
        (1, [replay(1, "r1", failed("ff", 0), dlq="other.dlq")], set()),
        (100, [], set()),
    ],
    "an alert naming no queue counts; labels by the group's DLQ": [
        (0, [alert(0, "fg", dlq=None)], set()),
        (3, [replay(3, "r1", failed("fg", 1), dlq="mail.dlq")], {("mttd", "mail", 0.0)}),
        (63, [], {("mttr", "mail", 120.0)}),
    ],
    "several groups in one replay": [
        (0, [alert(0, "g1", "g2")], set()),
        (
            10,
            [replay(10, "r1", {"g1": iso(0), "g2": iso(-10)})],
            {("mttd", "orders", 0.0), ("mttd", "orders", 600.0)},
        ),
        (70, [], {("mttr", "orders", 600.0), ("mttr", "orders", 1200.0)}),
    ],
}


def observed(found: list[Observation]) -> set[tuple[str, str, float]]:
    return {(o.kind, o.queue, round(o.seconds, 3)) for o in found}


@pytest.mark.parametrize("steps", list(CASES.values()), ids=list(CASES))
def test_records_in_observations_out_each_once(steps: list[Step]) -> None:
    tracker = MttrTracker(DLQS)
    tracker.baseline(at(-1))
    total: list[Observation] = []
    for minutes, records, expected in steps:
        for record in records:
            tracker.add(record)
            tracker.add(record)  # read twice (a reconnection): kept once
        found = tracker.due(at(minutes))
        assert observed(found) == expected, minutes
        assert len(found) == len(expected)
        total += found
        assert tracker.due(at(minutes)) == []  # asked again: nothing more
    keys = [(o.kind, o.fingerprint) for o in total]
    assert len(keys) == len(set(keys))  # each group's MTTD and MTTR at most once


def test_baseline_skips_what_was_known_and_keeps_pending_resolutions() -> None:
    tracker = MttrTracker(DLQS)
    for record in (
        alert(0, "old"),
        replay(5, "r0", failed("old", 0)),  # MTTD known, MTTR due: before the watcher started
        alert(100, "new"),
        replay(110, "r1", failed("new", 100)),  # MTTD known; MTTR not yet due at 120
    ):
        tracker.add(record)
    assert tracker.baseline(at(120)) == 3
    assert tracker.due(at(120)) == []
    assert observed(tracker.due(at(170))) == {("mttr", "orders", 600.0)}
    assert tracker.due(at(500)) == []


def test_groups_are_computed_only_when_something_changed() -> None:
    tracker = MttrTracker(DLQS)
    tracker.add(alert(0, "fa"))
    tracker.add(replay(10, "r1", failed("fa", 0)))
    tracker.due(at(10))
    computed = tracker.computed
    for minute in range(11, 70):
        tracker.due(at(minute))
    assert tracker.computed == computed  # nothing new, nothing due: no work
    tracker.due(at(70))
    assert tracker.computed == computed + 1  # the resolution came due


def test_memory_is_bounded() -> None:
    tracker = MttrTracker(DLQS, limit=100)
    for n in range(1000):
        tracker.add(alert(n, f"f{n}"))
        tracker.add(replay(n, f"r{n}", failed(f"f{n}", n - 1)))
        assert observed(tracker.due(at(n))) == {("mttd", "orders", 60.0)}
    assert len(tracker) == 100  # the 50 newest groups
    assert tracker.remembered() == (50, 0)  # only groups still kept are remembered
    late = tracker.due(at(5000))  # their replays are old enough now
    assert sorted(int(o.fingerprint[1:]) for o in late) == list(range(950, 1000))
    assert {o.kind for o in late} == {"mttr"}
    assert tracker.due(at(6000)) == []
    assert tracker.remembered() == (50, 50)


def test_fingerprints_named_are_bounded() -> None:
    tracker = MttrTracker(DLQS, fingerprints=1000)
    for n in range(100):
        many = {f"g{n}-{i}": iso(n) for i in range(100)}
        tracker.add(replay(n, f"r{n}", many))
    assert len(tracker) == 4  # 4 x 201 fingerprints named: at most 1000


def test_records_older_than_the_kept_days_are_dropped() -> None:
    tracker = MttrTracker(DLQS, keep=timedelta(days=30))
    tracker.add(alert(0, "fa"))
    tracker.add(replay(1, "r1", failed("fa", 0)))
    tracker.due(at(100))
    assert len(tracker) == 2
    assert tracker.due(at(60 * 24 * 31)) == []
    assert len(tracker) == 0
    assert tracker.remembered() == (0, 0)


def test_unfollowed_or_undated_records_are_not_kept() -> None:
    tracker = MttrTracker(DLQS)
    assert not tracker.add(replay(0, "r1", failed("x", 0), dlq="elsewhere.dlq"))
    assert not tracker.add(AuditRecord("replay", dlq="orders.dlq", at="not a time"))
    assert tracker.add(alert(0, "x"))
    assert len(tracker) == 1


def test_histograms_render_observations() -> None:
    metrics = Metrics()
    metrics.mttr_prepare(["orders"])
    text = metrics.render().decode()
    assert 'qworker_mttd_seconds_count{queue="orders"} 0.0' in text
    assert 'qworker_mttr_seconds_bucket{le="604800.0",queue="orders"} 0.0' in text
    metrics.mttr_observed(Observation("mttd", "orders", 120.0, "fa"))
    metrics.mttr_observed(Observation("mttr", "orders", 7200.0, "fa"))
    text = metrics.render().decode()
    assert 'qworker_mttd_seconds_bucket{le="300.0",queue="orders"} 1.0' in text
    assert 'qworker_mttd_seconds_bucket{le="60.0",queue="orders"} 0.0' in text
    assert 'qworker_mttr_seconds_bucket{le="3600.0",queue="orders"} 0.0' in text
    assert 'qworker_mttr_seconds_bucket{le="14400.0",queue="orders"} 1.0' in text
    assert 'qworker_mttr_seconds_sum{queue="orders"} 7200.0' in text
    assert 'fingerprint="' not in text and '"fa"' not in text  # never a fingerprint label


def test_standalone_histograms_are_a_collector() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    histograms = MttrHistograms()
    histograms.mttr_observed(Observation("mttr", "mail", 90.0, "f"))
    registry = CollectorRegistry()
    registry.register(histograms.registry)
    assert 'qworker_mttr_seconds_count{queue="mail"} 1.0' in generate_latest(registry).decode()
