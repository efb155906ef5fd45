"""The plumbing of ``qworker dlq``: the shared options, the broker connection, export files.

Failures become one line on stderr with the exit codes of :mod:`qworker.cli._common`.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from aio_pika.abc import AbstractConnection

from qworker import dlq as lib
from qworker.cli._common import DEFAULT_URL, EXIT_USAGE, fail, run_async
from qworker.connection import connect_once, normalise_urls
from qworker.dlq import filters
from qworker.errors import ConfigurationError

if TYPE_CHECKING:
    from qworker.app import App

T = TypeVar("T")
Command = Callable[..., Any]

_FILTERS = filters.NAMES


def broker(url: str | None, app: App | None = None) -> tuple[list[str], str | None]:
    """The URLs and CA file to use: the app's (``--url`` already applied), else ``--url``."""

    if app is not None:
        return app.urls, app.ssl_ca
    try:
        return normalise_urls((url or DEFAULT_URL).split(",")), None
    except ConfigurationError as exc:
        fail(str(exc), EXIT_USAGE)


def with_broker(
    target: tuple[list[str], str | None], work: Callable[[AbstractConnection], Awaitable[T]]
) -> T:
    """Connect (first URL that answers), run ``work``, close; failures become one line."""

    urls, ca_file = target

    async def main() -> T:
        connection = await connect_once(urls, ca_file=ca_file, name="qworker-dlq")
        try:
            return await work(connection)
        except lib.BadTarget as exc:
            fail(str(exc), EXIT_USAGE)
        finally:
            await connection.close()

    return run_async(main())


def filter_options(func: Command) -> Command:
    """Add the filter options; the command receives them as one ``chosen`` :class:`Filter`.

    A value that cannot be understood is a usage error (exit 2).
    """

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
        click.option(
            "--fingerprint",
            metavar="FP",
            help="Failure group: at least the first 6 hex characters of its fingerprint "
            "(dlq stats, x-qworker-fingerprint).",
        ),
        click.option(
            "--error-code",
            metavar="CODE",
            help="Exact error code (x-qworker-error-code), e.g. CUSTOMER_UNKNOWN.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def management_option(func: Command) -> Command:
    """``--management-url``: where to read the DLQ's effective delivery limit (policies).

    Without it the tool tries the broker URL's host on port 15672 with the same
    credentials; see :class:`qworker.dlq.DeliveryGuard`.
    """

    @functools.wraps(func)
    def command(**kwargs: Any) -> Any:
        with lib.use_management(kwargs.pop("management_url")):
            return func(**kwargs)

    return click.option(
        "--management-url",
        envvar="QWORKER_MANAGEMENT_URL",
        help="Management API (http://user:pass@host:15672) to read the DLQ's delivery limit "
        "from (policies included); default: the broker's host, port 15672.",
    )(command)


def limit_option(default: int | None) -> Callable[[Command], Command]:
    """``--limit N``: at most N matching messages; the command receives None for "all"."""
    shown = "all" if default is None else str(default)

    def to_limit(_ctx: click.Context, _param: click.Parameter, value: int | None) -> int | None:
        return value or None

    return click.option(
        "--limit",
        type=click.IntRange(min=0),
        default=default,
        callback=to_limit,
        help=f"At most this many matching messages; 0 for all (default: {shown}).",
    )


def export_file(path: Path) -> Callable[[], Iterator[lib.DeadLetter]]:
    """A function reading the records of an export file from the start on each call.

    Each record is also checked to be publishable (its headers encodable), so a
    record that could not be replayed is reported as ``file:line: problem``.
    """

    from qworker.dlq.send import unpublishable  # publishing's modules: replay --from-file only

    def read() -> Iterator[lib.DeadLetter]:
        try:
            with path.open(encoding="utf-8") as lines:
                yield from lib.read_records(lines, str(path), check=unpublishable)
        except UnicodeDecodeError as exc:
            raise lib.BadRecord(f"{path}: not UTF-8 text ({exc.reason})") from None
        except OSError as exc:
            raise lib.BadRecord(f"cannot read {path}: {exc.strerror or exc}") from None

    return read
