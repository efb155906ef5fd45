"""Building the audit record of an action on a DLQ (see :mod:`qworker.dlq.audit`). Pure.

The library functions that change a DLQ (``replay``, ``replay_records``, ``replace``,
``purge``, ``export`` with ``remove``) note each dead letter they acted on in an
:class:`Acted`, then append one record once the action's own guarantees are met.
"""

from __future__ import annotations

import dataclasses
import re
from datetime import datetime
from typing import Any

from qworker import headers as h
from qworker.dlq.audit import FINGERPRINTS_LIMIT, MESSAGE_IDS_LIMIT, AuditRecord
from qworker.dlq.filters import Filter
from qworker.dlq.records import DeadLetter, parse_time
from qworker.dlq.stats import key_of

_FINGERPRINT = re.compile(r"[0-9a-f]{12}")


def fingerprint_of(dl: DeadLetter) -> str:
    """The group id of ``dl``: its ``x-qworker-fingerprint`` when well formed, else the one
    ``dlq stats`` computes (broker dead letters and older workers write none)."""
    known = getattr(dl, "fingerprint", None)  # DeadLetter.fingerprint, where it exists
    if isinstance(known, str) and known:
        return known
    written = h.read_str(dl.headers, h.FINGERPRINT, 64)
    if written is not None and _FINGERPRINT.fullmatch(written):
        return written
    return key_of(dl).fingerprint


def first_failure_of(dl: DeadLetter) -> datetime | None:
    """When ``dl``'s failures began: ``x-qworker-first-failure-at``, else its failure time."""
    return parse_time(h.read_str(dl.headers, h.FIRST_FAILURE_AT, 64)) or dl.failed_at


def filter_of(chosen: Filter | None, limit: int | None = None) -> dict[str, Any]:
    """The filter as the record keeps it: the conditions set, by the CLI's option names
    with underscores (``error_type`` for ``--error-type``), times in ISO 8601; ``limit``."""
    found: dict[str, Any] = {}
    for item in dataclasses.fields(Filter):
        value = getattr(chosen, item.name, None) if chosen is not None else None
        if value is None:
            continue
        found[item.name] = value.isoformat() if isinstance(value, datetime) else value
    if limit is not None:
        found["limit"] = limit
    return found


class Acted:
    """What an action did to which dead letters: ids (capped), groups, earlier replays."""

    def __init__(self) -> None:
        self.count = 0
        self.dlq: str | None = None
        self.message_ids: list[str] = []
        self.first_failures: dict[str, datetime | None] = {}
        self.came_back: dict[str, datetime | None] = {}

    def add(self, dl: DeadLetter) -> None:
        """Note that ``dl`` was acted on."""
        self.count += 1
        self.dlq = self.dlq or dl.queue
        if len(self.message_ids) < MESSAGE_IDS_LIMIT and dl.message_id is not None:
            self.message_ids.append(dl.message_id)
        fingerprint = fingerprint_of(dl)
        if fingerprint in self.first_failures or len(self.first_failures) < FINGERPRINTS_LIMIT:
            self.first_failures[fingerprint] = _earliest(
                self.first_failures.get(fingerprint), first_failure_of(dl)
            )
        replay_id = h.read_str(dl.headers, h.REPLAY_ID, 64)
        if replay_id and (replay_id in self.came_back or len(self.came_back) < FINGERPRINTS_LIMIT):
            self.came_back[replay_id] = _earliest(self.came_back.get(replay_id), dl.failed_at)

    def record(self, action: str, **fields: Any) -> AuditRecord:
        """The audit record of ``action`` over what was noted (``fields`` fill the rest)."""
        fields.setdefault("dlq", self.dlq)
        record = AuditRecord(
            action,
            message_ids=list(self.message_ids),
            fingerprints=list(self.first_failures),
            first_failures={k: v.isoformat() for k, v in self.first_failures.items() if v},
            **fields,
        )
        record.came_back = {
            k: (v.isoformat() if v else record.at) for k, v in self.came_back.items()
        }
        return record


def _earliest(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None or b is None:
        return a or b
    return min(a, b)
