"""Replaying dead letters from a DLQ or an export file, with canaries, and editing one.

Every path acks a dead letter only after its copy is confirmed (see
:mod:`qworker.dlq.send`); what is not selected, skipped, refused or not
confirmed stays in the DLQ, given back when the reading cursor closes. A message
that cannot be published is that message's problem: it is reported and stays,
and the others are replayed.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from functools import partial

import aio_pika
from aio_pika.abc import AbstractConnection

from qworker.dlq import audit
from qworker.dlq.cursor import Cursor, Held, select
from qworker.dlq.filters import Filter
from qworker.dlq.probes import close_channel_quietly, queue_depth
from qworker.dlq.records import DeadLetter, same_message
from qworker.dlq.routing import Router
from qworker.dlq.send import (
    DEFAULT_WINDOW,
    Canary,
    Event,
    EventHandler,
    ReplayOutcome,
    ReplayResult,
    Sender,
    replay_message,
    unpublishable,
)
from qworker.dlq.trail import Acted, filter_of
from qworker.errors import BadRecord, QworkerError
from qworker.publish import ConfirmedPublisher


@dataclass(frozen=True, slots=True)
class ReplayOptions:
    """How to replay.

    ``limit``: at most this many selected messages (None: all). ``rate``:
    messages per second (None: as fast as confirms allow, ``window`` at a
    time). ``canary``: replay this many first and wait until they are handled:
    gone from their target queue for ``canary_wait`` seconds without coming
    back to the DLQ, within ``canary_timeout`` seconds; only then replay the
    rest. ``to``: a queue to replay into instead of each message's origin.
    ``dry_run``: decide every target, change nothing.
    """

    limit: int | None = None
    rate: float | None = None
    canary: int = 0
    canary_timeout: float = 60.0
    canary_wait: float = 5.0
    to: str | None = None
    dry_run: bool = False
    window: int = DEFAULT_WINDOW


async def _offer(
    held: Held, cursor: Cursor, router: Router, sender: Sender, dry_run: bool
) -> tuple[aio_pika.Message, str] | None:
    """Route one selected dead letter and start its replay; the copy and its target, if sent."""
    dl = held.dead_letter
    route = await router.route(dl)
    if route.queue is None:
        sender.report(Event(dl, ReplayOutcome.SKIPPED, None, route.problem))
        return None
    if dry_run:
        sender.report(Event(dl, ReplayOutcome.PLANNED, route.queue))
        return None
    message = await sender.send(dl, route.queue, partial(cursor.ack, held.tag))
    return None if message is None else (message, route.queue)


async def _canaries(
    connection: AbstractConnection,
    queue: str,
    chosen: Filter,
    options: ReplayOptions,
    router: Router,
    sender: Sender,
    result: ReplayResult,
) -> int:
    """Replay the canaries and watch them; returns how many selected messages it used up."""
    async with select(connection, queue, chosen, options.limit) as selection:
        watched: dict[str, int] = {}
        targets: set[str] = set()
        try:
            async for held in selection:
                if sender.stopped:
                    break
                sent = await _offer(held, selection.cursor, router, sender, False)
                if sent is not None:
                    message, target = sent
                    watched[str(message.message_id)] = held.dead_letter.replay_count + 1
                    targets.add(target)
                    if len(watched) >= options.canary:
                        break
        finally:
            # Publishes in flight finish (and ack) before the DLQ channel closes.
            await sender.drain()
        await _flush(selection.cursor, result)
        result.reports.append(selection.report)
        if sender.stopped or not watched:
            return selection.report.matched
        # Hold the rest of the DLQ, so that a canary dying again is the next delivery.
        async for _ in selection.cursor:
            pass
        await _watch(connection, selection.cursor, watched, targets, options, result)
        return selection.report.matched


async def _flush(cursor: Cursor, result: ReplayResult) -> None:
    """Send the acks of the replayed messages; if that fails, say that they are duplicated."""
    try:
        await cursor.flush()
    except Exception as exc:
        result.error = result.error or (
            f"replayed messages could not be removed from the DLQ ({exc!r}); "
            "they are there again as duplicates"
        )


async def _watch(
    connection: AbstractConnection,
    cursor: Cursor,
    watched: dict[str, int],
    targets: set[str],
    options: ReplayOptions,
    result: ReplayResult,
) -> None:
    """Wait for the canaries' fate: dead again, handled, or out of time."""
    now = time.monotonic()
    deadline = now + options.canary_timeout
    drained_at: float | None = None
    next_poll = now
    while now < deadline:
        held = await cursor.next(0.1)
        if held is not None:
            dl = held.dead_letter
            if dl.message_id in watched and dl.replay_count >= watched[dl.message_id]:
                result.canary = Canary.DIED
                result.dead_canaries.append(dl.message_id)
                return
        now = time.monotonic()
        if now >= next_poll:
            next_poll = now + 0.25
            depths = [await queue_depth(connection, target) for target in sorted(targets)]
            drained_at = None if any(depths) else (drained_at or now)
        if drained_at is not None and now - drained_at >= options.canary_wait:
            result.canary = Canary.PASSED
            return
    result.canary = Canary.TIMED_OUT


