"""The DLQ poller: depth and oldest failure of the DLQs of an app's handlers, cheaply.

A :class:`Watcher` runs next to a worker (single process) or in the supervisor
(``qworker run --processes N``: one poller for all the processes, so nothing is counted
twice). Every ``interval`` seconds (``qworker run --dlq-poll``, default 15; 0 turns it off)
it samples each DLQ (``<queue>.dlq``) and hands a :class:`~qworker.alerts.DlqSample` to
its listeners: :class:`~qworker.metrics.Metrics` (``qworker_dlq_messages``,
``qworker_dlq_oldest_age_seconds``) and ``dlq_depth`` alert rules.

What one sample costs, per DLQ:

- **Depth**: a passive ``queue.declare`` on a throwaway channel (three round trips, no
  message touched: :func:`qworker.dlq.probes.queue_depth`).
- **Oldest failure**: the head message's ``x-qworker-last-failure-at`` (else its latest
  ``x-death`` time, else its AMQP timestamp), read with one ``basic.get`` and given back
  with ``basic.nack(requeue=True)`` on the same throwaway channel; never a scan. Before
  RabbitMQ 4.3 that counts one delivery of the head on a quorum DLQ, so the watcher peeks
  every poll only where counting is harmless: a classic DLQ (counts nothing), or a quorum
  DLQ whose *effective* delivery limit the management API reports as at least
  :data:`SAFE_LIMIT` (qworker declares 1,000,000,000; a ``delivery-limit`` policy can lower
  it). Elsewhere (limit unknown, or lower) it peeks only when the head may have changed
  (first sample, depth went down, the DLQ was empty) and keeps the head's failure time in
  between; it stops peeking a head that shows :data:`qworker.dlq.probes.FALLBACK_COUNT`
  deliveries (limit unknown) or comes within :data:`qworker.dlq.probes.RESERVE` of a known
  limit, and never peeks when the known limit is below
  :data:`qworker.dlq.probes.MIN_LIMIT`. The queue's kind (re-declared with qworker's DLQ
  arguments) and the limit (management API: ``QWORKER_MANAGEMENT_URL``, else the broker's
  host on port 15672) are checked once per :data:`CHECK_EVERY` seconds.

The watcher has its own connection (``<app name>-watch``, opened on first use). It also
appends the audit records of alerts (:meth:`Watcher.audit`) and seeds
``new_fingerprint`` rules from the audit trail when it starts.

**MTTD and MTTR.** When an :class:`~qworker.dlq.mttr.MttrObserver` listens (a
:class:`~qworker.metrics.Metrics`: the ``qworker_mttd_seconds`` / ``qworker_mttr_seconds``
histograms), the watcher also tails the audit stream: one stream consumer on its
connection, started at the last :data:`REMEMBER_DAYS` days and kept open, so each record
crosses the network once (after a reconnection it resumes after the last offset read). The
records of its DLQs are kept in an :class:`MttrTracker` (bounded), which after each poll says
which groups' MTTD or MTTR became known (:func:`qworker.dlq.mttr.groups`, recomputed only
when a record arrived or a resolution came due), each once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import aiormq
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from qworker.alerts import (
    DEFAULT_DLQ_POLL,
    NEW_FINGERPRINT,
    AlertRule,
    DlqObserver,
    DlqSample,
    FingerprintRule,
    listens_to_dlqs,
    rules_of,
)
from qworker.app import App
from qworker.connection import close_quietly, connect_once
from qworker.dlq import audit
from qworker.dlq.mttr import COME_BACK_WINDOW, MttrObserver, Observation, concerns, groups
from qworker.dlq.probes import (
    FALLBACK_COUNT,
    MIN_LIMIT,
    RESERVE,
    DeliveryGuard,
    Safety,
    close_channel_quietly,
    delivery_guard,
    queue_depth,
    safety,
    use_management,
)
from qworker.dlq.records import dead_letter
from qworker.errors import QueueNotFound
from qworker.headers import read_int
from qworker.redact import mask_url
from qworker.topology import DLQ_SUFFIX, dlq_name

#: Seconds between two polls unless configured.
DEFAULT_POLL = DEFAULT_DLQ_POLL
#: A quorum DLQ whose effective delivery limit is at least this is peeked every poll:
#: at one delivery per 15 s it would take 173 days to reach.
SAFE_LIMIT = 1_000_000
#: Seconds between two checks of a DLQ's kind and delivery limit.
CHECK_EVERY = 600.0
#: ``new_fingerprint`` rules remember fingerprints alerted within this many days.
REMEMBER_DAYS = 30
#: Seconds the seeding of ``new_fingerprint`` rules may take before they decide without it.
SEED_TIMEOUT = 60.0
#: The MTTD/MTTR tracker keeps at most this many audit records (the newest).
MTTR_RECORDS = 10_000
#: ... and at most this many fingerprints named in them (each record names up to 1000).
MTTR_FINGERPRINTS = 200_000
#: The environment variable with the management API's URL.
ENV_MANAGEMENT = "QWORKER_MANAGEMENT_URL"


@dataclass(slots=True)
class _Dlq:
    queue: str
    name: str
    depth: int = -1
    head_known: bool = False
    head_at: datetime | None = None
    frozen: bool = False
    """No more peeks of this head (its delivery count nears the limit)."""
    safety: Safety | None = None
    guard: DeliveryGuard | None = None
    checked_at: float = float("-inf")
    peeks: int = 0


class MttrTracker:
    """Pure: the audit records of some DLQs in, each group's MTTD and MTTR out, once.

    Args:
        dlqs: The DLQs followed, each with its work queue (the ``queue`` label). Records
            that concern none of them (:func:`qworker.dlq.mttr.concerns`) are not kept.
        window: :data:`~qworker.dlq.mttr.COME_BACK_WINDOW`: a resolution is observed once
            its replay is older than this without having come back.
        keep: Records older than this are dropped.
        limit: At most this many records are kept (the oldest are dropped first).
        fingerprints: At most this many fingerprints named in the kept records (``fingerprints``
            plus ``first_failures``); the oldest records are dropped first.

    A group's **MTTD** is observed when :func:`~qworker.dlq.mttr.groups` first gives it one
    (an alert record and a first failure known); its **MTTR** when the replay that resolved
    it is older than ``window`` and no record says it came back. Observed fingerprints are
    remembered (per kind) while records of the group are kept, so nothing is observed twice;
    memory is bounded by the records kept (a group whose records all aged out is forgotten).
    :meth:`baseline` marks everything known (before the watcher started) as observed.
    """

    def __init__(
        self,
        dlqs: Mapping[str, str],
        *,
        window: timedelta = COME_BACK_WINDOW,
        keep: timedelta = timedelta(days=REMEMBER_DAYS),
        limit: int = MTTR_RECORDS,
        fingerprints: int = MTTR_FINGERPRINTS,
    ) -> None:
        self.dlqs = dict(dlqs)
        self.window, self.keep, self.limit, self.fingerprints = window, keep, limit, fingerprints
        self._records: dict[str, audit.AuditRecord] = {}
        self._weight = 0
        self._mttd: dict[str, None] = {}
        self._mttr: dict[str, None] = {}
        self._dirty = False
        self._next_due: datetime | None = None
        #: How many times :func:`~qworker.dlq.mttr.groups` ran (the cost, for tests).
        self.computed = 0

    def __len__(self) -> int:
        return len(self._records)

    def remembered(self) -> tuple[int, int]:
        """How many groups' MTTD and MTTR are remembered as observed."""
        return len(self._mttd), len(self._mttr)

    def add(self, record: audit.AuditRecord) -> bool:
        """Keep ``record`` if it concerns a followed DLQ (and is not kept already)."""
        if record.id in self._records or record.when is None:
            return False
        if not any(concerns(record, dlq) for dlq in self.dlqs):
            return False
        self._records[record.id] = record
        self._weight += _weight(record)
        self._dirty = True
        while len(self._records) > self.limit or (
            self._weight > self.fingerprints and len(self._records) > 1
        ):
            self._drop(next(iter(self._records)))
        return True

    def _drop(self, key: str) -> None:
        self._weight -= _weight(self._records.pop(key))

    def baseline(self, now: datetime) -> int:
        """Mark every MTTD known and every MTTR due at ``now`` as observed, without
        observing them (the watcher just started: they belong to before). How many."""
        return len(self._evaluate(now, force=True))

    def due(self, now: datetime) -> list[Observation]:
        """The MTTDs and MTTRs that became known since the last call, each once."""
        return self._evaluate(now, force=False)

    def _evaluate(self, now: datetime, *, force: bool) -> list[Observation]:
        self._prune(now)
        if not (force or self._dirty or (self._next_due is not None and now >= self._next_due)):
            return []
        self.computed += 1
        found = groups(self._records.values(), window=self.window)
        observed: list[Observation] = []
        next_due: datetime | None = None
        for group in found:
            queue = self.dlqs.get(group.dlq or "")
            if queue is None:
                continue
            fingerprint = group.fingerprint
            if group.mttd is not None and fingerprint not in self._mttd:
                self._mttd[fingerprint] = None
                observed.append(Observation("mttd", queue, group.mttd.total_seconds(), fingerprint))
            if group.mttr is None or group.resolved_at is None or fingerprint in self._mttr:
                continue
            due_at = group.resolved_at + self.window
            if due_at <= now:
                self._mttr[fingerprint] = None
                observed.append(Observation("mttr", queue, group.mttr.total_seconds(), fingerprint))
            elif next_due is None or due_at < next_due:
                next_due = due_at
        known = {g.fingerprint for g in found}
        for seen in (self._mttd, self._mttr):
            for fingerprint in [f for f in seen if f not in known]:
                del seen[fingerprint]
        self._dirty, self._next_due = False, next_due
        return observed

    def _prune(self, now: datetime) -> None:
        oldest = now - self.keep
        stale = [k for k, r in self._records.items() if (r.when or now) < oldest]
        for key in stale:
            self._drop(key)
        if stale:
            self._dirty = True


