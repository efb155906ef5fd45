"""Actions that outlive a request: a replay or a purge runs as a job the pages poll.

A :class:`Job` counts what its action did as it goes (the replay's per-message
events), so ``GET /api/jobs/{id}`` shows live progress; when the action ends it
holds the final counts, the canaries' fate and, if it stopped early, why. The
console keeps the last :data:`KEPT` jobs; older finished ones are forgotten.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from qworker.console.errors import NotFound
from qworker.dlq.send import Event, ReplayOutcome, ReplayResult
from qworker.redact import redact

JobKind = Literal["replay", "dry-run", "purge"]
JobState = Literal["queued", "running", "done", "failed"]

#: Jobs remembered (running ones are never forgotten).
KEPT = 200
#: Per job, the last events kept for the page (skipped and failed messages first of all).
EVENTS_KEPT = 100


@dataclass(slots=True)
class Job:
    """One replay, dry run or purge: its progress, then its result.

    ``state`` is ``queued`` (waiting for a read of the same DLQ to end), ``running``,
    ``done`` (the action ran to its end; some messages may still have been skipped or
    failed, and stay in the DLQ) or ``failed`` (it stopped early: ``error`` says why;
    whatever it had not confirmed stays in the DLQ).
    """

    id: str
    kind: JobKind
    dlq: str
    actor: str
    state: JobState = "queued"
    replayed: int = 0
    would_replay: int = 0
    skipped: int = 0
    failed: int = 0
    purged: int = 0
    canary: str | None = None
    replay_id: str | None = None
    error: str | None = None
    warning: str | None = None
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    finished_at: datetime | None = None
    events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=EVENTS_KEPT))
    task: asyncio.Task[None] | None = None

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed")

    def on_event(self, event: Event) -> None:
        """Count one replay event (called by :func:`qworker.dlq.replay` as it goes)."""
        outcome = event.outcome
        if outcome is ReplayOutcome.REPLAYED:
            self.replayed += 1
        elif outcome is ReplayOutcome.PLANNED:
            self.would_replay += 1
        elif outcome is ReplayOutcome.SKIPPED:
            self.skipped += 1
        else:
            self.failed += 1
        if outcome in (ReplayOutcome.SKIPPED, ReplayOutcome.FAILED):
            self.events.append(
                {
                    "message_id": event.dead_letter.message_id,
                    "outcome": outcome.value,
                    "target": event.target,
                    "detail": redact(event.detail or ""),
                }
            )

    def replayed_with(self, result: ReplayResult) -> None:
        """Take the final counts of a replay (they agree with the events counted)."""
        self.replayed, self.would_replay = result.replayed, result.planned
        self.skipped, self.failed = result.skipped, result.failed
        self.canary = result.canary.value if result.canary is not None else None
        self.replay_id = result.replay_id
        if result.error is not None:
            self.error = redact(result.error)
        elif result.canary is not None and result.canary.value != "passed":
            self.error = redact(result.outcome)

    def finish(self, error: str | None = None) -> None:
        """Mark the job ended: ``failed`` when it stopped early (``error`` or its own)."""
        if error is not None:
            self.error = redact(error)
        self.state = "failed" if self.error is not None else "done"
        self.finished_at = datetime.now(UTC)

    def to_json(self) -> dict[str, Any]:
        """The job as ``GET /api/jobs/{id}`` answers it."""
        return {
            "id": self.id,
            "kind": self.kind,
            "dlq": self.dlq,
            "state": self.state,
            "replayed": self.replayed,
            "would_replay": self.would_replay,
            "skipped": self.skipped,
            "failed": self.failed,
            "purged": self.purged,
            "canary": self.canary,
            "replay_id": self.replay_id,
            "error": self.error,
            "warning": self.warning,
            "actor": self.actor,
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "events": list(self.events),
        }


class Jobs:
    """The console's jobs by id, newest last; at most :data:`KEPT` finished ones."""

    def __init__(self) -> None:
        self._jobs: OrderedDict[str, Job] = OrderedDict()

    def new(self, kind: JobKind, dlq: str, actor: str) -> Job:
        """Register a new queued job."""
        job = Job(uuid.uuid4().hex[:16], kind, dlq, actor)
        self._jobs[job.id] = job
        while len(self._jobs) > KEPT:
            oldest = next((j for j in self._jobs.values() if j.finished), None)
            if oldest is None:
                break
            del self._jobs[oldest.id]
        return job

    def get(self, job_id: str) -> Job:
        """The job with ``job_id``; raises :class:`NotFound`."""
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound("no such job (the console keeps the last 200, until it restarts)")
        return job

    def running(self) -> list[Job]:
        """Jobs not yet ended."""
        return [job for job in self._jobs.values() if not job.finished]