async def replay(
    connection: AbstractConnection,
    queue: str,
    *,
    chosen: Filter | None = None,
    options: ReplayOptions | None = None,
    on_event: EventHandler | None = None,
    actor: str | None = None,
) -> ReplayResult:
    """Replay the dead letters of ``queue`` that match ``chosen``; see :class:`ReplayOptions`.

    Each copy is published with confirms to its origin queue (or ``options.to``), with
    the failure headers reset and ``x-qworker-replay-id`` set to ``result.replay_id``,
    and the dead letter is acked only after the confirm. Messages not selected, skipped
    or not confirmed stay in the DLQ; a failure of one message is contained to it
    (listed as an event, counted in the result). Then one ``replay`` record goes to
    the audit trail (not for a dry run).

    Args:
        connection: An open connection to the broker.
        queue: The DLQ to replay from.
        chosen: Only dead letters matching this filter (default: all).
        options: Limit, rate, canaries, target, dry run (default: :class:`ReplayOptions`).
        on_event: Called with an :class:`Event` for each selected dead letter.
        actor: Who replays, for the audit trail (default :func:`qworker.dlq.audit.actor`).

    Raises:
        QueueNotFound: the DLQ or the ``to`` queue does not exist.
        BadTarget: ``options.to`` is not acceptable (the DLQ itself, not a queue name).
        AuditFailed: the replay was done (``exc.result``) but its record was not written.
    """
    chosen = chosen or Filter()
    options = options or ReplayOptions()
    router = Router(connection, options.to)
    await router.check_to(queue)
    result = ReplayResult(replay_id=None if options.dry_run else audit.new_id())
    acted = Acted()
    acted.dlq = queue
    watch = _noting(acted, on_event)
    try:
        await _replay(connection, queue, chosen, options, watch, router, result)
    except BaseException as exc:
        if not options.dry_run and result.replayed + result.failed:
            await audit.append_quietly(
                connection, _replay_record(acted, result, chosen, options, actor, exc)
            )
        raise
    if not options.dry_run:
        record = _replay_record(acted, result, chosen, options, actor)
        await audit.record_action(connection, record, result)
    return result


def _noting(acted: Acted, on_event: EventHandler | None) -> EventHandler:
    """An event handler noting each replayed dead letter in ``acted``, then calling ``on_event``."""

    def handle(event: Event) -> None:
        if event.outcome is ReplayOutcome.REPLAYED:
            acted.add(event.dead_letter)
        if on_event is not None:
            on_event(event)

    return handle


def _replay_record(
    acted: Acted,
    result: ReplayResult,
    chosen: Filter,
    options: ReplayOptions,
    actor: str | None,
    exc: BaseException | None = None,
    source: str | None = None,
) -> audit.AuditRecord:
    outcome = result.outcome
    if exc is not None:
        outcome = f"error: {type(exc).__name__}: {exc}"
    used = {
        "rate": options.rate,
        "canary": options.canary or None,
        "canary_wait": options.canary_wait if options.canary else None,
        "canary_timeout": options.canary_timeout if options.canary else None,
        "to": options.to,
    }
    return acted.record(
        "replay",
        actor=actor or audit.actor(),
        filter=filter_of(chosen, options.limit),
        counts={"replayed": result.replayed, "skipped": result.skipped, "failed": result.failed},
        replay_id=result.replay_id,
        outcome=outcome,
        options={k: v for k, v in used.items() if v is not None},
        source=source,
    )


