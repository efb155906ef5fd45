"""The console's one door to the broker: every page and every API request goes through here.

:class:`Console` calls the :mod:`qworker.dlq` library (the same code as the CLI, with
its guarantees: reading gives every message back, a replay acks a dead letter only
after its copy was confirmed, canaries, rate, skipped-not-lost, an audit record per
action) and adds what a server shared by several people needs:

- **One pass per DLQ at a time.** A pass over a DLQ holds the messages it read until
  it ends, so a second pass running at the same moment would not see them: a list
  would look short, a replay would miss messages. Passes of the console over one DLQ
  therefore take turns (a read waits up to ``read_wait`` seconds for another read);
  while a replay or purge works on a DLQ, reads of it are answered with
  :class:`~qworker.console.errors.Busy` at once instead of a wrong picture, and a second
  action on it is refused. A CLI replay of the same DLQ at the same moment can still
  miss the messages a console read holds: they stay in the DLQ (skipped, never lost).
- **Cached scans.** Grouping a DLQ reads all of it, so its result is kept with the time it
  was taken; it is reused while the DLQ's depth is unchanged or it is younger than
  ``scan_ttl``, marked stale when the depth moved, and dropped after this console
  changed the DLQ. Memory is bounded by the number of groups (see
  :class:`qworker.dlq.Stats`), never by the number of dead letters.
- **Errors a person can act on**: every library or broker failure becomes a
  :class:`~qworker.console.errors.ConsoleError` with an HTTP status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import IO, Any, TypeVar

import aiormq
import structlog
from aio_pika.abc import AbstractConnection

from qworker import dlq as lib
from qworker.app import App
from qworker.console.broker import BrokerLink
from qworker.console.errors import (
    Busy,
    ConsoleError,
    Invalid,
    NotFound,
    Refused,
    Unavailable,
    Unprocessable,
)
from qworker.console.jobs import Job, JobKind, Jobs
from qworker.console.masking import masked_record
from qworker.dlq import filters
from qworker.dlq.cursor import select
from qworker.dlq.jsonl import to_record
from qworker.dlq.management import list_dlqs
from qworker.dlq.probes import queue_depth
from qworker.dlq.records import queue_name_problem
from qworker.errors import (
    BadTarget,
    BrokerStalled,
    BrokerUnavailable,
    BrowseRefused,
    ConfigurationError,
    DecodeError,
    FilterError,
    ManagementError,
    QueueNotFound,
    QworkerError,
)
from qworker.redact import redact

log = structlog.get_logger("qworker.console")
T = TypeVar("T")

#: Filter keys of the API: the CLI's filter options with underscores.
FILTER_KEYS = filters.NAMES
#: How long a read waits for another pass over the same DLQ before answering Busy.
READ_WAIT = 120.0
#: A scan younger than this is reused even if the DLQ's depth changed (marked stale).
SCAN_TTL = 60.0
#: Most dead letters in one page of messages, and most body bytes in one page.
PAGE_LIMIT = 500
PAGE_BYTES = 16 * 1024 * 1024
#: How many groups the overview shows per DLQ.
TOP_GROUPS = 3
#: An export is written to a temporary file that stays in memory up to this size.
EXPORT_SPOOL = 8 * 1024 * 1024
#: AMQP's limit on a queue name (a short string).
MAX_QUEUE_BYTES = 255
#: The queue names pamqp sends (its ``DOMAIN_REGEX["queue-name"]``); it raises ValueError
#: for any other before a frame is written.
SENDABLE_NAME = re.compile(r"[a-zA-Z0-9\-_.:@#,/+ ]*")
#: On stop, running jobs get this long to end before they are cancelled.
STOP_GRACE = 10.0


def filter_from(values: Mapping[str, Any] | None) -> lib.Filter:
    """A :class:`qworker.dlq.Filter` from API input (a JSON object or query parameters).

    Keys are :data:`FILTER_KEYS`; an empty or null value leaves that condition unset
    (an empty form field means "any").

    Raises:
        Invalid: an unknown key, a value that is not text, or a value the CLI would refuse.
    """
    if values is None:
        return lib.Filter()
    if not isinstance(values, Mapping):
        raise Invalid("filter must be a JSON object")
    unknown = sorted(str(key) for key in values if key not in FILTER_KEYS)
    if unknown:
        raise Invalid(
            f"unknown filter key {', '.join(map(repr, unknown))[:200]}; "
            f"known keys: {', '.join(FILTER_KEYS)}"
        )
    given: dict[str, str] = {}
    for key, value in values.items():
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise Invalid(f"filter {key} must be text, not {type(value).__name__}")
        given[key] = value
    try:
        return lib.Filter.parse(
            fingerprint=given.get("fingerprint"),
            error_code=given.get("error_code"),
            error_type=given.get("error_type"),
            reason=given.get("reason"),
            handler=given.get("handler"),
            message_id=given.get("message_id"),
            grep=given.get("grep"),
            since=given.get("since"),
            until=given.get("until"),
        )
    except FilterError as exc:
        raise Invalid(_api_names(str(exc))) from None


def _api_names(message: str) -> str:
    """``--error-type`` -> ``error_type``: the library's messages name CLI options."""
    return re.sub(r"--([a-z]+(?:-[a-z]+)*)", lambda m: m.group(1).replace("-", "_"), message)


