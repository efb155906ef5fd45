"""``qworker dlq``: inspect, group, export, replay, edit and purge dead letters.

A thin layer over :mod:`qworker.dlq`. Exit codes: 0 success; 1 runtime failure
(broker unreachable, queue missing, unreadable or unpublishable file record, a
confirm that never came, reading refused because it could drop dead letters);
2 bad usage (a bad filter, an unacceptable ``--to``); 3 the app cannot be
loaded; 4 the canaries of a replay died again or were not handled in time (the
rest was left untouched); 5 a replay finished but some selected messages were
skipped or refused (each listed with its reason; they stay in the DLQ); 6 the
action was done (replay, edit, purge, export --remove) but its record could not be
appended to the audit trail (``qworker.audit``): the action's result stands, one
warning line says so. When the action itself ended with 1, 4 or 5, that code wins
and the warning is still printed. Every failure is one line on stderr; everything
printed has control characters escaped.
"""

from __future__ import annotations

import json
import logging
import sys
import urllib.parse
from collections.abc import Awaitable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import click
from aio_pika.abc import AbstractConnection

from qworker import dlq as lib
from qworker.cli._common import EXIT_APP, EXIT_USAGE, fail, load_app, url_option
from qworker.cli._dlq_options import (
    broker,
    export_file,
    filter_options,
    limit_option,
    management_option,
    with_broker,
)
from qworker.cli._terminal import (
    ReplayReporter,
    StreamingTable,
    print_dead_letters,
    print_replay_summary,
    print_stats,
    print_summaries,
    term,
    warn,
    warn_delivery_count,
    when,
)
from qworker.dlq.filters import parse_when
from qworker.dlq.management import list_dlqs
from qworker.dlq.probes import queue_depth
from qworker.errors import ConfigurationError, DecodeError, FilterError, ManagementError
from qworker.redact import redact

if TYPE_CHECKING:
    from qworker.dlq import mttr as times
    from qworker.dlq.audit import AuditRecord

EXIT_CANARY = 4
EXIT_PARTIAL = 5
EXIT_AUDIT = 6

T = TypeVar("T")


async def audited(action: Awaitable[T]) -> tuple[T, str | None]:
    """Run a library action; if its audit record was not written, its result and why."""
    try:
        return await action, None
    except lib.AuditFailed as exc:
        return exc.result, str(exc)


def audit_warning(problem: str | None) -> None:
    """Say that the audit record is missing (one line); the exit code is the caller's."""
    if problem is not None:
        warn(redact(problem))


def exit_audit(problem: str | None) -> None:
    """Exit with :data:`EXIT_AUDIT` when the audit record is missing (warning printed)."""
    if problem is not None:
        sys.exit(EXIT_AUDIT)


@click.group()
def dlq() -> None:
    """Inspect, group, export, replay, edit and purge dead letters.

    The broker URL comes from --url or QWORKER_URL (default
    amqp://guest:guest@localhost:5672/). Reading never removes a message.
    Exit codes: 0 ok, 1 runtime failure (also: reading refused because the
    DLQ's effective delivery limit is within reach), 2 bad usage or filter,
    3 app cannot be loaded, 4 replay canaries died again or were not handled in
    time, 5 replay done but some selected messages were skipped or refused
    (listed; they stay in the DLQ), 6 action done but its audit record could not
    be written (warning printed; 1, 4 and 5 take precedence).
    """
    # The tool reports every failure itself, in one line; the client libraries'
    # own log records would add a second, unescaped one.
    for name in ("aio_pika", "aiormq"):
        logging.getLogger(name).addHandler(logging.NullHandler())