def _sender(
    options: ReplayOptions,
    result: ReplayResult,
    on_event: EventHandler,
    publisher: ConfirmedPublisher,
    reopen: Callable[[], Awaitable[ConfirmedPublisher]],
) -> Sender:
    """The sender of one replay: its window, rate and replay id, channel reopening, and
    whether this process traces (decided here, once per replay)."""
    from qworker.tracing import resolve

    return Sender(
        publisher,
        result,
        on_event,
        window=options.window,
        rate=options.rate,
        reopen=reopen,
        replay_id=result.replay_id,
        tracing=resolve(),
    )


async def _replay(
    connection: AbstractConnection,
    queue: str,
    chosen: Filter,
    options: ReplayOptions,
    on_event: EventHandler,
    router: Router,
    result: ReplayResult,
) -> None:
    async with _publishers(connection) as (publisher, reopen):
        sender = _sender(options, result, on_event, publisher, reopen)
        limit = options.limit
        if options.canary > 0 and not options.dry_run:
            used = await _canaries(connection, queue, chosen, options, router, sender, result)
            if sender.stopped or result.canary is not Canary.PASSED:
                return
            if limit is not None:
                limit -= used
                if limit <= 0:
                    return
        async with select(connection, queue, chosen, limit) as selection:
            try:
                async for held in selection:
                    if sender.stopped:
                        break
                    await _offer(held, selection.cursor, router, sender, options.dry_run)
            finally:
                await sender.drain()
            await _flush(selection.cursor, result)
            result.reports.append(selection.report)


@contextlib.asynccontextmanager
async def _publishers(
    connection: AbstractConnection,
) -> AsyncIterator[tuple[ConfirmedPublisher, Callable[[], Awaitable[ConfirmedPublisher]]]]:
    """A confirmed publisher and a function opening a fresh one; every channel closes at exit."""
    channels = [await connection.channel(publisher_confirms=True)]

    async def reopen() -> ConfirmedPublisher:
        channels.append(await connection.channel(publisher_confirms=True))
        return ConfirmedPublisher(channels[-1])

    try:
        yield ConfirmedPublisher(channels[0]), reopen
    finally:
        for channel in channels:
            await close_channel_quietly(channel)


def check_records(records: Callable[[], Iterable[DeadLetter]]) -> None:
    """Read every record once, checking that its copy can be published.

    Raises :class:`BadRecord` for the first unreadable record or the first one
    whose copy cannot be encoded (e.g. a header value out of range).
    """
    for number, dl in enumerate(records(), 1):
        problem = unpublishable(dl)
        if problem is not None:
            raise BadRecord(
                f"{dl.queue}: record {number} (message id {dl.message_id!r}): {problem}"
            )


async def replay_records(
    connection: AbstractConnection,
    records: Callable[[], Iterable[DeadLetter]],
    *,
    chosen: Filter | None = None,
    options: ReplayOptions | None = None,
    on_event: EventHandler | None = None,
    actor: str | None = None,
    source: str | None = None,
) -> ReplayResult:
    """Publish exported dead letters (``records()`` yields them, each call from the start).

    Every record is read and checked (see :func:`check_records`) before anything
    is published, so a bad or unencodable record stops the replay with nothing
    sent (:class:`BadRecord`). Canaries are not supported here. Then one ``replay``
    record goes to the audit trail (not for a dry run); its DLQ is the one the
    first replayed record came from.

    Args:
        connection: An open connection to the broker.
        records: Yields the records (e.g. of an export file) anew on each call.
        chosen: Only records matching this filter (default: all).
        options: Limit, rate, target, dry run (default: :class:`ReplayOptions`).
        on_event: Called with an :class:`Event` for each selected record.
        actor: Who replays, for the audit trail (default :func:`qworker.dlq.audit.actor`).
        source: Where the records come from (e.g. the file's name), for the audit trail.

    Raises:
        AuditFailed: the replay was done (``exc.result``) but its record was not written.
    """
    chosen = chosen or Filter()
    options = options or ReplayOptions()
    router = Router(connection, options.to)
    await router.check_to(None)
    check_records(records)
    result = ReplayResult(replay_id=None if options.dry_run else audit.new_id())
    acted = Acted()
    watch = _noting(acted, on_event)
    try:
        await _replay_records(connection, records, chosen, options, watch, router, result)
    except BaseException as exc:
        if not options.dry_run and result.replayed + result.failed:
            record = _replay_record(acted, result, chosen, options, actor, exc, source)
            await audit.append_quietly(connection, record)
        raise
    if not options.dry_run:
        record = _replay_record(acted, result, chosen, options, actor, source=source)
        await audit.record_action(connection, record, result)
    return result


