"""How every published id ended: lost (must be none), duplicates, wrong outcomes, recoveries.

Computed, never assumed: ``lost = published - processed - dead_lettered``.
"""

from __future__ import annotations

import bisect
import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.faults.injector import Fault
from tests.faults.size import SIZE
from tests.faults.stream import DEAD_REASONS, SUCCESS_MODES, DlqDrain, Ledger, Publisher, Success


def recovery_times(faults: Sequence[Fault], successes: Sequence[Success]) -> None:
    """Set each fault's recovery: from the fault to the next successful handler completion.

    A fault whose recovery window contains the next fault is marked ``overlapped``: its time
    measures the pile-up, not the fault alone."""
    times = sorted(s.at for s in successes)
    starts = sorted(f.at for f in faults)
    for fault in faults:
        i = bisect.bisect_right(times, fault.at)
        fault.recovery_s = round(times[i] - fault.at, 3) if i < len(times) else None
        later = [t for t in starts if t > fault.at]
        end = fault.at + (fault.recovery_s or 0.0)
        fault.detail["overlapped"] = bool(later) and later[0] < end


def first_success_of(pid: int, successes: Sequence[Success]) -> float | None:
    times = [s.at for s in successes if s.pid == pid]
    return min(times) if times else None


@dataclass
class Summary:
    """What a run did, and how every published id ended."""

    scenario: str
    size: str
    seed: int
    queue: str
    published: int
    by_mode: dict[str, int]
    unconfirmed_publishes: int
    publish_retries: int
    processed: int
    dead_lettered: int
    dlq_reasons: dict[str, int]
    lost: int
    lost_ids: list[str]
    wrong_outcomes: int
    wrong_examples: list[str]
    duplicates: dict[str, int]
    faults_by_kind: dict[str, int]
    worst_recovery_s: dict[str, float | None]
    #: The same, over faults whose recovery no later fault interrupted.
    worst_isolated_recovery_s: dict[str, float]
    faults: list[dict[str, Any]]
    worker_exit_codes: list[int | None]
    worker_events: dict[str, int]
    seconds: dict[str, float]
    notes: list[str] = field(default_factory=list)
    #: Messages the broker held in retry tiers without moving them back (see docs).
    stranded: dict[str, int] = field(default_factory=dict)
    unstick_rounds: int = 0

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True))

    def line(self) -> str:
        worst = ", ".join(f"{k} {v}s" for k, v in self.worst_recovery_s.items())
        return (
            f"{self.scenario} [{self.size}, seed {self.seed}]: published {self.published}, "
            f"processed {self.processed}, dead-lettered {self.dead_lettered}, lost {self.lost}, "
            f"duplicates {self.duplicates['total']}, faults {self.faults_by_kind}, "
            f"worst recovery: {worst or '-'}"
            + (
                f" (faults not overlapped by the next one: {self.worst_isolated_recovery_s})"
                if self.worst_isolated_recovery_s != self.worst_recovery_s
                else ""
            )
            + (
                f", stranded in retry tiers: {self.stranded} "
                f"(released after {self.unstick_rounds} leader restart(s))"
                if self.stranded
                else ""
            )
        )


