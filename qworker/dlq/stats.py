"""Grouping dead letters: message fingerprints and streaming aggregation. Pure functions.

Two failures belong together when they share reason, error type, handler and
fingerprint. The fingerprint hashes the error type, the error message with the
parts that vary from message to message normalised (uuids, hex strings, numbers
and the ids built from them), and the top frame of the traceback (file and
function, without the line number so that a redeploy does not split a group).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import PurePath

from qworker.dlq.records import DeadLetter

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_HEX = re.compile(
    r"\b0[xX][0-9a-fA-F]+\b|\b(?=[0-9a-fA-F]*\d)(?=[0-9a-fA-F]*[a-fA-F])[0-9a-fA-F]{8,}\b"
)
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_SPACE = re.compile(r"\s+")
_FRAME = re.compile(r'File "([^"\n]+)", line \d+, in ([^\s]+)')
PATTERN_LIMIT = 200


def normalise(message: str) -> str:
    """``order 42 of 9f1c...-...`` -> ``order <n> of <uuid>``; whitespace collapsed, capped."""
    text = _UUID.sub("<uuid>", message)
    text = _HEX.sub("<hex>", text)
    text = _NUMBER.sub("<n>", text)
    return _SPACE.sub(" ", text).strip()[:PATTERN_LIMIT]


def top_frame(traceback: str) -> str:
    """``file.py:function`` of the innermost frame of the last traceback; empty when none."""
    frames = _FRAME.findall(traceback)
    if not frames:
        return ""
    path, function = frames[-1]
    return f"{PurePath(path).name}:{function}"


def fingerprint(error_type: str, pattern: str, frame: str) -> str:
    """A short stable id of a failure kind."""
    return hashlib.sha1(
        f"{error_type}\0{pattern}\0{frame}".encode(), usedforsecurity=False
    ).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class GroupKey:
    """What a group's dead letters share."""

    reason: str
    error_type: str
    handler: str
    fingerprint: str


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

    def add(self, dl: DeadLetter) -> None:
        """Count ``dl`` in this group."""
        self.count += 1
        if self.sample_message_id is None:
            self.sample_message_id = dl.message_id
        if dl.failed_at is not None:
            if self.first_seen is None or dl.failed_at < self.first_seen:
                self.first_seen = dl.failed_at
            if self.last_seen is None or dl.failed_at > self.last_seen:
                self.last_seen = dl.failed_at


def describe(dl: DeadLetter) -> tuple[GroupKey, str, str]:
    """The group key of ``dl``, its normalised message and its top frame."""
    if dl.from_broker:
        pattern = normalise(dl.summary_line())
        frame = ""
    else:
        pattern = normalise(dl.error_message)
        frame = top_frame(dl.traceback)
    error_type = dl.error_type or "-"
    key = GroupKey(
        dl.reason, error_type, dl.handler or "-", fingerprint(error_type, pattern, frame)
    )
    return key, pattern, frame


@dataclass(slots=True)
class Stats:
    """Aggregates dead letters one at a time, keeping no bodies: memory grows with groups only."""

    groups: dict[GroupKey, Group] = field(default_factory=dict)
    reasons: Counter[str] = field(default_factory=Counter)
    error_types: Counter[str] = field(default_factory=Counter)
    total: int = 0
    oldest: datetime | None = None

    def add(self, dl: DeadLetter) -> None:
        """Count ``dl``."""
        key, pattern, frame = describe(dl)
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = Group(key, pattern, frame)
        group.add(dl)
        self.total += 1
        self.reasons[dl.reason] += 1
        self.error_types[dl.error_type or f"({dl.reason})"] += 1
        if dl.failed_at is not None and (self.oldest is None or dl.failed_at < self.oldest):
            self.oldest = dl.failed_at

    def ranked(self) -> list[Group]:
        """Groups, largest first (ties in fingerprint order, so the output is stable)."""
        return sorted(self.groups.values(), key=lambda g: (-g.count, g.key.fingerprint))