async def _replay_records(
    connection: AbstractConnection,
    records: Callable[[], Iterable[DeadLetter]],
    chosen: Filter,
    options: ReplayOptions,
    on_event: EventHandler,
    router: Router,
    result: ReplayResult,
) -> None:
    async with _publishers(connection) as (publisher, reopen):
        sender = _sender(options, result, on_event, publisher, reopen)
        selected = 0
        for dl in records():
            if sender.stopped or (options.limit is not None and selected >= options.limit):
                break
            if not chosen.matches(dl):
                continue
            selected += 1
            route = await router.route(dl)
            if route.queue is None:
                sender.report(Event(dl, ReplayOutcome.SKIPPED, None, route.problem))
            elif options.dry_run:
                sender.report(Event(dl, ReplayOutcome.PLANNED, route.queue))
            else:
                await sender.send(dl, route.queue, _nothing)
        await sender.drain()


async def _nothing() -> None:
    """A file record has no dead letter to ack."""


async def replace(
    connection: AbstractConnection,
    original: DeadLetter,
    body: bytes,
    *,
    to: str | None = None,
    actor: str | None = None,
) -> str:
    """Replay ``original`` with a new ``body``, then remove it from its DLQ; returns the target.

    The DLQ is read again to find that very message (same id, body and failure
    time): if someone else replayed or purged it meanwhile, nothing is
    published and :class:`qworker.errors.QworkerError` is raised. The copy carries a
    new replay id; then one ``edit`` record goes to the audit trail.

    Raises:
        AuditFailed: the edited message was replayed (``exc.result``: the target) but
            its record was not written.
    """
    router = Router(connection, to)
    await router.check_to(None)
    route = await router.route(original)
    if route.queue is None:
        raise QworkerError(f"cannot replay {original.message_id!r}: {route.problem}")
    replay_id = audit.new_id()
    acted = Acted()
    from qworker.tracing import resolve

    tracing = resolve()
    channel = await connection.channel(publisher_confirms=True)
    try:
        publisher = ConfirmedPublisher(channel)
        # keep_order: stopping at the message would move the rest of a quorum DLQ
        # behind (see Cursor._hold_rest); an edit is one message, a full pass is fine.
        async with select(
            connection, original.queue, Filter(message_id=original.message_id), keep_order=True
        ) as sel:
            async for held in sel:
                if same_message(held.dead_letter, original):
                    dead = held.dead_letter
                    copy = replay_message(dead, body, replay_id=replay_id)
                    if tracing is None:
                        await publisher.publish(copy, route.queue)
                    else:  # an edit is a replay of one: the same span, linked to the dead one
                        with tracing.replaying(
                            dead.headers,
                            copy.headers,
                            dead.queue,
                            route.queue,
                            copy.message_id,
                            replay_id,
                        ):
                            await publisher.publish(copy, route.queue)
                    await sel.cursor.ack(held.tag)
                    await sel.cursor.flush()
                    acted.add(held.dead_letter)
                    break
    finally:
        await close_channel_quietly(channel)
    if not acted.count:
        raise QworkerError(
            f"message {original.message_id!r} is no longer in {original.queue!r}; "
            "nothing was published"
        )
    record = acted.record(
        "edit",
        actor=actor or audit.actor(),
        filter={"message_id": original.message_id},
        counts={"replayed": 1},
        replay_id=replay_id,
        options={"to": to} if to else {},
    )
    await audit.record_action(connection, record, route.queue)
    return route.queue
