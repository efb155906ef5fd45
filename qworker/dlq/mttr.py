"""MTTD and MTTR per failure group, from the dead letters' headers and the audit trail.

A failure group is a fingerprint (``x-qworker-fingerprint``, the ``dlq stats`` group id).

- **first failure**: the earliest ``x-qworker-first-failure-at`` known for the group: from
  the records of actions on its dead letters (each keeps ``first_failures`` per
  fingerprint) and from the dead letters in the DLQ now.
- **MTTD** (time to detect): from the first failure to the first ``alert`` record naming
  the fingerprint (never negative: an alert stamped before the first failure, by clock
  skew, counts as 0).
- **MTTR** (time to resolve): from the first failure to the first ``replay`` record of the
  group (outcome ``ok`` or ``partial``, at least one message replayed) that did not come
  back. A replay *came back* when a dead letter carrying its ``x-qworker-replay-id`` died
  within :data:`COME_BACK_WINDOW` of the replay. That is detected cheaply, twice over:
  every later action on a dead letter (replay, edit, purge, export) records the replay ids
  it found on it (``came_back``), and :func:`collect` browses the DLQ once for dead
  letters carrying one. A group without such a replay is *open*.

:func:`groups` and :func:`durations` are pure; :func:`collect` does the reading. The DLQ
poller (:mod:`qworker.watch`) tails the trail and hands each group's MTTD and MTTR, once, to
every :class:`MttrObserver` (the ``qworker_mttd_seconds`` / ``qworker_mttr_seconds``
histograms of :mod:`qworker.metrics`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from aio_pika.abc import AbstractConnection

from qworker import headers as h
from qworker.dlq import audit
from qworker.dlq.audit import AuditRecord
from qworker.dlq.cursor import select
from qworker.dlq.filters import Filter
from qworker.dlq.records import DeadLetter, parse_time
from qworker.dlq.trail import Acted
from qworker.errors import QueueNotFound
from qworker.topology import DLQ_SUFFIX

#: A replayed message dead again within this long after its replay means it came back.
COME_BACK_WINDOW = timedelta(hours=1)
#: Outcomes of a replay that may resolve its groups.
RESOLVING = ("ok", "partial")


@dataclass(frozen=True, slots=True)
class GroupTimes:
    """One failure group's detection and resolution."""

    fingerprint: str
    first_failure: datetime
    first_alert: datetime | None = None
    resolved_by: str | None = None  #: the replay id that resolved it
    resolved_at: datetime | None = None
    came_back: tuple[str, ...] = ()  #: replay ids of the group that came back
    dlq: str | None = None

    @property
    def mttd(self) -> timedelta | None:
        """First failure to first alert, or None (no alert named the group)."""
        if self.first_alert is None:
            return None
        return max(self.first_alert - self.first_failure, timedelta(0))

    @property
    def mttr(self) -> timedelta | None:
        """First failure to the replay that resolved it, or None (open)."""
        if self.resolved_at is None:
            return None
        return max(self.resolved_at - self.first_failure, timedelta(0))

    @property
    def open(self) -> bool:
        """True when no replay resolved the group."""
        return self.resolved_by is None


@dataclass(slots=True)
class Durations:
    """MTTD and MTTR samples in seconds, one per group that has one (for histograms)."""

    mttd: list[float] = field(default_factory=list)
    mttr: list[float] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Observation:
    """One group's MTTD or MTTR, observed once by the DLQ poller."""

    kind: str  #: ``mttd`` or ``mttr``
    queue: str  #: the work queue of the group's DLQ
    seconds: float
    fingerprint: str


class MttrObserver:
    """Receives MTTD and MTTR observations from the DLQ poller (the histograms)."""

    def mttr_prepare(self, queues: Iterable[str]) -> None:
        """The poller tracks ``queues``: create their series at zero."""

    def mttr_observed(self, observation: Observation) -> None:
        """A group's MTTD or MTTR became known (each once)."""