def check_queue_name(name: str) -> None:
    """Raise :class:`Invalid` for a name no queue can have (before asking the broker).

    RabbitMQ accepts any UTF-8 name, but pamqp (under aio-pika) refuses to send names
    outside :data:`SENDABLE_NAME`; such a DLQ, made by another client, gets this clear
    refusal instead of a crash (and a ``problem`` row on the overview). Where a replay
    may go is checked by the library (:func:`qworker.dlq.records.queue_name_problem`).
    """
    if not name:
        raise Invalid("not a queue name: empty")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_QUEUE_BYTES:
        raise Invalid(f"not a queue name: longer than {MAX_QUEUE_BYTES} bytes")
    if not SENDABLE_NAME.fullmatch(name):
        raise Invalid(
            "the AMQP client qworker uses (pamqp) can only address queue names made of "
            "letters, digits, spaces and -_.:@#,/+ (this one was made by another client)"
        )


def check_target(to: str, dlq: str) -> None:
    """Raise :class:`Invalid` when ``to`` cannot be where ``dlq``'s messages are replayed to
    (a reserved ``amq.*`` name, the DLQ itself, control characters, see :func:`check_queue_name`);
    a queue that does not exist is found out by the action itself."""
    problem = queue_name_problem(to, dlq)
    if problem is not None:
        raise Invalid(f"cannot replay to {to[:100]!r}: {problem}")
    check_queue_name(to)


@dataclass(frozen=True, slots=True)
class GroupRow:
    """One failure group of a scan: what :class:`qworker.dlq.Group` says, as the pages show it."""

    fingerprint: str
    count: int
    reason: str
    error_type: str | None
    handler: str | None
    first: datetime | None
    last: datetime | None
    sample_message_id: str | None
    error_code: str | None
    runbook: str | None
    pattern: str
    frame: str

    @classmethod
    def of(cls, group: lib.Group) -> GroupRow:
        key = group.key
        return cls(
            fingerprint=key.fingerprint,
            count=group.count,
            reason=key.reason,
            error_type=None if key.error_type == "-" else key.error_type,
            handler=None if key.handler == "-" else key.handler,
            first=group.first_seen,
            last=group.last_seen,
            sample_message_id=group.sample_message_id,
            error_code=key.error_code,
            runbook=group.runbook,
            pattern=group.pattern,
            frame=group.frame,
        )

    def to_json(self) -> dict[str, Any]:
        """The group as ``GET /api/dlqs/{dlq}/groups`` answers it."""
        return {
            "fingerprint": self.fingerprint,
            "count": self.count,
            "reason": self.reason,
            "error_type": self.error_type,
            "handler": self.handler,
            "first": _iso(self.first),
            "last": _iso(self.last),
            "sample_message_id": self.sample_message_id,
            "error_code": self.error_code,
            "runbook": self.runbook,
            "pattern": self.pattern,
            "frame": self.frame,
        }


