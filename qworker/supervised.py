"""The child's side of ``qworker run --processes N``: what a worker started by the
supervisor (:mod:`qworker.supervisor`) does differently.

A separate module so that a worker that runs alone (the common case) does not import
the supervisor, its HTTP endpoints and their dependencies.

- **Readiness.** :func:`supervised` keeps the file ``ready-<pid>`` in the supervisor's
  directory (``QWORKER_SUPERVISOR_DIR``) exactly while the worker is ready (checked every
  0.2 s), and stops the worker if the supervisor goes away.
- **Alerts.** :func:`child_relay` suspends the app's alert rules and forwards the outcomes
  they look at to the supervisor's socket (``QWORKER_SUPERVISOR_OUTCOMES``) as small JSON
  records (:func:`encode_outcome`; the supervisor reads them with :func:`decode_outcomes`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import socket
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from qworker.alerts import rules_of
from qworker.events import Observer, Outcome, OutcomeKind, Severity

if TYPE_CHECKING:
    from qworker.app import App
    from qworker.worker import Worker

#: The environment a supervisor gives its children.
ENV_DIR = "QWORKER_SUPERVISOR_DIR"
ENV_PID = "QWORKER_SUPERVISOR_PID"
ENV_METRICS = "QWORKER_SUPERVISOR_METRICS"
ENV_OUTCOMES = "QWORKER_SUPERVISOR_OUTCOMES"
#: How often readiness is checked (children) and gathered (the supervisor).
POLL = 0.2


@contextlib.asynccontextmanager
async def supervised(worker: Worker) -> AsyncIterator[None]:
    """In a supervised child: keep ``ready-<pid>`` while ready; stop if the supervisor dies."""
    directory = os.environ.get(ENV_DIR)
    if not directory:
        yield
        return
    path = Path(directory, f"ready-{os.getpid()}")
    parent = int(os.environ.get(ENV_PID) or 0)
    task = asyncio.create_task(_report(worker, path, parent))
    try:
        yield
    finally:
        task.cancel()
        _mark(path, False)


#: The largest datagram a child sends (a batch of outcome records).
MAX_DATAGRAM = 64 * 1024
#: Outcome records per datagram, and queued at most (older ones are dropped beyond).
BATCH = 32
MAX_QUEUED = 10_000
#: Characters of an error message forwarded (the rest is in the DLQ's headers).
MESSAGE_CHARS = 300
_FIELDS = {
    "q": "queue",
    "h": "handler",
    "m": "message_id",
    "t": "error_type",
    "e": "error_message",
    "c": "classification",
    "r": "reason",
    "i": "tier",
    "f": "fingerprint",
    "x": "error_code",
    "b": "runbook",
}


def encode_outcome(event: Outcome) -> dict[str, Any]:
    """The small record a child forwards for ``event`` (short keys, capped message)."""
    record: dict[str, Any] = {"k": event.kind.value, "a": event.attempt, "d": event.duration}
    if event.severity is not None:
        record["s"] = event.severity.value
    for key, name in _FIELDS.items():
        value = getattr(event, name)
        if value is not None:
            record[key] = value[:MESSAGE_CHARS] if key == "e" else value
    return record


def decode_outcomes(data: bytes) -> list[Outcome]:
    """The outcomes of one datagram; anything malformed is skipped."""
    try:
        records = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return []
    events: list[Outcome] = []
    for record in records if isinstance(records, list) else []:
        try:
            fields = {name: record.get(key) for key, name in _FIELDS.items()}
            if not all(v is None or isinstance(v, str) for v in fields.values()):
                continue
            if not isinstance(fields["queue"], str) or not isinstance(fields["handler"], str):
                continue
            severity = record.get("s")
            events.append(
                Outcome(
                    kind=OutcomeKind(record["k"]),
                    attempt=int(record.get("a", 0)),
                    duration=float(record.get("d", 0.0)),
                    severity=Severity(severity) if severity is not None else None,
                    **fields,
                )
            )
        except (AttributeError, KeyError, TypeError, ValueError):
            continue
    return events


class OutcomeRelay(Observer):
    """In a supervised child: forwards outcomes of ``kinds`` to the supervisor's socket.

    ``outcome`` only builds a small dict and appends it to a bounded deque; a callback
    scheduled on the loop sends batches with a non-blocking ``sendto``. A full socket buffer
    keeps the batch for a retry 50 ms later; a supervisor that is gone (no socket, refused)
    drops what is queued. Never raises into the consumer.
    """

    def __init__(self, path: str, kinds: frozenset[OutcomeKind]) -> None:
        self.path, self.kinds = path, kinds
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)
        self._queue: deque[dict[str, Any]] = deque(maxlen=MAX_QUEUED)
        self._scheduled = False
        self.sent = 0
        self.dropped = 0
        self._warned = False
        self._log = structlog.get_logger("qworker")

    def outcome(self, event: Outcome) -> None:
        if event.kind not in self.kinds:
            return
        if len(self._queue) == MAX_QUEUED:
            self.dropped += 1
        self._queue.append(encode_outcome(event))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        queue = self._queue
        while queue:
            batch = [queue.popleft() for _ in range(min(BATCH, len(queue)))]
            try:
                self._socket.sendto(json.dumps(batch, separators=(",", ":")).encode(), self.path)
                self.sent += len(batch)
            except (BlockingIOError, InterruptedError):  # the supervisor is busy: soon again
                queue.extendleft(reversed(batch))
                self._scheduled = True
                asyncio.get_running_loop().call_later(0.05, self._flush)
                return
            except OSError as exc:
                gone = isinstance(exc, FileNotFoundError | ConnectionRefusedError)
                lost = len(batch) + (len(queue) if gone else 0)
                if gone:
                    queue.clear()
                self.dropped += lost
                if not self._warned or exc.errno != errno.ECONNREFUSED:
                    self._log.warning("alert.outcomes_dropped", count=lost, error=repr(exc)[:200])
                    self._warned = True

    def close(self) -> None:
        self._socket.close()


def child_relay(app: App) -> OutcomeRelay | None:
    """In a child of a supervisor that evaluates the alert rules: suspend the app's rules
    and forward their outcomes (idempotent). None elsewhere."""
    path = os.environ.get(ENV_OUTCOMES)
    if not path or not os.environ.get(ENV_DIR):
        return None
    rules = rules_of(app.observers)
    for observer in app.observers:
        if isinstance(observer, OutcomeRelay):
            return observer
    kinds = frozenset(kind for rule in rules for kind in rule.kinds)
    if not kinds:
        return None
    for rule in rules:
        rule.suspended = True
    relay = OutcomeRelay(path, kinds)
    app.add_observer(relay)
    return relay


def supervised_child() -> bool:
    """True in a worker process started by a supervisor."""
    return bool(os.environ.get(ENV_DIR))


def metrics_requested() -> bool:
    """True in a child of a supervisor that serves metrics."""
    return bool(os.environ.get(ENV_DIR)) and os.environ.get(ENV_METRICS) == "1"


async def _report(worker: Worker, path: Path, parent: int) -> None:
    log = structlog.get_logger("qworker")
    was_ready = False
    while True:
        ready = bool(worker.health()["ready"])
        if ready != was_ready:
            _mark(path, ready)
            was_ready = ready
        if parent and os.getppid() != parent:
            log.error("worker.supervisor_gone", supervisor_pid=parent)
            worker.stop()
            return
        if ready or worker.ready.is_set():
            await asyncio.sleep(POLL)
        else:  # mark readiness as soon as it comes, before a first delivery can crash us
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(worker.ready.wait(), POLL)


def _mark(path: Path, ready: bool) -> None:
    if ready:
        path.touch()
    else:
        path.unlink(missing_ok=True)
