"""``qworker dlq``: inspect, group, export, replay, edit and purge dead letters.

A thin layer over :mod:`qworker.dlq`. Exit codes: 0 success; 1 runtime failure
(broker unreachable, queue missing, unreadable file, a publish not confirmed);
2 bad usage (a bad filter, an unacceptable ``--to``); 3 the app cannot be
loaded; 4 the canaries of a replay died again or were not handled in time (the
rest was left untouched). Every failure is one line on stderr; everything
printed has control characters escaped.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click
from aio_pika.abc import AbstractConnection
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from qworker import dlq as lib
from qworker.cli import DEFAULT_URL, EXIT_APP, EXIT_USAGE, fail, load_app, run_async, url_option
from qworker.connection import connect_once, normalise_urls
from qworker.dlq_cursor import queue_depth
from qworker.errors import ConfigurationError, DecodeError
from qworker.redact import escape_control

EXIT_CANARY = 4
#: Skipped or failed messages listed one by one before the rest are only counted.
EVENT_LINES = 20

T = TypeVar("T")


def term(value: object) -> str:
    """Any value as terminal-safe text."""
    return escape_control(str(value))


def warn(message: str) -> None:
    click.echo(f"qworker: warning: {term(message)}", err=True)


def broker_urls(url: str | None) -> list[str]:
    """``--url`` (comma-separated cluster nodes allowed), else the default URL."""
    try:
        return normalise_urls((url or DEFAULT_URL).split(","))
    except ConfigurationError as exc:
        fail(str(exc), EXIT_USAGE)


def with_broker(
    urls: list[str],
    work: Callable[[AbstractConnection], Awaitable[T]],
    ca_file: str | None = None,
) -> T:
    """Connect (first URL that answers), run ``work``, close; failures become one line."""

    async def main() -> T:
        connection = await connect_once(urls, ca_file=ca_file, name="qworker-dlq")
        try:
            return await work(connection)
        except lib.BadTarget as exc:
            fail(str(exc), EXIT_USAGE)
        finally:
            await connection.close()

    return run_async(main())


_FILTERS = ("error_type", "reason", "handler", "message_id", "grep", "since", "until")


def filter_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add the filter options; the command receives them as one ``chosen`` :class:`Filter`."""

    @functools.wraps(func)
    def command(**kwargs: Any) -> Any:
        raw = {name: kwargs.pop(name) for name in _FILTERS}
        try:
            chosen = lib.Filter.parse(**raw)
        except lib.FilterError as exc:
            fail(str(exc), EXIT_USAGE)
        return func(chosen=chosen, **kwargs)

    options = [
        click.option("--error-type", help="Exception class, e.g. KeyError or app.errors.Missing."),
        click.option("--reason", help="permanent_error, retries_exhausted, delivery_limit, ..."),
        click.option("--handler", help="Handler as module:function, or the function name."),
        click.option("--message-id", help="Exact message id."),
        click.option("--grep", help="Text in the body or the error message (case-sensitive)."),
        click.option("--since", help="Failed at or after: ISO 8601 or a duration ago (2h, 30m)."),
        click.option("--until", help="Failed at or before: ISO 8601 or a duration ago."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def limit_option(default: int | None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    shown = "all" if default is None else str(default)
    return click.option(
        "--limit",
        type=click.IntRange(min=0),
        default=default,
        help=f"At most this many matching messages; 0 for all (default: {shown}).",
    )


def _limit(value: int | None) -> int | None:
    return value or None


def warn_delivery_count(report: lib.ScanReport) -> None:
    """Say so when reading counted deliveries on a quorum DLQ with an unknown limit."""
    if report.delivery_counted:
        warn(
            f"{report.queue} is a quorum queue not declared by qworker (its delivery limit is "
            "unknown): each read counts one delivery per message, now up to "
            f"{report.max_delivery_count}; RabbitMQ 4.0-4.2 drop or dead-letter a message "
            "after 20 by default (see docs/dlq.md)"
        )


def when(moment: datetime | None) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def age(moment: datetime | None, now: datetime) -> str:
    """``45s``, ``12m``, ``3h``, ``2d``."""
    if moment is None:
        return "-"
    seconds = max(0, int((now - moment).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def console() -> Console:
    """Rich output on stdout; wide and colourless when it is not a terminal."""
    tty = sys.stdout.isatty()
    return Console(highlight=False, soft_wrap=False, width=None if tty else 200, no_color=not tty)


def table(*columns: str) -> Table:
    grid = Table(box=None, pad_edge=False, header_style="bold")
    for column in columns:
        grid.add_column(column, overflow="fold")
    return grid


def row(grid: Table, *cells: object) -> None:
    """Add a row of plain text (never interpreted as rich markup), escaped."""
    grid.add_row(*(Text(term(cell)) for cell in cells))


@click.group()
def dlq() -> None:
    """Inspect, group, export, replay, edit and purge dead letters.

    The broker URL comes from --url or QWORKER_URL (default
    amqp://guest:guest@localhost:5672/). Reading never removes a message.
    Exit codes: 0 ok, 1 runtime failure, 2 bad usage or filter, 3 app cannot
    be loaded, 4 replay canaries died again or were not handled in time.
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
@url_option
def ls(app_spec: str | None, queues: Sequence[str], sample: int, url: str | None) -> None:
    """Every DLQ of APP (or the --queue ones): messages, oldest failure, top error types."""
    if app_spec is None and not queues:
        fail("name an APP (module:attribute) or DLQs with --queue", EXIT_USAGE)
    names = list(queues)
    urls, ca_file = broker_urls(url), None
    if app_spec is not None:
        app = load_app(app_spec, url)
        names += [spec.name for spec in app.topology() if spec.role == "dlq"]
        urls, ca_file = app.urls, app.ssl_ca
    summaries = with_broker(urls, lambda c: lib.summarize(c, names, sample=sample or None), ca_file)
    grid = table("DLQ", "MESSAGES", "OLDEST FAILURE", "TOP ERRORS", "NOTE")
    for summary in summaries:
        if not summary.exists:
            row(grid, summary.queue, "-", "-", "-", "not declared")
            continue
        errors = ", ".join(f"{name} ({count})" for name, count in summary.top_errors)
        notes = []
        if summary.sampled < summary.messages:
            notes.append(f"first {summary.sampled} read")
        if summary.safety is lib.Safety.UNVERIFIED:
            notes.append("arguments not verified")
        row(
            grid,
            summary.queue,
            summary.messages,
            when(summary.oldest_failure),
            errors or "-",
            "; ".join(notes),
        )
    console().print(grid)
    for summary in summaries:
        if summary.delivery_counted:
            warn(f"{summary.queue}: quorum queue with unknown delivery limit (see docs/dlq.md)")


@dlq.command()
@click.argument("queue")
@limit_option(20)
@filter_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per message, for scripts.")
@url_option
def show(queue: str, limit: int | None, chosen: lib.Filter, as_json: bool, url: str | None) -> None:
    """List dead letters of QUEUE without removing any: a table, or JSON lines with --json."""
    if as_json:
        report = with_broker(
            broker_urls(url),
            lambda c: lib.browse(
                c, queue, lambda dl: click.echo(lib.dumps(dl)), chosen=chosen, limit=_limit(limit)
            ),
        )
        warn_delivery_count(report)
        return
    found: list[lib.DeadLetter] = []
    report = with_broker(
        broker_urls(url),
        lambda c: lib.browse(c, queue, found.append, chosen=chosen, limit=_limit(limit)),
    )
    now = datetime.now(UTC)
    grid = table("ID", "AGE", "REASON", "ERROR TYPE", "HANDLER", "ATT", "MESSAGE", "BODY")
    for dl in found:
        row(
            grid,
            dl.message_id or "-",
            age(dl.failed_at, now),
            dl.reason,
            dl.error_type or "-",
            dl.handler or "-",
            dl.attempt,
            dl.summary_line()[:120],
            dl.body[:60].decode("utf-8", "replace"),
        )
    out = console()
    out.print(grid)
    more = " (--limit 0 shows all)" if limit and report.matched >= limit else ""
    out.print(
        Text(term(f"{len(found)} shown of {report.depth} dead letters in {queue}{more}")),
    )
    warn_delivery_count(report)


@dlq.command()
@click.argument("queue")
@limit_option(None)
@filter_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per group.")
@url_option
def stats(
    queue: str, limit: int | None, chosen: lib.Filter, as_json: bool, url: str | None
) -> None:
    """Group dead letters by reason, error type, handler and message fingerprint."""
    aggregate, report = with_broker(
        broker_urls(url), lambda c: lib.stats(c, queue, chosen=chosen, limit=_limit(limit))
    )
    groups = aggregate.ranked()
    if as_json:
        for group in groups:
            record = {
                "count": group.count,
                "reason": group.key.reason,
                "error_type": group.key.error_type,
                "handler": group.key.handler,
                "fingerprint": group.key.fingerprint,
                "pattern": group.pattern,
                "frame": group.frame,
                "first_seen": group.first_seen.isoformat() if group.first_seen else None,
                "last_seen": group.last_seen.isoformat() if group.last_seen else None,
                "sample_message_id": group.sample_message_id,
            }
            click.echo(json.dumps(record))
        warn_delivery_count(report)
        return
    out = console()
    reasons = ", ".join(f"{name} {count}" for name, count in aggregate.reasons.most_common())
    out.print(
        Text(
            term(
                f"{queue}: {report.matched} of {report.depth} dead letters in "
                f"{len(groups)} groups" + (f" ({reasons})" if reasons else "")
            )
        )
    )
    grid = table("COUNT", "REASON", "ERROR TYPE", "HANDLER", "FIRST", "LAST", "SAMPLE ID", "KIND")
    for group in groups:
        where = f" @ {group.frame}" if group.frame else ""
        row(
            grid,
            group.count,
            group.key.reason,
            group.key.error_type,
            group.key.handler,
            when(group.first_seen),
            when(group.last_seen),
            group.sample_message_id or "-",
            f"[{group.key.fingerprint}] {group.pattern}{where}",
        )
    out.print(grid)
    warn_delivery_count(report)


@dlq.command()
@click.argument("queue")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="File (default: stdout).",
)
@limit_option(None)
@filter_options
@click.option(
    "--remove", is_flag=True, help="Remove exported messages, once the file is on disk (fsync)."
)
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
    if remove and output is None:
        fail(
            "--remove needs -o FILE: records must be on disk before they leave the DLQ", EXIT_USAGE
        )
    if output is None:
        report = with_broker(
            broker_urls(url),
            lambda c: lib.export(c, queue, sys.stdout, chosen=chosen, limit=_limit(limit)),
        )
    else:
        try:
            # Exclusive create: never overwrite an earlier export, it may be the only copy.
            stream = output.open("x", encoding="utf-8")
        except OSError as exc:
            fail(f"cannot create {output}: {exc.strerror or exc}")
        with stream:
            report = with_broker(
                broker_urls(url),
                lambda c: lib.export(
                    c, queue, stream, chosen=chosen, limit=_limit(limit), remove=remove
                ),
            )
    where = f" to {output}" if output else ""
    removed = " and removed them from the DLQ" if remove else ""
    click.echo(
        term(f"exported {report.matched} dead letters from {queue}{where}{removed}"), err=True
    )
    warn_delivery_count(report)


def _records(path: Path) -> Callable[[], Iterator[lib.DeadLetter]]:
    def read() -> Iterator[lib.DeadLetter]:
        try:
            with path.open(encoding="utf-8") as lines:
                yield from lib.read_records(lines, str(path))
        except UnicodeDecodeError as exc:
            raise lib.BadRecord(f"{path}: not UTF-8 text ({exc.reason})") from None
        except OSError as exc:
            raise lib.BadRecord(f"cannot read {path}: {exc.strerror or exc}") from None

    return read


class _Reporter:
    """Prints replay events (the first few skips and failures, every dry-run line) and progress."""

    def __init__(self, total: int | None, dry_run: bool) -> None:
        self._dry_run = dry_run
        self._noted = 0
        self._progress: Progress | None = None
        self._task: Any = None
        if sys.stderr.isatty() and not dry_run:
            self._progress = Progress(
                TextColumn("replaying"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._task = self._progress.add_task("replay", total=total)
            self._progress.start()

    def __call__(self, event: lib.Event) -> None:
        dl = event.dead_letter
        name = term(dl.message_id or "(no id)")
        if event.outcome is lib.Outcome.PLANNED:
            click.echo(f"would replay {name} -> {term(event.target)}")
        elif event.outcome in (lib.Outcome.SKIPPED, lib.Outcome.FAILED):
            self._noted += 1
            if self._noted <= EVENT_LINES:
                click.echo(f"{event.outcome.value} {name}: {term(event.detail)}", err=True)
            elif self._noted == EVENT_LINES + 1:
                click.echo("... (more skipped or failed messages not listed)", err=True)
        if self._progress is not None:
            self._progress.advance(self._task)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


@dlq.command()
@click.argument("queue", required=False)
@filter_options
@limit_option(None)
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), help="Messages per second.")
@click.option(
    "--canary", type=click.IntRange(min=0), default=0, help="Replay N first and watch them."
)
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
    help="Seconds the canaries' queue must stay drained with none dead again "
    "(longer than the handler's retry delays).",
)
@click.option("--to", help="Replay into this queue instead of each message's origin queue.")
@click.option("--dry-run", is_flag=True, help="Say what would be replayed; change nothing.")
@click.option(
    "--from-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Replay the records of an export file instead of a DLQ.",
)
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
    copy; the others stay. The origin of QUEUE named Q.dlq is Q.
    """
    if (queue is None) == (from_file is None):
        fail("give either QUEUE or --from-file FILE", EXIT_USAGE)
    if from_file is not None and canary:
        fail("--canary needs a DLQ, not --from-file", EXIT_USAGE)
    if from_file is not None:
        # A bad file is reported before connecting, whatever the broker's state.
        try:
            for _ in _records(from_file)():
                pass
        except lib.BadRecord as exc:
            fail(str(exc))
    options = lib.ReplayOptions(
        limit=_limit(limit),
        rate=rate,
        canary=canary,
        canary_timeout=canary_timeout,
        canary_wait=canary_wait,
        to=to,
        dry_run=dry_run,
    )

    async def work(connection: AbstractConnection) -> lib.ReplayResult:
        total = None
        if queue is not None:
            depth = await queue_depth(connection, queue)
            total = min(depth, options.limit or depth)
        reporter = _Reporter(total, dry_run)
        try:
            if from_file is not None:
                return await lib.replay_records(
                    connection,
                    _records(from_file),
                    chosen=chosen,
                    options=options,
                    on_event=reporter,
                )
            assert queue is not None
            return await lib.replay(
                connection, queue, chosen=chosen, options=options, on_event=reporter
            )
        finally:
            reporter.close()

    result = with_broker(broker_urls(url), work)
    source = term(queue or from_file)
    if dry_run:
        click.echo(
            f"dry run: would replay {result.planned}, would skip {result.skipped} "
            f"(from {source}); nothing changed"
        )
    else:
        click.echo(
            f"replayed {result.replayed}, skipped {result.skipped}, failed {result.failed} "
            f"(from {source})"
        )
    if result.delivery_counted:
        warn(f"{queue}: quorum queue with unknown delivery limit; reads counted (see docs/dlq.md)")
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


@dlq.command()
@click.argument("queue")
@click.argument("message_id")
@click.option("--app", "app_spec", help="APP (module:attribute) whose handler validates the body.")
@click.option("--to", help="Replay into this queue instead of the message's origin queue.")
@url_option
def edit(
    queue: str, message_id: str, app_spec: str | None, to: str | None, url: str | None
) -> None:
    """Edit a dead letter's body in $EDITOR, validate it (with --app), then replay it.

    An unchanged body changes nothing; an invalid one is refused (exit 1).
    """
    app = load_app(app_spec, url) if app_spec else None
    dl = with_broker(broker_urls(url), lambda c: lib.find(c, queue, message_id))
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
    target = with_broker(broker_urls(url), lambda c: lib.replace(c, dl, edited, to=to))
    click.echo(f"replayed {term(message_id)} with the edited body to {term(target)}")


@dlq.command()
@click.argument("queue")
@filter_options
@limit_option(None)
@click.option("--yes", is_flag=True, help="Really delete; without it, only say what would go.")
@url_option
def purge(queue: str, chosen: lib.Filter, limit: int | None, yes: bool, url: str | None) -> None:
    """Delete the matching dead letters of QUEUE (all without filters); the others stay."""
    if not yes:
        aggregate, report = with_broker(
            broker_urls(url), lambda c: lib.stats(c, queue, chosen=chosen, limit=_limit(limit))
        )
        click.echo(term(f"would purge {report.matched} of {report.depth} dead letters in {queue}:"))
        for name, count in aggregate.error_types.most_common(5):
            click.echo(term(f"  {count:>8}  {name}"))
        click.echo("nothing changed; add --yes to purge")
        return
    report = with_broker(
        broker_urls(url), lambda c: lib.purge(c, queue, chosen=chosen, limit=_limit(limit))
    )
    click.echo(term(f"purged {report.matched} dead letters from {queue}"))
    warn_delivery_count(report)