@dlq.command("ls")
@click.argument("app_spec", metavar="[APP]", required=False)
@click.option("--queue", "queues", multiple=True, help="A DLQ to list (repeatable), without APP.")
@click.option(
    "--sample",
    type=click.IntRange(min=0),
    default=1000,
    show_default=True,
    help="Messages read per DLQ for oldest failure and top errors; 0 reads all.",
)
@click.option(
    "--management-url",
    envvar="QWORKER_MANAGEMENT_URL",
    help="List every *.dlq the management API knows (http://user:pass@host:15672).",
)
@url_option
def ls(
    app_spec: str | None,
    queues: Sequence[str],
    sample: int,
    management_url: str | None,
    url: str | None,
) -> None:
    """Every DLQ of APP, of the management API or the --queue ones: messages, oldest failure,
    top error types."""
    if app_spec is None and not queues and not management_url:
        fail("name an APP (module:attribute), --management-url or DLQs with --queue", EXIT_USAGE)
    app = load_app(app_spec, url) if app_spec is not None else None
    names = list(queues)
    if app is not None:
        names += [spec.name for spec in app.topology() if spec.role == "dlq"]
    if management_url:
        amqp_url = broker(url, app)[0][0]
        vhost = urllib.parse.unquote(urllib.parse.urlsplit(amqp_url).path[1:]) or "/"
        try:
            names += list_dlqs(management_url, vhost)
        except ManagementError as exc:
            fail(str(exc))
    names = list(dict.fromkeys(names))
    with lib.use_management(management_url):
        summaries = with_broker(
            broker(url, app), lambda c: lib.summarize(c, names, sample=sample or None)
        )
    print_summaries(summaries)


@dlq.command()
@click.argument("queue")
@limit_option(20)
@filter_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per message, for scripts.")
@management_option
@url_option
def show(queue: str, limit: int | None, chosen: lib.Filter, as_json: bool, url: str | None) -> None:
    """List dead letters of QUEUE without removing any: a table, or JSON lines with --json.

    With --limit 0 (all) the table is printed as it is read, with fixed column widths.
    """
    found: list[lib.DeadLetter] = []
    stream = StreamingTable() if limit is None and not as_json else None

    def visit(dl: lib.DeadLetter) -> None:
        if as_json:
            click.echo(lib.dumps(dl))  # streamed: memory stays flat however many
        elif stream is not None:
            stream(dl)
        else:
            found.append(dl)

    report = with_broker(
        broker(url), lambda c: lib.browse(c, queue, visit, chosen=chosen, limit=limit)
    )
    if stream is not None:
        stream.footer(report)
    elif not as_json:
        print_dead_letters(found, report, limit)
    warn_delivery_count(report)


@dlq.command()
@click.argument("queue")
@limit_option(None)
@filter_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per group.")
@management_option
@url_option
def stats(
    queue: str, limit: int | None, chosen: lib.Filter, as_json: bool, url: str | None
) -> None:
    """Group dead letters by reason, error type, handler and message fingerprint."""
    aggregate, report = with_broker(
        broker(url), lambda c: lib.stats(c, queue, chosen=chosen, limit=limit)
    )
    print_stats(aggregate, report, as_json)
    warn_delivery_count(report)


@dlq.command()
@click.argument("queue")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="File (default: stdout). An existing file is never overwritten.",
)
@limit_option(None)
@filter_options
@click.option(
    "--remove", is_flag=True, help="Remove exported messages, once the file is on disk (fsync)."
)
@management_option
@url_option
def export(
    queue: str,
    output: Path | None,
    limit: int | None,
    chosen: lib.Filter,
    remove: bool,
    url: str | None,
) -> None:
    """Write dead letters of QUEUE as JSON lines (body as text or base64, properties, headers)."""
    if output is None:
        if remove:
            fail(
                "--remove needs -o FILE: records must be on disk before leaving the DLQ", EXIT_USAGE
            )
        report = with_broker(
            broker(url), lambda c: lib.export(c, queue, sys.stdout, chosen=chosen, limit=limit)
        )
        problem = None
    else:
        try:
            # Exclusive create: an earlier export may be the only copy of its messages.
            stream = output.open("x", encoding="utf-8")
        except OSError as exc:
            fail(f"cannot create {output}: {exc.strerror or exc}")
        with stream:
            report, problem = with_broker(
                broker(url),
                lambda c: audited(
                    lib.export(c, queue, stream, chosen=chosen, limit=limit, remove=remove)
                ),
            )
    where = f" to {output}" if output else ""
    removed = " and removed them from the DLQ" if remove else ""
    click.echo(
        term(f"exported {report.matched} dead letters from {queue}{where}{removed}"), err=True
    )
    warn_delivery_count(report)
    audit_warning(problem)
    exit_audit(problem)