def groups(
    records: Iterable[AuditRecord],
    *,
    first_failures: Mapping[str, datetime] | None = None,
    came_back: Mapping[str, datetime | None] | None = None,
    window: timedelta = COME_BACK_WINDOW,
) -> list[GroupTimes]:
    """Every group the records (and ``first_failures``) know, oldest first failure first.

    Args:
        records: Audit records, in any order (malformed ones were dropped when read).
        first_failures: Further first-failure times per fingerprint (e.g. from the dead
            letters in the DLQ now).
        came_back: Replay ids seen on dead letters, each with when that dead letter
            died (None: unknown, counts as within the window), besides the records'
            own ``came_back``.
        window: How long after a replay a dead letter carrying its id means it came back.
    """
    ordered = sorted(
        (r for r in records if r.when is not None), key=lambda r: r.when or datetime.min
    )
    first: dict[str, datetime] = dict(first_failures or {})
    dlqs: dict[str, str] = {}
    back: dict[str, datetime | None] = dict(came_back or {})
    for record in ordered:
        for fingerprint, text in record.first_failures.items():
            when = parse_time(text)
            if when is not None and (fingerprint not in first or when < first[fingerprint]):
                first[fingerprint] = when
            if record.dlq:
                dlqs.setdefault(fingerprint, record.dlq)
        for replay_id, text in record.came_back.items():
            when = parse_time(text)
            earlier = back.get(replay_id)
            back[replay_id] = when if earlier is None or when is None else min(earlier, when)
    # One pass indexes alerts and replays by fingerprint (not a pass per group: the DLQ
    # poller recomputes this on its trail of up to thousands of records).
    alerts: dict[str, datetime | None] = {}
    replays: dict[str, list[AuditRecord]] = {}
    for record in ordered:
        if record.action == "alert":
            for fingerprint in record.fingerprints:
                alerts.setdefault(fingerprint, record.when)
        elif (
            record.action == "replay" and record.replay_id and record.counts.get("replayed", 0) > 0
        ):
            for fingerprint in dict.fromkeys(record.fingerprints):
                replays.setdefault(fingerprint, []).append(record)
    found = []
    for fingerprint, began in first.items():
        resolved: AuditRecord | None = None
        returned: list[str] = []
        for record in replays.get(fingerprint, ()):
            if record.replay_id and _came_back(record, back, window):
                returned.append(record.replay_id)
            elif resolved is None and record.outcome in RESOLVING:
                resolved = record
        found.append(
            GroupTimes(
                fingerprint,
                began,
                first_alert=alerts.get(fingerprint),
                resolved_by=resolved.replay_id if resolved else None,
                resolved_at=resolved.when if resolved else None,
                came_back=tuple(returned),
                dlq=dlqs.get(fingerprint),
            )
        )
    return sorted(found, key=lambda g: (g.first_failure, g.fingerprint))


def _came_back(record: AuditRecord, back: Mapping[str, datetime | None], window: timedelta) -> bool:
    if record.replay_id is None or record.replay_id not in back:
        return False
    died = back[record.replay_id]
    replayed = record.when
    return died is None or replayed is None or died <= replayed + window


def durations(found: Iterable[GroupTimes]) -> Durations:
    """The MTTD and MTTR samples (seconds) of ``found``: what a histogram observes."""
    result = Durations()
    for group in found:
        if group.mttd is not None:
            result.mttd.append(group.mttd.total_seconds())
        if group.mttr is not None:
            result.mttr.append(group.mttr.total_seconds())
    return result


def concerns(record: AuditRecord, dlq: str) -> bool:
    """True when ``record`` is about ``dlq`` (an alert also when it names the DLQ's
    work queue, or no queue at all)."""
    if record.dlq == dlq:
        return True
    if record.action != "alert":
        return False
    base = dlq[: -len(DLQ_SUFFIX)] if dlq.endswith(DLQ_SUFFIX) else None
    return record.dlq is None or record.dlq == base


@dataclass(slots=True)
class Evidence:
    """What one browse of DLQs says: first failures per group, replay ids seen again."""

    first_failures: dict[str, datetime] = field(default_factory=dict)
    came_back: dict[str, datetime | None] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)

    def add(self, dl: DeadLetter, replay_ids: Collection[str]) -> None:
        """Note ``dl``'s group and first failure, and its replay id if one of ``replay_ids``."""
        acted = Acted()
        acted.add(dl)
        for fingerprint, when in acted.first_failures.items():
            known = self.first_failures.get(fingerprint)
            if when is not None and (known is not None or len(self.first_failures) < 10_000):
                self.first_failures[fingerprint] = when if known is None else min(known, when)
        replay_id = h.read_str(dl.headers, h.REPLAY_ID, 64)
        if replay_id is not None and replay_id in replay_ids:
            known_back = self.came_back.get(replay_id)
            when = dl.failed_at
            self.came_back[replay_id] = (
                when if known_back is None or when is None else min(known_back, when)
            )


async def collect(
    connection: AbstractConnection,
    *,
    dlq: str | None = None,
    since: datetime | None = None,
    window: timedelta = COME_BACK_WINDOW,
) -> tuple[list[GroupTimes], list[AuditRecord]]:
    """Read the trail (from ``since``), browse each DLQ it names (or ``dlq``) once, and
    return the groups (see :func:`groups`) and the records read.

    A DLQ that no longer exists is skipped (its groups keep what the trail says). The
    DLQs are read as every inspection reads (nothing removed).
    """
    records = [
        r
        async for r in audit.read(connection, since=since)
        if (dlq is None or concerns(r, dlq)) and (since is None or (r.when and r.when >= since))
    ]
    queues = [dlq] if dlq else sorted({r.dlq for r in records if r.dlq and r.action != "alert"})
    replay_ids = {r.replay_id for r in records if r.replay_id}
    evidence = Evidence()
    for queue in queues:
        try:
            async with select(connection, queue, Filter(), None) as selection:
                async for held in selection:
                    evidence.add(held.dead_letter, replay_ids)
        except QueueNotFound:
            evidence.missing.append(queue)
    found = groups(
        records,
        first_failures=evidence.first_failures,
        came_back=evidence.came_back,
        window=window,
    )
    return found, records