def account(
    scenario: str,
    rng_seed: int,
    queue: str,
    publisher: Publisher,
    ledger: Ledger,
    drain: DlqDrain,
    residual: int,
    faults: list[Fault],
    allowed_dead: dict[str, set[str]],
    exit_codes: list[int | None],
    events: Counter[str],
    seconds: dict[str, float],
) -> Summary:
    """Compute lost ids, duplicates, wrong outcomes and recovery times."""
    published = publisher.published
    processed = Counter(s.message_id for s in ledger.successes if s.message_id in published)
    fresh_dead = [r for r in drain.records if not r.redelivered]
    dead_count = Counter(r.message_id for r in fresh_dead)
    dead_ids = drain.ids
    reasons: dict[str, set[str]] = defaultdict(set)
    for r in drain.records:
        reasons[r.message_id].add(r.reason)

    lost = sorted(set(published) - set(processed) - dead_ids)
    wrong = []
    for message_id, mode in published.items():
        got = reasons.get(message_id, set())
        if mode in SUCCESS_MODES:
            bad = got - allowed_dead.get(mode, set())
            if bad:
                wrong.append(f"{message_id} ({mode}) dead-lettered: {sorted(bad)}")
        else:
            if message_id in processed:
                wrong.append(f"{message_id} ({mode}) was processed")
            bad = got - DEAD_REASONS[mode] - allowed_dead.get(mode, set())
            if bad:
                wrong.append(f"{message_id} ({mode}) dead-lettered: {sorted(bad)}")
    # Dead letters must name their origin queue (the broker's own dead letters do not).
    for r in drain.records:
        if not r.reason.startswith("x-death:") and r.queue_header != queue:
            wrong.append(f"{r.message_id}: x-qworker-queue is {r.queue_header!r}")

    duplicates = {
        "processed_twice": sum(c - 1 for c in processed.values() if c > 1),
        "dead_lettered_twice": sum(c - 1 for c in dead_count.values() if c > 1),
        "processed_and_dead_lettered": len(set(processed) & dead_ids),
        "left_in_queues": residual,
    }
    duplicates["total"] = sum(duplicates.values())

    recovery_times(faults, ledger.successes)
    worst: dict[str, float | None] = {}
    isolated: dict[str, float] = {}
    for f in faults:
        if f.recovery_s is not None:
            worst[f.kind] = max(worst.get(f.kind) or 0.0, f.recovery_s)
            if not f.detail["overlapped"]:
                isolated[f.kind] = max(isolated.get(f.kind, 0.0), f.recovery_s)
        else:
            worst.setdefault(f.kind, None)
        if f.kind == "kill9" and "new_pid" in f.detail:
            first = first_success_of(f.detail["new_pid"], ledger.successes)
            f.detail["restarted_worker_first_success_s"] = (
                round(first - f.at, 3) if first is not None else None
            )

    return Summary(
        scenario=scenario,
        size=SIZE.name,
        seed=rng_seed,
        queue=queue,
        published=len(published),
        by_mode=dict(Counter(published.values())),
        unconfirmed_publishes=len(publisher.unconfirmed),
        publish_retries=publisher.retries,
        processed=len(set(processed) & set(published)),
        dead_lettered=len(dead_ids & set(published)),
        dlq_reasons=dict(Counter(r.reason for r in drain.records)),
        lost=len(lost),
        lost_ids=lost[:50],
        wrong_outcomes=len(wrong),
        wrong_examples=wrong[:20],
        duplicates=duplicates,
        faults_by_kind=dict(Counter(f.kind for f in faults)),
        worst_recovery_s=worst,
        worst_isolated_recovery_s=isolated,
        faults=[asdict(f) for f in faults],
        worker_exit_codes=exit_codes,
        worker_events={
            k: events[k]
            for k in (
                "message.retry_scheduled",
                "message.dead_lettered",
                "message.move_failed",
                "message.settle_lost",
                "message.internal_error",
                "worker.connection_lost",
                "worker.subscribe_failed",
                "worker.consuming",
            )
        },
        seconds=seconds,
    )


def check(summary: Summary, tmp: Path, report: list[Summary]) -> None:
    """Write and print the summary, then assert what the suite guarantees."""
    summary.write(tmp / "summary.json")
    report.append(summary)
    print("\n" + summary.line() + f"\n  summary: {tmp / 'summary.json'}")
    assert summary.published > 0 and summary.unconfirmed_publishes == 0, summary.line()
    assert summary.lost == 0, f"lost ids: {summary.lost_ids}"
    assert summary.wrong_outcomes == 0, summary.wrong_examples
    assert summary.processed + summary.dead_lettered >= summary.published
    assert summary.worker_events["message.internal_error"] == 0, summary.worker_events
    assert not summary.notes, summary.notes
    assert all(code == 0 for code in summary.worker_exit_codes), summary.worker_exit_codes
    # Every fault hit a flowing stream, and handlers completed successfully after each one.
    assert all(f["recovery_s"] is not None for f in summary.faults), summary.faults