def _weight(record: audit.AuditRecord) -> int:
    return 1 + len(record.fingerprints) + len(record.first_failures)


class Watcher:
    """Polls the DLQs of ``app``'s handlers (of ``queues``), feeds listeners, audits alerts.

    ``export``: someone reads :attr:`latest` (the supervisor's ``/metrics``), so poll even
    without listeners among the app's observers. ``durations``: MTTD/MTTR observers besides
    the app's (a supervisor's :class:`~qworker.metrics.MttrHistograms`); with none at all the
    audit trail is not tailed. ``window``: the come-back window of MTTR (tests shorten it).
    """

    def __init__(
        self,
        app: App,
        queues: Sequence[str] | None = None,
        *,
        interval: float = DEFAULT_POLL,
        export: bool = False,
        management_url: str | None = None,
        durations: Sequence[MttrObserver] = (),
        window: timedelta = COME_BACK_WINDOW,
    ) -> None:
        if interval < 0:
            raise ValueError("the DLQ poll interval must be >= 0")
        self.app = app
        self.interval = interval
        self.management_url = management_url or os.environ.get(ENV_MANAGEMENT) or None
        self._dlqs = [_Dlq(h.queue, dlq_name(h.queue)) for h in app.select(queues)]
        self.rules: list[AlertRule] = rules_of(app.observers)
        self.listeners = [o for o in app.observers if isinstance(o, DlqObserver)]
        self.listeners = [o for o in self.listeners if listens_to_dlqs(o)]
        self.polls = interval > 0 and bool(export or self.listeners)
        self.durations: list[MttrObserver] = [
            o for o in app.observers if isinstance(o, MttrObserver)
        ]
        self.durations += [o for o in durations if o not in self.durations]
        #: The MTTD/MTTR tracker, when something observes them (and the watcher polls).
        self.tracker: MttrTracker | None = None
        if self.polls and self.durations and self._dlqs:
            self.tracker = MttrTracker({d.name: d.queue for d in self._dlqs}, window=window)
        self._tail: AbstractChannel | None = None
        self._offset: int | None = None
        self._caught_up = False
        self._last_record = 0.0
        self._subscribed = 0.0
        self._tail_failing = False
        #: The last sample of each DLQ, by DLQ name.
        self.latest: dict[str, DlqSample] = {}
        self._connection: AbstractConnection | None = None
        self._lock = asyncio.Lock()
        self._failing = False
        self._log = structlog.get_logger("qworker")

    @property
    def needed(self) -> bool:
        """Whether there is anything to do: DLQs to poll or alert rules to serve."""
        return self.polls or bool(self.rules)

    async def run(self) -> None:
        """Serve the rules (audit, seeding), then poll every ``interval`` until cancelled."""
        for rule in self.rules:
            rule.audit = self.audit
        try:
            await self._seed()
            while self.polls:
                await self.poll()
                await asyncio.sleep(self.interval)
            await asyncio.Event().wait()  # keep the connection for audit records
        finally:
            await self.close()

    @property
    def caught_up(self) -> bool:
        """Whether the tracker has read the audit trail up to now once (and set its baseline)."""
        return self._caught_up

    async def close(self) -> None:
        """Close the watcher's connection (if it opened one)."""
        self._tail = None
        connection, self._connection = self._connection, None
        if connection is not None:
            await close_quietly(connection)

    async def poll(self) -> list[DlqSample]:
        """Sample every DLQ once; a failure is logged and the next poll starts afresh."""
        samples: list[DlqSample] = []
        try:
            connection = await self._connect()
            for dlq in self._dlqs:
                sample = await self._sample(connection, dlq)
                if sample is None:
                    continue
                samples.append(sample)
                self.latest[dlq.name] = sample
                self._tell(sample)
        except Exception as exc:
            if not self._failing:
                self._log.warning("dlq_watch.failed", error=mask_url(repr(exc))[:300])
            self._failing = True
            await self.close()
            return samples
        if self._failing:
            self._log.info("dlq_watch.recovered")
        self._failing = False
        if self.tracker is not None:
            await self._durations(connection)
        return samples

    async def audit(self, dlq: str | None, fingerprints: list[str], rule: str, at: str) -> None:
        """Append an ``alert`` record to the audit trail (raises when it cannot)."""
        record = audit.AuditRecord(
            action="alert", dlq=dlq, fingerprints=list(fingerprints), outcome=rule, at=at
        )
        await audit.append(await self._connect(), record)

    # Internals

    async def _connect(self) -> AbstractConnection:
        async with self._lock:
            if self._connection is None or self._connection.is_closed:
                self._connection = await connect_once(
                    self.app.urls, ca_file=self.app.ssl_ca, name=f"{self.app.name}-watch"
                )
            return self._connection

    def _tell(self, sample: DlqSample) -> None:
        for listener in self.listeners:
            try:
                listener.dlq(sample)
            except Exception:
                self._log.exception("dlq_watch.listener_failed", listener=repr(listener)[:100])

    async def _sample(self, connection: AbstractConnection, dlq: _Dlq) -> DlqSample | None:
        try:
            depth = await queue_depth(connection, dlq.name)
        except QueueNotFound:
            dlq.depth, dlq.head_known, dlq.head_at = -1, False, None
            return None
        previous, dlq.depth = dlq.depth, depth
        if depth == 0:
            dlq.head_known, dlq.head_at, dlq.frozen = False, None, False
        elif await self._may_peek(connection, dlq, previous, depth):
            await self._peek(connection, dlq)
        return DlqSample(dlq.queue, dlq.name, depth, dlq.head_at, time.time())

    async def _may_peek(
        self, connection: AbstractConnection, dlq: _Dlq, previous: int, depth: int
    ) -> bool:
        now = time.monotonic()
        if dlq.safety is None or now - dlq.checked_at >= CHECK_EVERY:
            dlq.checked_at = now
            dlq.safety = await safety(connection, dlq.name)
            if dlq.safety is Safety.CLASSIC:
                dlq.guard = None
            else:
                with use_management(self.management_url):
                    dlq.guard = await delivery_guard(connection, dlq.name)
        if dlq.safety is Safety.CLASSIC:
            return True
        limit = dlq.guard.limit if dlq.guard is not None else None
        if limit is not None and limit >= SAFE_LIMIT:
            return True
        if limit is not None and limit < MIN_LIMIT:
            if not dlq.frozen:
                self._log.warning(
                    "dlq_watch.no_peek",
                    dlq=dlq.name,
                    limit=limit,
                    why="a delivery-limit below 1000 applies; the oldest age is not measured",
                )
            dlq.frozen = True
            return False
        changed = not dlq.head_known or previous < 1 or depth < previous
        if changed:
            dlq.frozen = False  # possibly another head: its count is unknown
        return changed and not dlq.frozen

    async def _peek(self, connection: AbstractConnection, dlq: _Dlq) -> None:
        channel = await connection.channel(publisher_confirms=False)
        try:
            queue = await channel.get_queue(dlq.name, ensure=False)
            message = await queue.get(no_ack=False, fail=False, timeout=10)
            if message is None:  # emptied (or every message held by a reader) since the declare
                return
            try:
                headers = dict(message.headers or {})
                properties = {"timestamp": message.timestamp, "message_id": message.message_id}
                dlq.head_at = dead_letter(dlq.name, b"", properties, headers).failed_at
                dlq.head_known = True
                dlq.peeks += 1
                count = read_int(headers, "x-delivery-count")
                limit = dlq.guard.limit if dlq.guard is not None else None
                if dlq.safety is not Safety.CLASSIC and (limit is None or limit < SAFE_LIMIT):
                    ceiling = FALLBACK_COUNT if limit is None else limit - RESERVE
                    if count + 1 >= ceiling:
                        dlq.frozen = True
                        self._log.warning(
                            "dlq_watch.head_frozen",
                            dlq=dlq.name,
                            delivery_count=count,
                            why="no more peeks of this head: its failure time is kept",
                        )
            finally:
                await message.nack(requeue=True)
        finally:
            await close_channel_quietly(channel)

    async def _durations(self, connection: AbstractConnection) -> None:
        """Tail the audit trail (subscribe if needed) and hand out what became known."""
        tracker = self.tracker
        assert tracker is not None
        try:
            if self._tail is None or self._tail.is_closed:
                await self._subscribe(connection)
            if not self._caught_up and not self._catch_up(tracker):
                return
            observed = tracker.due(datetime.now(UTC))
        except Exception as exc:
            if not self._tail_failing:
                self._log.warning("mttr.tail_failed", error=mask_url(repr(exc))[:300])
            self._tail_failing = True
            channel, self._tail = self._tail, None
            if channel is not None:
                await close_channel_quietly(channel)
            return
        if self._tail_failing:
            self._log.info("mttr.tail_recovered")
        self._tail_failing = False
        for observation in observed:
            for observer in self.durations:
                try:
                    observer.mttr_observed(observation)
                except Exception:
                    self._log.exception("mttr.observer_failed", observer=repr(observer)[:100])

    async def _subscribe(self, connection: AbstractConnection) -> None:
        """One stream consumer of the audit trail, kept open: from after the last offset
        read, else from :data:`REMEMBER_DAYS` days ago."""
        # A reader may lack the configure permission a declare needs: then the stream must exist.
        with contextlib.suppress(aiormq.exceptions.AMQPError):
            await audit.declare(connection)
        channel = await connection.channel(publisher_confirms=False)
        try:
            await channel.set_qos(prefetch_count=500)
            queue = await channel.get_queue(audit.STREAM, ensure=False)
            offset: int | datetime = (
                self._offset + 1
                if self._offset is not None
                else datetime.now(UTC) - timedelta(days=REMEMBER_DAYS)
            )
            self._last_record = time.monotonic()
            if not self._caught_up:
                self._subscribed = self._last_record
            await queue.consume(self._received, arguments={"x-stream-offset": offset})
        except BaseException:
            await close_channel_quietly(channel)
            raise
        self._tail = channel

    async def _received(self, message: AbstractIncomingMessage) -> None:
        self._last_record = time.monotonic()
        with contextlib.suppress(Exception):
            await message.ack()
        offset = (message.headers or {}).get("x-stream-offset")
        if isinstance(offset, int) and not isinstance(offset, bool):
            if self._offset is not None and offset <= self._offset:
                return  # read before a reconnection
            self._offset = offset
        record = audit.AuditRecord.from_json(message.body)
        if record is not None and self.tracker is not None:
            self.tracker.add(record)

    def _catch_up(self, tracker: MttrTracker) -> bool:
        """Whether the trail of the last days has arrived (no record for
        :data:`qworker.dlq.audit.IDLE_SECONDS`, or :data:`SEED_TIMEOUT` spent): then set
        the baseline, once."""
        now = time.monotonic()
        idle = now - self._last_record >= audit.IDLE_SECONDS
        if not idle and now - self._subscribed < SEED_TIMEOUT:
            return False
        skipped = tracker.baseline(datetime.now(UTC))
        self._caught_up = True
        self._log.info("mttr.tracking", records=len(tracker), known_before=skipped, idle=idle)
        for observer in self.durations:
            try:
                observer.mttr_prepare(d.queue for d in self._dlqs)
            except Exception:
                self._log.exception("mttr.observer_failed", observer=repr(observer)[:100])
        return True

    async def _seed(self) -> None:
        """Fill ``new_fingerprint`` rules with what the audit trail says was alerted."""
        rules = [r for r in self.rules if isinstance(r, FingerprintRule)]
        if not rules:
            return
        for rule in rules:
            rule.seeding()
        seen: set[tuple[str, str]] = set()
        try:
            async with asyncio.timeout(SEED_TIMEOUT):
                since = datetime.now(UTC) - timedelta(days=REMEMBER_DAYS)
                async for record in audit.read(await self._connect(), since=since):
                    seen.update(_alerted(record))
            self._log.info("alert.seeded", fingerprints=len(seen))
        except Exception as exc:
            self._log.warning("alert.seed_failed", error=mask_url(repr(exc))[:300])
        finally:
            for rule in rules:
                rule.seed(seen)


def _alerted(record: audit.AuditRecord) -> Iterable[tuple[str, str]]:
    """The ``(queue, fingerprint)`` pairs a ``new_fingerprint`` alert record names."""
    if record.action != "alert" or not isinstance(record.outcome, str):
        return ()
    if not record.outcome.startswith(NEW_FINGERPRINT) or not isinstance(record.dlq, str):
        return ()
    if not record.dlq.endswith(DLQ_SUFFIX) or not isinstance(record.fingerprints, list):
        return ()
    queue = record.dlq[: -len(DLQ_SUFFIX)]
    return [(queue, f) for f in record.fingerprints if isinstance(f, str)]


@contextlib.asynccontextmanager
async def watching(watcher: Watcher | None) -> AsyncIterator[None]:
    """Run ``watcher`` (if any) for the duration of the block."""
    if watcher is None or not watcher.needed:
        yield
        return
    task = asyncio.create_task(watcher.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
