"""The DLQ tool as a library: inspect, group, export, replay, edit and purge dead letters.

Every function takes an open aio-pika connection and a DLQ name; the
``qworker dlq`` commands are a thin layer over them. Reading never removes a
message: a pass holds what it reads unacked and gives it back
(``basic.nack(multiple, requeue)`` frames, oldest first) before closing its channel, so inspection
leaves a DLQ exactly as it was (and refuses to read a quorum DLQ whose
effective delivery limit it could reach: :class:`BrowseRefused`, see
:class:`DeliveryGuard`), and a message leaves only
after it was confirmed elsewhere (replay), written and fsynced (export
``remove=True``), or explicitly purged. Every function that changes a DLQ
(``replay``, ``replay_records``, ``replace``, ``purge``, ``export`` with
``remove``) then appends one record to the audit trail (:mod:`qworker.dlq.audit`;
dry runs append nothing); when that append fails, the action's result stands and
:class:`AuditFailed` is raised carrying it (``exc.result``)::

    async with await aio_pika.connect(url) as connection:
        stats, report = await dlq.stats(connection, "orders.dlq")
        result = await dlq.replay(
            connection, "orders.dlq", chosen=dlq.Filter(error_type="KeyError"),
            options=dlq.ReplayOptions(canary=5),
        )
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, TextIO

from aio_pika.abc import AbstractConnection

from qworker.dlq.cursor import ScanReport, select
from qworker.dlq.filters import Filter
from qworker.dlq.probes import DeliveryGuard, Safety, use_management
from qworker.dlq.records import DeadLetter, origin
from qworker.errors import (
    BadRecord,
    BadTarget,
    BrowseRefused,
    ConfigurationError,
    FilterError,
    ManagementError,
    QueueNotFound,
)

if TYPE_CHECKING:
    from qworker.app import App
    from qworker.dlq.audit import AuditFailed, AuditRecord
    from qworker.dlq.jsonl import dumps, read_records
    from qworker.dlq.replay import (
        ReplayOptions,
        check_records,
        replace,
        replay,
        replay_records,
    )
    from qworker.dlq.send import Canary, Event, ReplayOutcome, ReplayResult
    from qworker.dlq.stats import OTHER_KEY, Group, Stats
    from qworker.dlq.trail import Acted

__all__ = [
    "OTHER_KEY",
    "AuditFailed",
    "AuditRecord",
    "BadRecord",
    "BadTarget",
    "BrowseRefused",
    "Canary",
    "DeadLetter",
    "DeliveryGuard",
    "DlqSummary",
    "Event",
    "Filter",
    "FilterError",
    "Group",
    "ManagementError",
    "QueueNotFound",
    "ReplayOptions",
    "ReplayOutcome",
    "ReplayResult",
    "Safety",
    "ScanReport",
    "Stats",
    "browse",
    "check_records",
    "dumps",
    "export",
    "find",
    "purge",
    "read_records",
    "replace",
    "replay",
    "replay_records",
    "stats",
    "summarize",
    "use_management",
    "validate_body",
]

#: Where each name of ``__all__`` that is imported on first use lives (PEP 562): reading
#: needs the cursor, the filters and the records, not export, replay, stats or the audit trail.
_LAZY = {
    "OTHER_KEY": "qworker.dlq.stats",
    "AuditFailed": "qworker.dlq.audit",
    "AuditRecord": "qworker.dlq.audit",
    "Canary": "qworker.dlq.send",
    "Event": "qworker.dlq.send",
    "Group": "qworker.dlq.stats",
    "ReplayOptions": "qworker.dlq.replay",
    "ReplayOutcome": "qworker.dlq.send",
    "ReplayResult": "qworker.dlq.send",
    "Stats": "qworker.dlq.stats",
    "check_records": "qworker.dlq.replay",
    "dumps": "qworker.dlq.jsonl",
    "read_records": "qworker.dlq.jsonl",
    "replace": "qworker.dlq.replay",
    "replay": "qworker.dlq.replay",
    "replay_records": "qworker.dlq.replay",
}
#: Functions of this package named like one of its submodules.
_SHADOWED = frozenset({"replay", "stats"})


class _Package(types.ModuleType):
    """This package; a submodule named like one of its functions does not replace it.

    The import system sets every submodule it loads as an attribute of its package. When
    ``qworker.dlq.replay`` and ``qworker.dlq.stats`` were imported with the package, the
    functions defined or imported after them won; imported later (on first use, or
    directly by other code), they would replace :func:`replay` and :func:`stats` here.
    """

    def __setattr__(self, name: str, value: object) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

if not TYPE_CHECKING:  # mypy sees the imports above; a typo stays an error for it

    def __getattr__(name: str) -> Any:
        """Import a name of ``__all__`` (or the ``audit`` module) on first use and keep it."""
        if name == "audit":
            return importlib.import_module("qworker.dlq.audit")
        if name not in _LAZY:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*globals(), *__all__})


#: Records written between two fsyncs (and acks) of ``export(remove=True)``.
EXPORT_BATCH = 1000


async def browse(
    connection: AbstractConnection,
    queue: str,
    visit: Callable[[DeadLetter], None],
    *,
    chosen: Filter | None = None,
    limit: int | None = None,
    keep_order: bool = False,
) -> ScanReport:
    """Call ``visit`` for each dead letter of ``queue`` matching ``chosen`` (at most ``limit``).

    The DLQ is unchanged afterwards: every message is held while read and given back
    (a pass that stops early moves what it read behind the rest of a quorum DLQ whose
    messages were all given back before, unless ``keep_order``: see
    :meth:`qworker.dlq.cursor.Cursor._hold_rest`).

    Args:
        connection: An open connection to the broker (the library opens its own channels).
        queue: The DLQ to read.
        visit: Called with each matching :class:`DeadLetter`, oldest first.
        chosen: Only dead letters matching this filter (default: all).
        limit: At most this many matching dead letters (None: all).
        keep_order: When stopping early, still hold the rest of the queue (a delivery
            per message) so that a quorum DLQ keeps its order.

    Raises:
        QueueNotFound: ``queue`` does not exist.
        BrowseRefused: reading could make the broker drop dead letters (delivery limit).
    """
    async with select(
        connection, queue, chosen or Filter(), limit, keep_order=keep_order
    ) as selection:
        async for held in selection:
            visit(held.dead_letter)
        return selection.report


async def stats(
    connection: AbstractConnection,
    queue: str,
    *,
    chosen: Filter | None = None,
    limit: int | None = None,
) -> tuple[Stats, ScanReport]:
    """Group the matching dead letters (see :mod:`qworker.dlq.stats`), keeping no bodies.

    Memory is bounded by the number of groups (capped; the rest are counted as one
    ``other`` group), not by the number of dead letters.

    Args:
        connection: An open connection to the broker (the library opens its own channels).
        queue: The DLQ to read.
        chosen: Only dead letters matching this filter (default: all).
        limit: At most this many matching dead letters (None: all).
    """
    from qworker.dlq.stats import Stats

    aggregate = Stats()
    report = await browse(connection, queue, aggregate.add, chosen=chosen, limit=limit)
    return aggregate, report


async def export(
    connection: AbstractConnection,
    queue: str,
    out: TextIO,
    *,
    chosen: Filter | None = None,
    limit: int | None = None,
    remove: bool = False,
    actor: str | None = None,
) -> ScanReport:
    """Write the matching dead letters to ``out``, one JSON record per line.

    With ``remove``, ``out`` must be a real file: its directory is fsynced
    first, then every :data:`EXPORT_BATCH` records (and at the end) the file is
    flushed and fsynced, and only then are those messages acked, so a crash
    leaves each message in the file, the DLQ or both.

    Args:
        connection: An open connection to the broker (the library opens its own channels).
        queue: The DLQ to read.
        out: A text file open for writing (JSONL, see :mod:`qworker.dlq.jsonl`).
        chosen: Only dead letters matching this filter (default: all).
        limit: At most this many matching dead letters (None: all).
        remove: Also remove the written dead letters from the DLQ (after fsync); then
            one ``export-remove`` record goes to the audit trail.
        actor: Who removes, for the audit trail (default :func:`qworker.dlq.audit.actor`).

    Raises:
        AuditFailed: the messages were exported and removed (``exc.result``: the
            report) but the record was not written.
    """
    from qworker.dlq import audit
    from qworker.dlq.jsonl import dumps
    from qworker.dlq.trail import Acted

    if remove:
        _sync_directory(out)
    acted = Acted()
    removed: list[DeadLetter] = []
    try:
        async with select(connection, queue, chosen or Filter(), limit) as selection:
            written: list[int] = []
            async for held in selection:
                out.write(dumps(held.dead_letter) + "\n")
                if remove:
                    written.append(held.tag)
                    removed.append(held.dead_letter)
                    if len(written) >= EXPORT_BATCH:
                        await _remove_written(out, written, selection.cursor.ack)
                        _note(acted, removed)
            out.flush()
            if remove:
                await _remove_written(out, written, selection.cursor.ack)
                await selection.cursor.flush()
                _note(acted, removed)
            report = selection.report
    except BaseException as exc:
        if remove and acted.count:
            await audit.append_quietly(
                connection, _export_record(acted, queue, out, chosen, limit, actor, exc)
            )
        raise
    if remove:
        record = _export_record(acted, queue, out, chosen, limit, actor)
        await audit.record_action(connection, record, report)
    return report


def _note(acted: Acted, done: list[DeadLetter]) -> None:
    for dl in done:
        acted.add(dl)
    done.clear()


def _export_record(
    acted: Acted,
    queue: str,
    out: TextIO,
    chosen: Filter | None,
    limit: int | None,
    actor: str | None,
    exc: BaseException | None = None,
) -> AuditRecord:
    from qworker.dlq import audit
    from qworker.dlq.trail import filter_of

    return acted.record(
        "export-remove",
        dlq=queue,
        actor=actor or audit.actor(),
        filter=filter_of(chosen, limit),
        counts={"removed": acted.count},
        outcome="ok" if exc is None else f"error: {type(exc).__name__}: {exc}",
        options={"output": str(getattr(out, "name", ""))},
    )


async def _remove_written(
    out: TextIO, tags: list[int], ack: Callable[[int], Awaitable[None]]
) -> None:
    out.flush()
    os.fsync(out.fileno())
    for tag in tags:
        await ack(tag)
    tags.clear()


def _sync_directory(out: TextIO) -> None:
    """fsync the directory of a new file, so that the file itself survives a power loss."""
    directory = os.path.dirname(os.path.abspath(out.name))
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


async def purge(
    connection: AbstractConnection,
    queue: str,
    *,
    chosen: Filter | None = None,
    limit: int | None = None,
    actor: str | None = None,
) -> ScanReport:
    """Delete the matching dead letters (``report.matched`` of them); the others stay.

    Then one ``purge`` record goes to the audit trail.

    Args:
        connection: An open connection to the broker (the library opens its own channels).
        queue: The DLQ to read.
        chosen: Only dead letters matching this filter (default: all).
        limit: At most this many matching dead letters (None: all).
        actor: Who purges, for the audit trail (default :func:`qworker.dlq.audit.actor`).

    Raises:
        AuditFailed: the messages were purged (``exc.result``: the report) but the
            record was not written.
    """
    from qworker.dlq import audit
    from qworker.dlq.trail import Acted, filter_of

    acted = Acted()

    def purge_record(outcome: str) -> AuditRecord:
        return acted.record(
            "purge",
            dlq=queue,
            actor=actor or audit.actor(),
            filter=filter_of(chosen, limit),
            counts={"purged": acted.count},
            outcome=outcome,
        )

    try:
        async with select(connection, queue, chosen or Filter(), limit) as selection:
            async for held in selection:
                await selection.cursor.ack(held.tag)
                acted.add(held.dead_letter)
            await selection.cursor.flush()
            report = selection.report
    except BaseException as exc:
        if acted.count:
            await audit.append_quietly(
                connection, purge_record(f"error: {type(exc).__name__}: {exc}")
            )
        raise
    await audit.record_action(connection, purge_record("ok"), report)
    return report


async def find(
    connection: AbstractConnection, queue: str, message_id: str, *, keep_order: bool = False
) -> DeadLetter | None:
    """The first dead letter of ``queue`` with ``message_id`` (the DLQ is unchanged; see
    :func:`browse` for ``keep_order``)."""
    found: list[DeadLetter] = []
    await browse(
        connection,
        queue,
        found.append,
        chosen=Filter(message_id=message_id),
        limit=1,
        keep_order=keep_order,
    )
    return found[0] if found else None


def validate_body(app: App, dl: DeadLetter, body: bytes) -> None:
    """Decode ``body`` as the origin handler of ``dl`` would.

    Raises :class:`qworker.errors.DecodeError` when the handler would refuse it,
    and :class:`qworker.errors.ConfigurationError` when ``app`` has no handler
    for the message's origin queue.
    """
    route = origin(dl)
    handler = app.handlers.get(route.queue or "")
    if handler is None:
        raise ConfigurationError(
            f"{app.name} has no handler for {route.queue or dl.queue!r}: cannot validate the body"
        )
    handler.decode(body, dl.properties.get("content_type"), dl.properties.get("content_encoding"))


@dataclass(slots=True)
class DlqSummary:
    """One DLQ at a glance: depth, the oldest failure and the commonest error types.

    ``oldest_failure`` and ``top_errors`` come from the first ``sampled``
    messages (the oldest, as queues are FIFO). ``exists`` is False for a DLQ
    the app names but the broker does not have yet.
    """

    queue: str
    exists: bool
    messages: int = 0
    sampled: int = 0
    oldest_failure: datetime | None = None
    top_errors: list[tuple[str, int]] = field(default_factory=list)
    safety: Safety = Safety.UNVERIFIED
    delivery_counted: bool = False


async def summarize(
    connection: AbstractConnection, queues: list[str], *, sample: int | None = 1000, top: int = 3
) -> list[DlqSummary]:
    """A :class:`DlqSummary` per queue, reading at most ``sample`` messages of each (None: all)."""
    summaries = []
    for queue in queues:
        try:
            aggregate, report = await stats(connection, queue, limit=sample)
        except QueueNotFound:
            summaries.append(DlqSummary(queue, exists=False))
            continue
        summaries.append(
            DlqSummary(
                queue,
                exists=True,
                messages=report.depth,
                sampled=report.scanned,
                oldest_failure=aggregate.oldest,
                top_errors=aggregate.error_types.most_common(top),
                safety=report.safety,
                delivery_counted=report.delivery_counted,
            )
        )
    return summaries
