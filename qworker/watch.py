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
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog
from aio_pika.abc import AbstractConnection

from qworker.alerts import (
    NEW_FINGERPRINT,
    AlertRule,
    DlqObserver,
    DlqSample,
    FingerprintRule,
    rules_of,
)
from qworker.app import App
from qworker.connection import close_quietly, connect_once
from qworker.dlq import audit
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
DEFAULT_POLL = 15.0
#: A quorum DLQ whose effective delivery limit is at least this is peeked every poll:
#: at one delivery per 15 s it would take 173 days to reach.
SAFE_LIMIT = 1_000_000
#: Seconds between two checks of a DLQ's kind and delivery limit.
CHECK_EVERY = 600.0
#: ``new_fingerprint`` rules remember fingerprints alerted within this many days.
REMEMBER_DAYS = 30
#: Seconds the seeding of ``new_fingerprint`` rules may take before they decide without it.
SEED_TIMEOUT = 60.0
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


def _listens(observer: object) -> bool:
    """Whether ``observer`` does something with DLQ samples."""
    return isinstance(observer, DlqObserver) and type(observer).dlq is not DlqObserver.dlq


class Watcher:
    """Polls the DLQs of ``app``'s handlers (of ``queues``), feeds listeners, audits alerts.

    ``export``: someone reads :attr:`latest` (the supervisor's ``/metrics``), so poll even
    without listeners among the app's observers.
    """

    def __init__(
        self,
        app: App,
        queues: Sequence[str] | None = None,
        *,
        interval: float = DEFAULT_POLL,
        export: bool = False,
        management_url: str | None = None,
    ) -> None:
        if interval < 0:
            raise ValueError("the DLQ poll interval must be >= 0")
        self.app = app
        self.interval = interval
        self.management_url = management_url or os.environ.get(ENV_MANAGEMENT) or None
        self._dlqs = [_Dlq(h.queue, dlq_name(h.queue)) for h in app.select(queues)]
        self.rules: list[AlertRule] = rules_of(app.observers)
        self.listeners = [o for o in app.observers if isinstance(o, DlqObserver) and _listens(o)]
        self.polls = interval > 0 and bool(export or self.listeners)
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

    async def close(self) -> None:
        """Close the watcher's connection (if it opened one)."""
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
