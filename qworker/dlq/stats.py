"""Grouping dead letters: streaming aggregation by failure kind. Pure functions.

Two failures belong together when they share reason, error type, handler, error
code and fingerprint (see :mod:`qworker.fingerprint`). The fingerprint is the
worker's ``x-qworker-fingerprint`` when the dead letter has one, else the same
algorithm computed from its headers (:attr:`qworker.dlq.records.DeadLetter.fingerprint`),
so a group's id is always the one written on its messages. :class:`Stats` keeps at
most :data:`MAX_GROUPS` groups.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

from qworker.dlq.records import DeadLetter, kind


@dataclass(frozen=True, slots=True)
class GroupKey:
    """What a group's dead letters share."""

    reason: str
    error_type: str
    handler: str
    fingerprint: str
    error_code: str | None = None


@dataclass(slots=True)
class Group:
    """Dead letters of one kind: how many, when, an example and what the message looks like."""

    key: GroupKey
    pattern: str
    frame: str
    count: int = 0
    first_seen: datetime | None = None
    last_seen: datetime | None = None
    sample_message_id: str | None = None
    runbook: str | None = None
    """The runbook link of the group's latest failure that has one (``x-qworker-runbook``)."""
    _runbook_at: datetime | None = None

    def add(self, dl: DeadLetter) -> None:
        """Count ``dl`` in this group."""
        self.count += 1
        if self.sample_message_id is None:
            self.sample_message_id = dl.message_id
        if dl.runbook is not None and (
            self.runbook is None
            or (
                dl.failed_at is not None
                and (self._runbook_at is None or dl.failed_at > self._runbook_at)
            )
        ):
            self.runbook, self._runbook_at = dl.runbook, dl.failed_at
        if dl.failed_at is not None:
            if self.first_seen is None or dl.failed_at < self.first_seen:
                self.first_seen = dl.failed_at
            if self.last_seen is None or dl.failed_at > self.last_seen:
                self.last_seen = dl.failed_at


def key_of(dl: DeadLetter) -> GroupKey:
    """The group key of ``dl``; its fingerprint is ``dl.fingerprint`` (the header when
    present, else computed)."""
    return GroupKey(
        dl.reason, dl.error_type or "-", dl.handler or "-", dl.fingerprint, dl.error_code
    )


def describe(dl: DeadLetter) -> tuple[GroupKey, str, str]:
    """The group key of ``dl``, its normalised message and its top frame."""
    pattern, frame = kind(dl)
    return key_of(dl), pattern, frame


#: Distinct groups (and distinct error types) kept; the dead letters of any further
#: kind are counted together in :data:`OTHER` (a hostile producer can make every
#: message unique; memory must not follow).
MAX_GROUPS = 1000
OTHER = "other"
OTHER_KEY = GroupKey("-", "-", "-", OTHER, None)
OTHER_ERRORS = "(other error types)"


@dataclass(slots=True)
class Stats:
    """Aggregates dead letters one at a time, keeping no bodies.

    Memory grows with the number of groups, at most ``max_groups`` of them: the
    first ``max_groups`` kinds seen get their own group, later new kinds are
    counted in one group with fingerprint ``other``.
    Error types are capped the same way.
    """

    groups: dict[GroupKey, Group] = field(default_factory=dict)
    reasons: Counter[str] = field(default_factory=Counter)
    error_types: Counter[str] = field(default_factory=Counter)
    total: int = 0
    oldest: datetime | None = None
    max_groups: int = MAX_GROUPS

    def add(self, dl: DeadLetter) -> None:
        """Count ``dl``."""
        key = key_of(dl)
        group = self.groups.get(key)
        if group is None:
            if len(self.groups) - (OTHER_KEY in self.groups) < self.max_groups:
                # Normalising the message is the costly part of grouping (regular
                # expressions): done once per group, for the group's description.
                pattern, frame = kind(dl)
                group = self.groups[key] = Group(key, pattern, frame)
            else:
                group = self.groups.get(OTHER_KEY)
                if group is None:
                    group = self.groups[OTHER_KEY] = Group(
                        OTHER_KEY, f"(kinds beyond the first {self.max_groups})", ""
                    )
        group.add(dl)
        self.total += 1
        self.reasons[dl.reason] += 1
        error_type = dl.error_type or f"({dl.reason})"
        if error_type in self.error_types or len(self.error_types) < self.max_groups:
            self.error_types[error_type] += 1
        else:
            self.error_types[OTHER_ERRORS] += 1
        if dl.failed_at is not None and (self.oldest is None or dl.failed_at < self.oldest):
            self.oldest = dl.failed_at

    def ranked(self) -> list[Group]:
        """Groups, largest first (ties in fingerprint order, so the output is stable)."""
        return sorted(
            self.groups.values(),
            key=lambda g: (
                -g.count,
                g.key.fingerprint,
                g.key.reason,
                g.key.error_type,
                g.key.handler,
                g.key.error_code or "",
            ),
        )