@dlq.command()
@click.argument("queue", required=False)
@filter_options
@limit_option(None)
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), help="Messages per second.")
@click.option("--canary", type=click.IntRange(min=0), default=0, help="Replay N first, watch them.")
@click.option(
    "--canary-timeout",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help="Seconds the canaries get to be handled.",
)
@click.option(
    "--canary-wait",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    help="Seconds their queue must stay drained with none dead again (> the retry delays).",
)
@click.option("--to", help="Replay into this queue instead of each message's origin queue.")
@click.option("--dry-run", is_flag=True, help="Say what would be replayed; change nothing.")
@click.option(
    "--from-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Replay the records of an export file instead of a DLQ.",
)
@management_option
@url_option
def replay(
    queue: str | None,
    chosen: lib.Filter,
    limit: int | None,
    rate: float | None,
    canary: int,
    canary_timeout: float,
    canary_wait: float,
    to: str | None,
    dry_run: bool,
    from_file: Path | None,
    url: str | None,
) -> None:
    """Publish dead letters of QUEUE back to their origin queue (or --to), then remove them.

    Each message is removed from the DLQ only after the broker confirmed its
    copy; the others stay. The origin of QUEUE named Q.dlq is Q. A message that
    cannot be published (no acceptable target, a header that cannot be encoded,
    refused by the broker) is listed with its reason and stays in the DLQ; the
    others are replayed, and the exit code is 5. --from-file checks every record
    (readable and encodable) before publishing anything.
    """
    if (queue is None) == (from_file is None):
        fail("give either QUEUE or --from-file FILE", EXIT_USAGE)
    records = export_file(from_file) if from_file is not None else None
    if records is not None:
        if canary:
            fail("--canary needs a DLQ, not --from-file", EXIT_USAGE)
        try:  # a bad file is reported before connecting, whatever the broker's state
            for _ in records():
                pass
        except lib.BadRecord as exc:
            fail(str(exc))
    options = lib.ReplayOptions(
        limit=limit,
        rate=rate,
        canary=canary,
        canary_timeout=canary_timeout,
        canary_wait=canary_wait,
        to=to,
        dry_run=dry_run,
    )

    async def work(connection: AbstractConnection) -> tuple[lib.ReplayResult, str | None]:
        total = None
        if queue is not None:
            depth = await queue_depth(connection, queue)
            total = min(depth, limit or depth)
        reporter = ReplayReporter(total, dry_run)
        try:
            if records is not None:
                return await audited(
                    lib.replay_records(
                        connection,
                        records,
                        chosen=chosen,
                        options=options,
                        on_event=reporter,
                        source=str(from_file),
                    )
                )
            assert queue is not None
            return await audited(
                lib.replay(connection, queue, chosen=chosen, options=options, on_event=reporter)
            )
        finally:
            reporter.close()

    result, problem = with_broker(broker(url), work)
    print_replay_summary(result, queue or from_file, dry_run)
    audit_warning(problem)
    if result.error is not None:
        fail(f"replay stopped: {result.error}")
    if result.canary is lib.Canary.DIED:
        ids = ", ".join(result.dead_canaries)
        fail(f"canary failed: {ids} dead-lettered again; the rest is untouched", EXIT_CANARY)
    if result.canary is lib.Canary.TIMED_OUT:
        fail(
            f"canary not confirmed: not handled within {canary_timeout:g}s; the rest is untouched",
            EXIT_CANARY,
        )
    if not dry_run and result.skipped + result.failed:
        fail(
            f"{result.skipped + result.failed} selected messages were not replayed; "
            "they stay in the DLQ",
            EXIT_PARTIAL,
        )
    exit_audit(problem)


