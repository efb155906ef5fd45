"""What ``qworker dlq`` prints: tables, JSON lines, warnings and the replay progress.

Every value that comes from a message (ids, headers, bodies, error text) is
producer-controlled, so it is printed only through :func:`term`, which escapes
control characters and escape sequences.

Plain text on purpose: a table and a progress line need no rendering library,
and the worker processes (which import this package) stay small.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from typing import Any

import click

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


#: A cell wider than this is cut (with ``…``) so that one long value cannot wreck the table.
CELL_WIDTH = 60


def _print_table(columns: tuple[str, ...], rows: list[tuple[object, ...]], footer: str) -> None:
    """Left-aligned columns of escaped text, the last column uncut, then a footer line."""
    cells = [[term(cell) for cell in row] for row in rows]
    for row in cells:
        for i, cell in enumerate(row[:-1]):
            if len(cell) > CELL_WIDTH:
                row[i] = cell[: CELL_WIDTH - 1] + "…"
    widths = [
        max([len(column), *(len(row[i]) for row in cells)]) for i, column in enumerate(columns)
    ]
    for row in [list(columns), *cells]:
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        click.echo(line.rstrip())
    if footer:
        click.echo(term(footer))


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
    """The ``show`` table: one row per dead letter, newest facts first, then their runbooks."""
    now = datetime.now(UTC)
    rows = [_row(dl, now) for dl in found]
    more = " (--limit 0 shows all)" if limit and report.matched >= limit else ""
    _print_table(
        _SHOW_COLUMNS,
        rows,
        f"{len(found)} shown of {report.depth} dead letters in {report.queue}{more}",
    )
    runbooks = Runbooks()
    for dl in found:
        runbooks.add(dl)
    runbooks.print()


#: Column widths of ``show --limit 0``, whose rows are printed as they are read.
STREAM_WIDTHS = (32, 5, 17, 40, 24, 30, 3, 60, 32)
_SHOW_COLUMNS = (
    "ID",
    "AGE",
    "REASON",
    "ERROR TYPE",
    "CODE",
    "HANDLER",
    "ATT",
    "MESSAGE",
    "TRACE",
    "BODY",
)


def _row(dl: lib.DeadLetter, now: datetime) -> tuple[object, ...]:
    return (
        dl.message_id or "-",
        age(dl.failed_at, now),
        dl.reason,
        dl.error_type or "-",
        dl.error_code or "-",
        dl.handler or "-",
        dl.attempt,
        dl.summary_line()[:120],
        dl.trace_id or "-",
        dl.body[:60].decode("utf-8", "replace"),
    )


class Runbooks:
    """The runbook links of the dead letters shown, each once, printed under the table.

    At most :data:`RUNBOOK_LINES` distinct links are kept (``show --limit 0`` keeps
    its memory flat); the rest are only counted.
    """

    def __init__(self) -> None:
        self._seen: dict[str, tuple[int, set[str]]] = {}
        self._more = 0

    def add(self, dl: lib.DeadLetter) -> None:
        """Note the runbook of ``dl``, if it has one."""
        if dl.runbook is None:
            return
        entry = self._seen.get(dl.runbook)
        if entry is None:
            if len(self._seen) >= RUNBOOK_LINES:
                self._more += 1
                return
            entry = self._seen[dl.runbook] = (0, set())
        count, codes = entry
        if dl.error_code is not None and len(codes) < RUNBOOK_LINES:
            codes.add(dl.error_code)
        self._seen[dl.runbook] = (count + 1, codes)

    def print(self) -> None:
        """``runbooks:`` then one line per link: how many shown dead letters point to it."""
        if not self._seen:
            return
        click.echo("runbooks:")
        for link, (count, codes) in self._seen.items():
            named = f"; {', '.join(sorted(codes))}" if codes else ""
            click.echo(term(f"  {link}  ({count} shown{named})"))
        if self._more:
            click.echo(term(f"  ... and {self._more} shown dead letters with other runbooks"))


#: Distinct runbook links listed under the ``show`` table.
RUNBOOK_LINES = 20


class StreamingTable:
    """The ``show`` table printed row by row with fixed column widths, keeping nothing.

    For ``show --limit 0``: memory stays flat however many dead letters are listed
    (only the distinct runbook links, at most :data:`RUNBOOK_LINES`, are kept).
    """

    def __init__(self) -> None:
        self.shown = 0
        self._now = datetime.now(UTC)
        self._runbooks = Runbooks()
        self._line(_SHOW_COLUMNS)

    def _line(self, row: tuple[object, ...]) -> None:
        cells = [term(cell) for cell in row]
        for i, width in enumerate(STREAM_WIDTHS):
            if len(cells[i]) > width:
                cells[i] = cells[i][: width - 1] + "…"
            cells[i] = cells[i].ljust(width)
        click.echo("  ".join(cells).rstrip())

    def __call__(self, dl: lib.DeadLetter) -> None:
        """Print one dead letter."""
        self._line(_row(dl, self._now))
        self._runbooks.add(dl)
        self.shown += 1

    def footer(self, report: lib.ScanReport) -> None:
        """The last lines: how many were shown, then their runbooks."""
        click.echo(term(f"{self.shown} shown of {report.depth} dead letters in {report.queue}"))
        self._runbooks.print()


def group_record(group: lib.Group) -> dict[str, Any]:
    """One group of ``stats --json``."""
    return {
        "count": group.count,
        "reason": group.key.reason,
        "error_type": group.key.error_type,
        "handler": group.key.handler,
        "fingerprint": group.key.fingerprint,
        "error_code": group.key.error_code,
        "runbook": group.runbook,
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
            group.key.error_code or "-",
            when(group.first_seen),
            when(group.last_seen),
            group.sample_message_id or "-",
            f"[{group.key.fingerprint}] {group.pattern}"
            + (f" @ {group.frame}" if group.frame else "")
            + (f" runbook: {group.runbook}" if group.runbook else ""),
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
        (
            "COUNT",
            "REASON",
            "ERROR TYPE",
            "HANDLER",
            "ERROR CODE",
            "FIRST",
            "LAST",
            "SAMPLE ID",
            "KIND",
        ),
        rows,
        "",
    )
    if lib.OTHER_KEY in aggregate.groups:
        warn(
            f"more than {aggregate.max_groups} kinds of failure: the dead letters of the later "
            "kinds are counted together in the group 'other' (filter to see them apart)"
        )


class ReplayReporter:
    """Prints replay events (every dry-run line, the first skips and failures) and progress.

    The progress line (``replaying 1200/10000``) is drawn on stderr, only when it is a terminal.
    """

    def __init__(self, total: int | None, dry_run: bool) -> None:
        self._noted = 0
        self._done = 0
        self._total = f"/{total}" if total else ""
        self._progress = sys.stderr.isatty() and not dry_run
        self._drawn_at = 0.0

    def __call__(self, event: lib.Event) -> None:
        """Report one selected dead letter's outcome."""
        name = term(event.dead_letter.message_id or "(no id)")
        if event.outcome is lib.ReplayOutcome.PLANNED:
            click.echo(f"would replay {name} -> {term(event.target)}")
        elif event.outcome in (lib.ReplayOutcome.SKIPPED, lib.ReplayOutcome.FAILED):
            self._noted += 1
            self._clear()
            if self._noted <= EVENT_LINES:
                click.echo(f"{event.outcome.value} {name}: {term(event.detail)}", err=True)
            elif self._noted == EVENT_LINES + 1:
                click.echo("... (more skipped or failed messages not listed)", err=True)
        self._done += 1
        if self._progress and time.monotonic() - self._drawn_at > 0.1:
            self._drawn_at = time.monotonic()
            sys.stderr.write(f"\rreplaying {self._done}{self._total}")
            sys.stderr.flush()

    def _clear(self) -> None:
        if self._progress and self._drawn_at:
            sys.stderr.write("\r\033[K")

    def close(self) -> None:
        """Remove the progress line."""
        self._clear()


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
        left = result.skipped + result.failed
        if left:
            click.echo(
                f"{left} selected messages were not replayed (listed above, each with its "
                "reason); they stay in the DLQ"
            )
    for report in result.reports:
        warn_delivery_count(report)