@dataclass(frozen=True, slots=True)
class ScanInfo:
    """When a scan was taken and whether the DLQ moved since: ``depth_now`` differs from
    the depth the scan saw (``stale``)."""

    taken_at: datetime
    seconds: float
    depth_now: int
    stale: bool
    monotonic: float = field(repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "taken_at": self.taken_at.isoformat(),
            "seconds": round(self.seconds, 3),
            "depth_now": self.depth_now,
            "stale": self.stale,
        }


@dataclass(frozen=True, slots=True)
class Scan:
    """A DLQ grouped: every failure group (largest first), the reasons, the oldest failure."""

    queue: str
    depth: int
    scanned: int
    groups: list[GroupRow]
    reasons: dict[str, int]
    oldest_failure: datetime | None
    info: ScanInfo


@dataclass(frozen=True, slots=True)
class DlqOverview:
    """One DLQ on the overview. ``problem`` says why the rest is missing, when it is."""

    queue: str
    exists: bool
    messages: int = 0
    oldest_failure: datetime | None = None
    top_groups: list[GroupRow] = field(default_factory=list)
    scan: ScanInfo | None = None
    problem: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The DLQ as ``GET /api/dlqs`` answers it."""
        return {
            "queue": self.queue,
            "messages": self.messages,
            "oldest_failure": _iso(self.oldest_failure),
            "exists": self.exists,
            "top_groups": [g.to_json() for g in self.top_groups],
            "scan": self.scan.to_json() if self.scan else None,
            "problem": self.problem,
        }


@dataclass(frozen=True, slots=True)
class Page:
    """Dead letters ``offset`` to ``offset + len(records)`` of those matching a filter."""

    records: list[lib.DeadLetter]
    offset: int
    limit: int
    has_more: bool

    @property
    def next_offset(self) -> int | None:
        return self.offset + len(self.records) if self.has_more else None


@dataclass(frozen=True, slots=True)
class ConsoleSettings:
    """What a console serves.

    Args:
        urls: Broker URLs (cluster nodes).
        ca_file: CA bundle for ``amqps://`` URLs.
        app: The application, when given: its DLQs are listed and edited bodies are
            validated by the origin handler's payload type.
        management_url: The management API: every ``*.dlq`` it lists in ``vhost`` is
            shown, and the DLQ library asks it for effective delivery limits.
        vhost: The virtual host of ``urls`` (for the management API).
        extra_dlqs: DLQs to show besides those of ``app`` and the management API.
        scan_ttl: See :data:`SCAN_TTL`.
        read_wait: See :data:`READ_WAIT`.
    """

    urls: list[str]
    ca_file: str | None = None
    app: App | None = None
    management_url: str | None = None
    vhost: str = "/"
    extra_dlqs: tuple[str, ...] = ()
    scan_ttl: float = SCAN_TTL
    read_wait: float = READ_WAIT


class Console:
    """The DLQs a console shows and the actions it runs on them; see the module docstring.

    Args:
        settings: What to serve.
        link: The broker connection (default: one made from ``settings.urls``).
    """

    def __init__(self, settings: ConsoleSettings, link: BrokerLink | None = None) -> None:
        self.settings = settings
        self.app = settings.app
        self.link = link or BrokerLink(settings.urls, settings.ca_file)
        self.jobs = Jobs()
        self._scans: dict[str, Scan] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._acting: dict[str, Job] = {}
        #: Passes that answered and are still giving their DLQ back (see _answer_early).
        self._tails: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        """Let running jobs end (at most :data:`STOP_GRACE` seconds), then close."""
        tasks = [job.task for job in self.jobs.running() if job.task is not None]
        tasks += self._tails
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=STOP_GRACE)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        await self.link.close()

    async def settled(self) -> None:
        """Wait until every pass that answered early has given its DLQ back."""
        while self._tails:
            await asyncio.wait(set(self._tails))

    # Reading.

    async def dlq_names(self) -> list[str]:
        """The DLQs to show: the app's, the management API's ``*.dlq`` and ``extra_dlqs``."""
        names = list(self.settings.extra_dlqs)
        if self.app is not None:
            names += [spec.name for spec in self.app.topology() if spec.role == "dlq"]
        if self.settings.management_url:
            try:
                names += await asyncio.to_thread(
                    list_dlqs, self.settings.management_url, self.settings.vhost
                )
            except ManagementError as exc:
                raise Unavailable(redact(str(exc))) from None
        return list(dict.fromkeys(names))

    async def overview(self) -> list[DlqOverview]:
        """Every DLQ: depth, oldest failure and top groups (from a cached or fresh scan)."""
        found = []
        for name in await self.dlq_names():
            found.append(await self._overview_of(name))
        return found

    async def _overview_of(self, name: str) -> DlqOverview:
        try:
            check_queue_name(name)
            depth = await self._depth(name)
        except NotFound:
            return DlqOverview(name, exists=False, problem="the broker has no such queue (yet)")
        except Invalid as exc:
            return DlqOverview(name, exists=False, problem=exc.message)
        if depth == 0 and name not in self._acting:
            return DlqOverview(name, exists=True)
        try:
            scan = await self.scan(name)
        except Unavailable:
            raise
        except ConsoleError as exc:  # busy, refused, vanished: one DLQ must not hide the others
            cached = self._scans.get(name)
            return DlqOverview(
                name,
                exists=True,
                messages=depth,
                oldest_failure=cached.oldest_failure if cached else None,
                top_groups=cached.groups[:TOP_GROUPS] if cached else [],
                scan=self._info(cached, depth) if cached else None,
                problem=exc.message,
            )
        return DlqOverview(
            name,
            exists=True,
            messages=depth,
            oldest_failure=scan.oldest_failure,
            top_groups=scan.groups[:TOP_GROUPS],
            scan=scan.info,
        )

    async def scan(self, dlq: str, *, rescan: bool = False) -> Scan:
        """The DLQ's failure groups: cached (see the module docstring) unless ``rescan``.

        Raises:
            NotFound: no such queue. Busy: an action works on it, or another read took
                too long. Refused: reading could make the broker drop dead letters.
        """
        check_queue_name(dlq)
        depth = await self._depth(dlq)
        cached = self._scans.get(dlq)
        if not rescan and cached is not None and self._reusable(cached, depth):
            return replace(cached, info=self._info(cached, depth))
        asked = time.monotonic()
        async with self._reading(dlq) as connection:
            cached = self._scans.get(dlq)
            if cached is not None and cached.info.monotonic >= asked:
                return cached  # scanned by another request while this one waited
            started = time.monotonic()
            aggregate, report = await lib.stats(connection, dlq)
            seconds = time.monotonic() - started
        scan = Scan(
            queue=dlq,
            depth=report.depth,
            scanned=report.scanned,
            groups=[GroupRow.of(group) for group in aggregate.ranked()],
            reasons=dict(aggregate.reasons.most_common()),
            oldest_failure=aggregate.oldest,
            info=ScanInfo(datetime.now(UTC), seconds, report.depth, False, time.monotonic()),
        )
        self._scans[dlq] = scan
        log.info("console.scanned", queue=dlq, messages=report.scanned, seconds=round(seconds, 3))
        return scan

    def _reusable(self, cached: Scan, depth: int) -> bool:
        if depth == 0 or cached.depth == 0:
            # An empty scan says nothing about messages that came (or a quorum queue that
            # reported 0 for a moment after a restart); nothing to show needs no scan.
            return depth == cached.depth
        young = time.monotonic() - cached.info.monotonic < self.settings.scan_ttl
        return depth == cached.depth or young

    @staticmethod
    def _info(cached: Scan, depth: int) -> ScanInfo:
        return replace(cached.info, depth_now=depth, stale=depth != cached.depth)

    async def messages(
        self, dlq: str, chosen: lib.Filter, *, limit: int = 50, offset: int = 0
    ) -> Page:
        """The matching dead letters ``offset`` to ``offset + limit`` (oldest first).

        A page also ends early at :data:`PAGE_BYTES` of bodies (``has_more`` is then true).

        Raises:
            Invalid: ``limit`` or ``offset`` out of range. See :meth:`scan` for the rest.
        """
        check_queue_name(dlq)
        if not 1 <= limit <= PAGE_LIMIT:
            raise Invalid(f"limit must be 1 to {PAGE_LIMIT}")
        if offset < 0:
            raise Invalid("offset must be 0 or more")

        async def read(connection: AbstractConnection, answer: Callable[[Page], None]) -> Page:
            records: list[lib.DeadLetter] = []
            size = 0
            has_more = False
            async with select(
                connection, dlq, chosen, offset + limit + 1, keep_order=True
            ) as selection:
                index = 0
                async for held in selection:
                    if index >= offset:
                        if len(records) >= limit or (records and size >= PAGE_BYTES):
                            has_more = True
                            break
                        records.append(held.dead_letter)
                        size += len(held.dead_letter.body)
                    index += 1
                page = Page(records, offset, limit, has_more)
                answer(page)
            return page

        return await self._answer_early(dlq, read)

    async def message(self, dlq: str, message_id: str) -> lib.DeadLetter:
        """The first dead letter of ``dlq`` with ``message_id``.

        Raises:
            NotFound: no such queue or message. See :meth:`scan` for the rest.
        """
        check_queue_name(dlq)

        async def read(
            connection: AbstractConnection, answer: Callable[[lib.DeadLetter | None], None]
        ) -> lib.DeadLetter | None:
            wanted = lib.Filter(message_id=message_id)
            async with select(connection, dlq, wanted, 1, keep_order=True) as selection:
                found = None
                async for held in selection:
                    found = held.dead_letter
                answer(found)
            return found

        found = await self._answer_early(dlq, read)
        if found is None:
            raise NotFound(f"no message with this id in {dlq}")
        return found

    async def _answer_early(
        self,
        dlq: str,
        read: Callable[[AbstractConnection, Callable[[T], None]], Awaitable[T]],
    ) -> T:
        """Run a pass over ``dlq`` that can answer before it ends, and return that answer.

        ``read`` calls its ``answer`` as soon as it knows the result (a page, a message),
        while the pass still has to give everything back, which for a quorum DLQ means
        holding the rest of it first (``keep_order``: about a full read). That tail goes
        on in a task of its own, still holding the DLQ (the next read of it waits), so
        the person who asked sees the page at once.
        """
        answered: asyncio.Future[T] = asyncio.get_running_loop().create_future()

        def answer(value: T) -> None:
            if not answered.done():
                answered.set_result(value)

        async def run() -> None:
            try:
                async with self._reading(dlq) as connection:
                    answer(await read(connection, answer))
            except BaseException as exc:
                if not answered.done():
                    answered.set_exception(exc)
                elif not isinstance(exc, asyncio.CancelledError):
                    log.warning("console.give_back_failed", queue=dlq, error=redact(str(exc)))
                if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt | SystemExit):
                    raise

        task = asyncio.create_task(run())
        self._tails.add(task)
        task.add_done_callback(self._tails.discard)
        return await asyncio.shield(answered)

    @contextlib.asynccontextmanager
    async def export(
        self, dlq: str, chosen: lib.Filter, *, limit: int | None = None
    ) -> AsyncIterator[IO[str]]:
        """The matching dead letters as JSONL, in a temporary file (rewound) for the response.

        The export format of ``qworker dlq export``, with secret-looking header values
        masked (:mod:`qworker.console.masking`). The DLQ is read (and given back) before
        the file is handed over, so a slow download does not hold the DLQ.
        """
        check_queue_name(dlq)
        with tempfile.SpooledTemporaryFile(EXPORT_SPOOL, mode="w+", encoding="utf-8") as out:

            def write(dl: lib.DeadLetter) -> None:
                record = masked_record(to_record(dl))
                out.write(json.dumps(record, ensure_ascii=True, separators=(",", ":")) + "\n")

            async with self._reading(dlq) as connection:
                await lib.browse(connection, dlq, write, chosen=chosen, limit=limit)
            out.seek(0)
            yield out

    # Changing.

    async def start_replay(
        self, dlq: str, chosen: lib.Filter, options: lib.ReplayOptions, *, actor: str
    ) -> Job:
        """Start replaying the matching dead letters (a dry run changes nothing).

        Args:
            dlq: The DLQ to replay from.
            chosen: Which dead letters.
            options: Limit, rate, canaries, target, dry run (:class:`qworker.dlq.ReplayOptions`).
            actor: Who asked, for the audit trail.

        Raises:
            Invalid: a name no queue can have. Busy: another action works on ``dlq``.
        """
        check_queue_name(dlq)
        if options.to is not None:
            check_target(options.to, dlq)
        job = self._claim(dlq, "dry-run" if options.dry_run else "replay", actor)

        async def act(connection: AbstractConnection) -> None:
            try:
                result = await lib.replay(
                    connection,
                    dlq,
                    chosen=chosen,
                    options=options,
                    on_event=job.on_event,
                    actor=actor,
                )
            except lib.AuditFailed as exc:
                result = exc.result
                job.warning = f"done, but its audit record is missing: {redact(str(exc))}"
            job.replayed_with(result)

        job.task = asyncio.create_task(self._run(job, act, changes=not options.dry_run))
        return job

    async def start_purge(
        self, dlq: str, chosen: lib.Filter, *, confirm: str, limit: int | None, actor: str
    ) -> Job:
        """Start deleting the matching dead letters; ``confirm`` must be the DLQ's name.

        Raises:
            Invalid: ``confirm`` is not ``dlq``. Busy: another action works on ``dlq``.
        """
        check_queue_name(dlq)
        if confirm != dlq:
            raise Invalid("to purge, confirm with the DLQ's exact name")
        job = self._claim(dlq, "purge", actor)

        async def act(connection: AbstractConnection) -> None:
            try:
                report = await lib.purge(connection, dlq, chosen=chosen, limit=limit, actor=actor)
            except lib.AuditFailed as exc:
                report = exc.result
                job.warning = f"done, but its audit record is missing: {redact(str(exc))}"
            job.purged = report.matched

        job.task = asyncio.create_task(self._run(job, act, changes=True))
        return job

    async def edit(
        self, dlq: str, message_id: str, body: bytes, *, to: str | None, actor: str
    ) -> dict[str, Any]:
        """Replay one dead letter with a new body (validated first when the app is known).

        Returns ``{"target", "message_id", "validated", "warning"}``.

        Raises:
            NotFound: no such message. Unprocessable: the origin handler would refuse the
            body. Busy: the message was replayed or purged meanwhile, or the DLQ is busy.
        """
        check_queue_name(dlq)
        if to is not None:
            check_target(to, dlq)
        validated = False
        warning = None
        async with self._reading(dlq) as connection:
            original = await lib.find(connection, dlq, message_id, keep_order=True)
            if original is None:
                raise NotFound(f"no message with this id in {dlq}")
            if self.app is not None:
                try:
                    lib.validate_body(self.app, original, body)
                    validated = True
                except DecodeError as exc:
                    raise Unprocessable(f"the handler would refuse this body: {exc}") from None
                except ConfigurationError as exc:
                    warning = f"not validated: {exc}"
            try:
                target = await lib.replace(connection, original, body, to=to, actor=actor)
            except lib.AuditFailed as exc:
                target = exc.result
                warning = f"done, but its audit record is missing: {redact(str(exc))}"
            except (BadTarget, QueueNotFound, BrowseRefused, BrokerUnavailable):
                raise
            except QworkerError as exc:
                raise Busy(redact(str(exc))) from None
        self._scans.pop(dlq, None)
        return {
            "target": target,
            "message_id": message_id,
            "validated": validated,
            "warning": warning,
        }

    def job(self, job_id: str) -> Job:
        """A job by id; raises :class:`NotFound`."""
        return self.jobs.get(job_id)

    # Plumbing.

    def _claim(self, dlq: str, kind: JobKind, actor: str) -> Job:
        acting = self._acting.get(dlq)
        if acting is not None:
            raise Busy(f"a {acting.kind} (job {acting.id}) is already working on {dlq}")
        job = self.jobs.new(kind, dlq, actor)
        self._acting[dlq] = job
        return job

    async def _run(self, job: Job, act: Any, *, changes: bool) -> None:
        """Run a job's action holding its DLQ; the job ends ``done`` or ``failed``, always."""
        try:
            async with self._lock(job.dlq):
                job.state = "running"
                connection = await self.link.connection()
                with _translated():
                    await act(connection)
            job.finish()
        except ConsoleError as exc:
            job.finish(exc.message)
        except asyncio.CancelledError:
            job.finish("the console stopped; what was not confirmed stays in the DLQ")
            raise
        except Exception as exc:
            log.exception("console.job_failed", job=job.id, kind=job.kind, queue=job.dlq)
            job.finish(f"{type(exc).__name__}: {exc}")
        finally:
            if self._acting.get(job.dlq) is job:
                del self._acting[job.dlq]
            if changes:
                self._scans.pop(job.dlq, None)
            log.info(
                "console.job_ended",
                job=job.id,
                kind=job.kind,
                queue=job.dlq,
                state=job.state,
                actor=job.actor,
            )

    def _lock(self, dlq: str) -> asyncio.Lock:
        lock = self._locks.get(dlq)
        if lock is None:
            lock = self._locks[dlq] = asyncio.Lock()
        return lock

    @contextlib.asynccontextmanager
    async def _reading(self, dlq: str) -> AsyncIterator[AbstractConnection]:
        """Hold ``dlq`` for one pass (see the module docstring) and give the connection."""
        acting = self._acting.get(dlq)
        if acting is not None:
            raise Busy(
                f"a {acting.kind} (job {acting.id}) is working on {dlq}; reading it now would "
                "not show the messages it holds. Try again when the job has ended."
            )
        lock = self._lock(dlq)
        try:
            async with asyncio.timeout(self.settings.read_wait):
                await lock.acquire()
        except TimeoutError:
            raise Busy(f"{dlq} is being read by another request; try again") from None
        try:
            connection = await self.link.connection()
            with _translated():
                yield connection
        finally:
            lock.release()

    async def _depth(self, dlq: str) -> int:
        connection = await self.link.connection()
        with _translated():
            return await queue_depth(connection, dlq)


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """Library and broker failures as :class:`ConsoleError` (messages redacted)."""
    try:
        yield
    except ConsoleError:
        raise
    except QueueNotFound as exc:
        raise NotFound(redact(str(exc))) from None
    except BrowseRefused as exc:
        raise Refused(redact(str(exc))) from None
    except (BadTarget, FilterError) as exc:
        raise Invalid(_api_names(redact(str(exc)))) from None
    except (BrokerUnavailable, BrokerStalled, ManagementError) as exc:
        raise Unavailable(redact(str(exc))) from None
    except (ConnectionError, aiormq.exceptions.AMQPConnectionError) as exc:
        raise Unavailable(f"lost the connection to the broker: {redact(str(exc))}") from None
    except aiormq.exceptions.ChannelInvalidStateError as exc:
        raise Unavailable(f"lost the connection to the broker: {redact(str(exc))}") from None
    except aiormq.exceptions.AMQPError as exc:
        raise ConsoleError(f"the broker refused: {redact(str(exc))}") from None
    except RuntimeError as exc:
        # aiormq's answer to a channel asked of a connection the broker has closed
        # ("<Connection ...> closed"): the broker went away mid-request.
        if str(exc).endswith(" closed"):
            raise Unavailable("lost the connection to the broker; try again") from None
        raise
    except QworkerError as exc:
        raise ConsoleError(redact(str(exc))) from None


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