@dlq.command()
@click.argument("queue")
@click.argument("message_id")
@click.option("--app", "app_spec", help="APP (module:attribute) whose handler validates the body.")
@click.option("--to", help="Replay into this queue instead of the message's origin queue.")
@management_option
@url_option
def edit(
    queue: str, message_id: str, app_spec: str | None, to: str | None, url: str | None
) -> None:
    """Edit a dead letter's body in $EDITOR, validate it (with --app), then replay it.

    An unchanged body changes nothing; an invalid one is refused (exit 1).
    """
    app = load_app(app_spec, url) if app_spec else None
    dl = with_broker(broker(url, app), lambda c: lib.find(c, queue, message_id))
    if dl is None:
        fail(f"message {message_id!r} not found in {queue!r}")
    try:
        dl.body.decode("utf-8")
    except UnicodeDecodeError:
        fail("the body is binary: export it, fix the record and replay it with --from-file")
    json_body = "json" in str(dl.properties.get("content_type") or "json")
    edited = click.edit(dl.body, extension=".json" if json_body else ".txt", require_save=True)
    if edited is None or edited == dl.body:
        click.echo("body unchanged; nothing replayed")
        return
    if app is not None:
        try:
            lib.validate_body(app, dl, edited)
        except DecodeError as exc:
            fail(f"edited body refused by the handler: {exc}; nothing was published")
        except ConfigurationError as exc:
            fail(str(exc), EXIT_APP)
    target, problem = with_broker(
        broker(url, app), lambda c: audited(lib.replace(c, dl, edited, to=to))
    )
    click.echo(f"replayed {term(message_id)} with the edited body to {term(target)}")
    audit_warning(problem)
    exit_audit(problem)


@dlq.command()
@click.argument("queue")
@filter_options
@limit_option(None)
@click.option("--yes", is_flag=True, help="Really delete; without it, only say what would go.")
@management_option
@url_option
def purge(queue: str, chosen: lib.Filter, limit: int | None, yes: bool, url: str | None) -> None:
    """Delete the matching dead letters of QUEUE (all without filters); the others stay."""
    if not yes:
        aggregate, report = with_broker(
            broker(url), lambda c: lib.stats(c, queue, chosen=chosen, limit=limit)
        )
        click.echo(term(f"would purge {report.matched} of {report.depth} dead letters in {queue}:"))
        for name, count in aggregate.error_types.most_common(5):
            click.echo(term(f"  {count:>8}  {name}"))
        click.echo("nothing changed; add --yes to purge")
        problem = None
    else:
        report, problem = with_broker(
            broker(url), lambda c: audited(lib.purge(c, queue, chosen=chosen, limit=limit))
        )
        click.echo(term(f"purged {report.matched} dead letters from {queue}"))
    warn_delivery_count(report)
    audit_warning(problem)
    exit_audit(problem)


