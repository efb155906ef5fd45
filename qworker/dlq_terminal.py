"""What ``qworker dlq`` prints: tables, JSON lines, warnings and the replay progress.

Every value that comes from a message (ids, headers, bodies, error text) is
producer-controlled, so it is printed only through :func:`term`, which escapes
control characters and escape sequences, and never as rich markup.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from qworker import dlq as lib
from qworker.redact import escape_control

#: Skipped or failed messages listed one by one before the rest are only counted.
EVENT_LINES = 20


def term(value: object) -> str:
    """Any value as terminal-safe text."""
    return escape_control(str(value))


def warn(message: str) -> None:
    """One warning line on stderr."""
    click.echo(f"qworker: warning: {term(message)}", err=True)


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
    """A UTC time to the second, or ``-``."""
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


def _console() -> Console:
    """Rich output on stdout; wide and colourless when it is not a terminal."""
    tty = sys.stdout.isatty()
    return Console(highlight=False, soft_wrap=False, width=None if tty else 200, no_color=not tty)


def _print_table(columns: tuple[str, ...], rows: list[tuple[object, ...]], footer: str) -> None:
    """A table of plain text cells (escaped, never read as markup), then a footer line."""
    grid = Table(box=None, pad_edge=False, header_style="bold")
    for column in columns:
        grid.add_column(column, overflow="fold")
    for cells in rows:
        grid.add_row(*(Text(term(cell)) for cell in cells))
    out = _console()
    out.print(grid)
    if footer:
        out.print(Text(term(footer)))


def print_summaries(summaries: list[lib.DlqSummary]) -> None:
    """The ``ls`` table."""
    rows: list[tuple[object, ...]] = []
    for summary in summaries:
        if not summary.exists:
            rows.append((summary.queue, "-", "-", "-", "not declared"))
            continue
        notes = []
        if summary.sampled < summary.messages:
            notes.append(f"first {summary.sampled} read")
        if summary.safety is lib.Safety.UNVERIFIED:
            notes.append("arguments not verified")
        errors = ", ".join(f"{name} ({count})" for name, count in summary.top_errors)
        rows.append(
            (
                summary.queue,
                summary.messages,
                when(summary.oldest_failure),
                errors or "-",
                "; ".join(notes),
            )
        )
    _print_table(("DLQ", "MESSAGES", "OLDEST FAILURE", "TOP ERRORS", "NOTE"), rows, "")
    for summary in summaries:
        if summary.delivery_counted:
            warn(f"{summary.queue}: quorum queue with unknown delivery limit (see docs/dlq.md)")


def print_dead_letters(
    found: list[lib.DeadLetter], report: lib.ScanReport, limit: int | None
) -> None:
    """The ``show`` table: one row per dead letter, newest facts first."""
    now = datetime.now(UTC)
    rows: list[tuple[object, ...]] = [
        (
            dl.message_id or "-",
            age(dl.failed_at, now),
            dl.reason,
            dl.error_type or "-",
            dl.handler or "-",
            dl.attempt,
            dl.summary_line()[:120],
            dl.body[:60].decode("utf-8", "replace"),
        )
        for dl in found
    ]
    more = " (--limit 0 shows all)" if limit and report.matched >= limit else ""
    _print_table(
        ("ID", "AGE", "REASON", "ERROR TYPE", "HANDLER", "ATT", "MESSAGE", "BODY"),
        rows,
        f"{len(found)} shown of {report.depth} dead letters in {report.queue}{more}",
    )


def group_record(group: lib.Group) -> dict[str, Any]:
    """One group of ``stats --json``."""
    return {
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


def print_stats(aggregate: lib.Stats, report: lib.ScanReport, as_json: bool) -> None:
    """The ``stats`` groups, largest first, as a table or JSON lines."""
    groups = aggregate.ranked()
    if as_json:
        for group in groups:
            click.echo(json.dumps(group_record(group)))
        return
    rows: list[tuple[object, ...]] = [
        (
            group.count,
            group.key.reason,
            group.key.error_type,
            group.key.handler,
            when(group.first_seen),
            when(group.last_seen),
            group.sample_message_id or "-",
            f"[{group.key.fingerprint}] {group.pattern}"
            + (f" @ {group.frame}" if group.frame else ""),
        )
        for group in groups
    ]
    reasons = ", ".join(f"{name} {count}" for name, count in aggregate.reasons.most_common())
    click.echo(
        term(
            f"{report.queue}: {report.matched} of {report.depth} dead letters in "
            f"{len(groups)} groups" + (f" ({reasons})" if reasons else "")
        )
    )
    _print_table(
        ("COUNT", "REASON", "ERROR TYPE", "HANDLER", "FIRST", "LAST", "SAMPLE ID", "KIND"), rows, ""
    )


class ReplayReporter:
    """Prints replay events (every dry-run line, the first skips and failures) and progress.

    The progress bar is drawn on stderr, and only when stderr is a terminal.
    """

    def __init__(self, total: int | None, dry_run: bool) -> None:
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
        """Report one selected dead letter's outcome."""
        name = term(event.dead_letter.message_id or "(no id)")
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
        """Remove the progress bar."""
        if self._progress is not None:
            self._progress.stop()


def print_replay_summary(result: lib.ReplayResult, source: object, dry_run: bool) -> None:
    """The last line of a replay: what was replayed, skipped and failed."""
    if dry_run:
        click.echo(
            f"dry run: would replay {result.planned}, would skip {result.skipped} "
            f"(from {term(source)}); nothing changed"
        )
    else:
        click.echo(
            f"replayed {result.replayed}, skipped {result.skipped}, failed {result.failed} "
            f"(from {term(source)})"
        )
    for report in result.reports:
        warn_delivery_count(report)