@dlq.command()
@click.option("--since", help="Records at or after: ISO 8601 or a duration ago (2h, 30m, 7d).")
@click.option("--dlq", "dlq_name", metavar="QUEUE", help="Only records about this DLQ.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line, for scripts.")
@click.option(
    "--mttr",
    is_flag=True,
    help="Per failure group: first failure, first alert (MTTD), resolving replay (MTTR) or open.",
)
@management_option
@url_option
def history(
    since: str | None, dlq_name: str | None, as_json: bool, mttr: bool, url: str | None
) -> None:
    """The audit trail (stream qworker.audit): every replay, edit, purge, export --remove
    and alert, oldest first, one line each.

    With --mttr, per failure group (fingerprint): when it first failed, when an alert
    first named it (MTTD) and which replay resolved it (MTTR), or "open". The DLQs the
    trail names (or --dlq) are read once, without removing anything, to find replayed
    messages that came back.
    """
    from qworker.dlq import mttr as times
    from qworker.dlq.audit import read as read_trail

    try:
        start = parse_when(since, datetime.now(UTC)) if since is not None else None
    except FilterError as exc:
        fail(str(exc), EXIT_USAGE)
    if mttr:
        found, _ = with_broker(broker(url), lambda c: times.collect(c, dlq=dlq_name, since=start))
        print_groups(found, as_json)
        return

    async def records(connection: AbstractConnection) -> None:
        async for record in read_trail(connection, since=start):
            if start is not None and (record.when is None or record.when < start):
                continue
            if dlq_name is not None and not times.concerns(record, dlq_name):
                continue
            click.echo(record_json(record) if as_json else record_line(record))

    with_broker(broker(url), records)


def record_json(record: AuditRecord) -> str:
    """One record as one JSON line (control characters escaped by JSON itself)."""
    return record.to_json().decode("utf-8")


def record_line(record: AuditRecord) -> str:
    """One record as one terminal-safe line."""
    parts = [record.at, record.action, record.dlq or record.source or "-", record.actor]
    parts.append(" ".join(f"{k}={v}" for k, v in record.counts.items()) or "-")
    parts.append(record.outcome)
    if record.replay_id:
        parts.append(f"replay_id={record.replay_id}")
    if record.filter:
        parts.append("filter " + " ".join(f"{k}={v}" for k, v in record.filter.items()))
    if record.options:
        parts.append("options " + " ".join(f"{k}={v}" for k, v in record.options.items()))
    if record.fingerprints:
        shown = ",".join(record.fingerprints[:5])
        more = f" (+{len(record.fingerprints) - 5})" if len(record.fingerprints) > 5 else ""
        parts.append(f"groups {shown}{more}")
    return term("  ".join(" ".join(str(p).split()) for p in parts))


def duration(value: timedelta | None) -> str:
    """``3d4h``, ``2h05m``, ``4m12s``, ``7s``."""
    if value is None:
        return "-"
    seconds = int(value.total_seconds())
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def print_groups(found: list[times.GroupTimes], as_json: bool) -> None:
    """The MTTD/MTTR table (or JSON lines), one group a line, oldest first failure first."""
    if as_json:
        for group in found:
            click.echo(
                json.dumps(
                    {
                        "fingerprint": group.fingerprint,
                        "dlq": group.dlq,
                        "first_failure": group.first_failure.isoformat(),
                        "first_alert": group.first_alert.isoformat() if group.first_alert else None,
                        "mttd_seconds": group.mttd.total_seconds() if group.mttd else None,
                        "resolved_by": group.resolved_by,
                        "resolved_at": group.resolved_at.isoformat() if group.resolved_at else None,
                        "mttr_seconds": group.mttr.total_seconds() if group.mttr else None,
                        "came_back": list(group.came_back),
                        "state": "open" if group.open else "resolved",
                    }
                )
            )
        return
    if not found:
        click.echo("no failure groups in the audit trail")
        return
    click.echo(f"{'GROUP':<14}{'FIRST FAILURE':<21}{'FIRST ALERT (MTTD)':<32}RESOLVED (MTTR)")
    for group in found:
        alert = f"{when(group.first_alert)} ({duration(group.mttd)})" if group.first_alert else "-"
        if group.open:
            resolved = "open"
        else:
            resolved = (
                f"by replay {group.resolved_by} at {when(group.resolved_at)} "
                f"({duration(group.mttr)})"
            )
        if group.came_back:
            resolved += f"; came back: {', '.join(group.came_back[:3])}"
        line = f"{group.fingerprint:<14}{when(group.first_failure):<21}{alert:<32}{resolved}"
        click.echo(term(line))
