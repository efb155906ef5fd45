"""The console's HTML pages: server-rendered with Jinja2, every value escaped.

Each page reads through the one :class:`qworker.console.service.Console` at
``request.app.state.console`` (so browsing goes through ``qworker.dlq`` and never
removes a message) and renders a template of ``templates/``. Actions (replay,
purge, edit) are not here: the page's script calls the JSON API with the
session's CSRF token, read from ``<meta name="csrf-token">``.

Dead letters are producer-controlled. Autoescaping is on for every template and
nothing from a dead letter is marked safe; on top of that, texts are shown with
control and invisible format characters (bidi overrides, zero-width) escaped
(:func:`qworker.redact.escape_control`), a runbook becomes a link only when it
is an ``http``/``https`` URL, and path segments are percent-encoded. The
Content-Security-Policy (no inline script or style) is set by
:mod:`qworker.console.security`; the templates contain neither.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Concatenate, ParamSpec
from urllib.parse import quote, urlencode, urlsplit

import jinja2
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.templating import Jinja2Templates

from qworker import headers as h
from qworker.console import paths
from qworker.console.errors import ConsoleError
from qworker.console.service import Console, GroupRow, filter_from
from qworker.dlq import DeadLetter
from qworker.dlq.jsonl import jsonable
from qworker.dlq.records import parse_time
from qworker.redact import escape_control

TEMPLATES_DIR = Path(__file__).parent / "templates"
STATIC_DIR = Path(__file__).parent / "static"
#: Messages listed per page of a group.
PAGE_SIZE = 50
#: Bytes of a body shown (pretty-printed, as text or as hex); the export has all of it.
BODY_SHOWN = 256 * 1024
HEX_SHOWN = 16 * 1024
#: Characters of a header value shown in the headers table.
HEADER_SHOWN = 16 * 1024

#: The sortable columns of a DLQ's groups table: ``?sort=NAME`` or ``?sort=-NAME``.
SORT_KEYS: dict[str, Callable[[GroupRow], Any]] = {
    "fingerprint": lambda g: g.fingerprint,
    "count": lambda g: g.count,
    "reason": lambda g: g.reason or "",
    "error_type": lambda g: g.error_type or "",
    "handler": lambda g: g.handler or "",
    "error_code": lambda g: g.error_code or "",
    "first": lambda g: _timestamp(g.first),
    "last": lambda g: _timestamp(g.last),
}
DEFAULT_SORT = "-count"


# Filters of the template environment. Each returns a plain str, which autoescaping
# then escapes: none returns Markup.


def shown(value: object) -> str:
    """One line of producer-controlled text: control and format characters escaped."""
    if value is None:
        return ""
    return escape_control(value if isinstance(value, str) else str(value))


def shown_block(value: object) -> str:
    """Multi-line producer-controlled text (tracebacks, bodies): newlines kept."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else str(value)
    return escape_control(text.replace("\r\n", "\n"), keep_newlines=True)


def segment(value: object) -> str:
    """``value`` as one percent-encoded URL path segment (a queue name, a message id)."""
    return quote(str(value).encode("utf-8", "surrogateescape"), safe="")


def when(value: datetime | None) -> str:
    """A time in UTC, ISO 8601 to the second (``2024-05-01T01:12:09Z``); ``-`` for none."""
    if value is None:
        return "-"
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def http_url(value: object) -> str | None:
    """``value`` when it is an absolute http(s) URL fit for a link; None for anything else
    (``javascript:``, ``data:``, relative links, control characters, over 2 KiB)."""
    if not isinstance(value, str) or len(value) > 2048 or escape_control(value) != value:
        return None
    if any(c.isspace() for c in value):
        return None
    try:
        parts = urlsplit(value)
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        return None
    return value


def environment() -> jinja2.Environment:
    """The template environment: autoescaping on for every template, whatever its name."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        shown=shown,
        block=shown_block,
        q=segment,
        when=when,
        when_precise=when_precise,
        http_url=http_url,
        ago=_ago,
    )
    env.globals["static"] = _static_url
    return env


def _static_url(name: str) -> str:
    """``/static/NAME?v=HASH``: a new file is a new URL, so no browser keeps a stale script."""
    return f"/static/{quote(name)}?v={_version(name)}"


_versions: dict[str, str] = {}


def _version(name: str) -> str:
    if name not in _versions:
        try:
            data = (STATIC_DIR / name).read_bytes()
        except OSError:
            data = b""
        _versions[name] = hashlib.sha256(data).hexdigest()[:10]
    return _versions[name]


def _timestamp(value: datetime | None) -> float:
    return value.timestamp() if value is not None else -math.inf


def _ago(value: datetime | None) -> str:
    """How long before now, roughly (``3m``, ``2h05m``, ``4d``)."""
    if value is None:
        return ""
    seconds = max(0, int((datetime.now(UTC) - value).total_seconds()))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d"


# What every page needs to know about the session.


@dataclass(frozen=True, slots=True)
class Session:
    """Whether write actions work for this request, and why not."""

    can_write: bool
    csrf: str
    token_configured: bool
    path: str

    @property
    def why_read_only(self) -> str:
        if self.can_write:
            return ""
        if not self.token_configured:
            return (
                "Read-only: this console was started without a token. Start it with "
                "--token-file FILE (or QWORKER_CONSOLE_TOKEN) to replay, edit and purge."
            )
        return "Read-only until you log in with the console's token."


def session_of(request: Request) -> Session:
    """The request's session as :mod:`qworker.console.security` left it in ``request.state``."""
    state = request.state
    csrf = getattr(state, "csrf", None)
    return Session(
        can_write=bool(getattr(state, "can_write", False)),
        csrf=csrf if isinstance(csrf, str) else "",
        token_configured=bool(getattr(state, "token_configured", False)),
        path=request.url.path,
    )


def console_of(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


def _render(
    request: Request, name: str, context: dict[str, Any], status_code: int = 200
) -> Response:
    context.setdefault("crumbs", [])
    return templates.TemplateResponse(
        request,
        name,
        {"session": session_of(request), **context},
        status_code=status_code,
        headers={"Cache-Control": "no-store"},
    )


P = ParamSpec("P")


def _page(
    handler: Callable[Concatenate[Request, P], Awaitable[Response]],
) -> Callable[Concatenate[Request, P], Awaitable[Response]]:
    """Render a :class:`ConsoleError` raised by ``handler`` as the error page, with its status."""

    async def page(request: Request, /, *args: P.args, **kwargs: P.kwargs) -> Response:
        try:
            return await handler(request, *args, **kwargs)
        except ConsoleError as exc:
            status = int(getattr(exc, "status", 500))
            return _render(
                request, "error.html", {"status": status, "message": str(exc)}, status_code=status
            )

    page.__name__ = handler.__name__
    page.__doc__ = handler.__doc__
    return page


# The pages.


@_page
async def overview(request: Request) -> Response:
    """``/``: every DLQ with its depth, oldest failure, top groups and when it was scanned."""
    dlqs = await console_of(request).overview()
    return _render(request, "overview.html", {"dlqs": dlqs})


@_page
async def dlq_page(request: Request, dlq: str) -> Response:
    """``/dlqs/{dlq}``: the failure groups of one DLQ, sorted by ``?sort=``."""
    rescan = request.query_params.get("rescan") in ("1", "true", "yes")
    scan = await console_of(request).scan(dlq, rescan=rescan)
    sort = request.query_params.get("sort", DEFAULT_SORT)
    column = sort.removeprefix("-")
    if column not in SORT_KEYS:
        sort, column = DEFAULT_SORT, DEFAULT_SORT.removeprefix("-")
    descending = sort.startswith("-")
    groups = sorted(scan.groups, key=lambda g: g.fingerprint)
    groups.sort(key=SORT_KEYS[column], reverse=descending)
    return _render(
        request,
        "dlq.html",
        {
            "dlq": dlq,
            "scan": scan,
            "groups": groups,
            "sort": sort,
            "columns": _columns(column, descending),
            "crumbs": [(dlq, None)],
        },
    )


def _columns(column: str, descending: bool) -> list[dict[str, str]]:
    """The groups table's headers: label, the ``?sort=`` its link sets, and its aria-sort."""
    labels = {
        "fingerprint": "Group",
        "count": "Count",
        "reason": "Reason",
        "error_type": "Error type",
        "handler": "Handler",
        "error_code": "Code",
        "first": "First failure",
        "last": "Last failure",
    }
    columns = []
    for key, label in labels.items():
        active = key == column
        # Counts and times read best largest/newest first; texts A to Z.
        first = f"-{key}" if key in ("count", "first", "last") else key
        flipped = key if descending else f"-{key}"
        columns.append(
            {
                "key": key,
                "label": label,
                "sort": flipped if active else first,
                "aria": ("descending" if descending else "ascending") if active else "none",
                "mark": ("\u25bc" if descending else "\u25b2") if active else "",
            }
        )
    return columns


@_page
async def group_page(request: Request, dlq: str, fingerprint: str) -> Response:
    """``/dlqs/{dlq}/groups/{fingerprint}``: the group's messages, a page at a time."""
    try:
        number = max(1, min(int(request.query_params.get("page", "1")), 1_000_000))
    except ValueError:
        number = 1
    console = console_of(request)
    scan = await console.scan(dlq)
    rows = [g for g in scan.groups if g.fingerprint == fingerprint]
    chosen = filter_from({"fingerprint": fingerprint})
    page = await console.messages(dlq, chosen, limit=PAGE_SIZE, offset=(number - 1) * PAGE_SIZE)
    sample = next((dl for dl in page.records if dl.traceback), None)
    return _render(
        request,
        "group.html",
        {
            "dlq": dlq,
            "fingerprint": fingerprint,
            "rows": rows,
            "count": sum(g.count for g in rows),
            "scan": scan,
            "page": page,
            "number": number,
            "first_index": (number - 1) * PAGE_SIZE,
            "messages": [_listed(dl) for dl in page.records],
            "sample": sample,
            "export_query": urlencode({"fingerprint": fingerprint}),
            "crumbs": [(dlq, f"/dlqs/{segment(dlq)}"), (f"group {fingerprint}", None)],
        },
    )


def _listed(dl: DeadLetter) -> dict[str, Any]:
    """One row of a group's message list."""
    return {
        "id": dl.message_id,
        "failed_at": dl.failed_at,
        "reason": dl.reason,
        "attempt": dl.attempt,
        "replay_count": dl.replay_count,
        "error": dl.summary_line(),
        "body": _preview(dl.body),
    }


def _preview(body: bytes, limit: int = 80) -> str:
    try:
        text = body[: limit * 4].decode("utf-8")
    except UnicodeDecodeError:
        return f"({len(body)} bytes, binary)"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


@_page
async def message_page(request: Request, dlq: str, message_id: str) -> Response:
    """``/dlqs/{dlq}/messages/{message_id}``: one dead letter, all of it."""
    dl = await console_of(request).message(dlq, message_id)
    crumbs: list[tuple[str, str | None]] = [(dlq, f"/dlqs/{segment(dlq)}")]
    if dl.fingerprint:
        crumbs.append(
            (f"group {dl.fingerprint}", f"/dlqs/{segment(dlq)}/groups/{segment(dl.fingerprint)}")
        )
    crumbs.append((f"message {message_id}", None))
    return _render(
        request,
        "message.html",
        {
            "dlq": dlq,
            "dl": dl,
            "message_id": message_id,
            "properties": [(k, _value_text(v)) for k, v in dl.properties.items()],
            "headers": sorted(
                ((str(k), _value_text(v)) for k, v in dl.headers.items()),
                key=lambda kv: (not kv[0].startswith(h.PREFIX), kv[0]),
            ),
            "timeline": timeline(dl.headers, dl),
            "deaths": deaths(dl.headers),
            "body": body_view(dl.body, dl.properties.get("content_type")),
            "crumbs": crumbs,
        },
    )


def _value_text(value: Any) -> str:
    """A property or header value as text: strings as they are, the rest as JSON."""
    plain = jsonable(value)
    if isinstance(plain, str):
        text = plain
    else:
        text = json.dumps(plain, ensure_ascii=False, indent=1, default=str)
    if len(text) > HEADER_SHOWN:
        text = text[:HEADER_SHOWN] + f"\u2026 ({len(text) - HEADER_SHOWN} more characters)"
    return text


@dataclass(frozen=True, slots=True)
class Moment:
    """One entry of a message's failure timeline; ``at`` is None when unreadable."""

    at: datetime | None
    kind: str  # "failure", "last" (dead-lettered), "replayed"
    title: str
    detail: str


#: Same instant: the attempt fails, then the message is dead-lettered, then replayed.
_KIND_ORDER = {"failure": 0, "last": 1, "replayed": 2}


def timeline(headers: Mapping[str, Any], dl: DeadLetter) -> list[Moment]:
    """The failure history (``x-qworker-history``), the last replay and the dead-lettering,
    oldest first (entries without a readable time first). The broker's own history is
    apart (:func:`deaths`): it records whole seconds, too coarse to interleave."""
    moments: list[Moment] = []
    for failure in h.read_history(headers):
        moments.append(
            Moment(
                parse_time(failure.at),
                "failure",
                f"attempt {failure.attempt} failed: {failure.error_type or '-'}",
                failure.error_message,
            )
        )
    if replayed := h.read_time(headers, h.REPLAYED_AT):
        count = h.read_int(headers, h.REPLAY_COUNT)
        replay_id = h.read_str(headers, h.REPLAY_ID) or ""
        moments.append(
            Moment(
                parse_time(replayed),
                "replayed",
                f"replayed (replay number {count})",
                f"replay id {replay_id}" if replay_id else "",
            )
        )
    if dl.failed_at is not None and not dl.from_broker:
        moments.append(
            Moment(
                dl.failed_at,
                "last",
                f"dead-lettered: {dl.reason}",
                f"{dl.error_type or '-'} after {dl.attempt} attempt(s)",
            )
        )
    return sorted(
        moments,
        key=lambda m: (m.at is not None, _timestamp(m.at), _KIND_ORDER.get(m.kind, 9)),
    )


@dataclass(frozen=True, slots=True)
class Death:
    """One entry of the broker's dead-letter history of a message."""

    queue: str
    reason: str
    count: int
    last: datetime | None
    exchange: str


def deaths(headers: Mapping[str, Any]) -> list[Death]:
    """The broker's history (``x-qworker-deaths`` merged with ``x-death``), newest first."""
    found = []
    for entry in h.read_deaths(headers):
        count = entry.get("count", 1)
        exchange = entry.get("exchange", "")
        found.append(
            Death(
                str(entry.get("queue", "")),
                str(entry.get("reason", "")),
                count if isinstance(count, int) else 1,
                parse_time(entry.get("time")),
                exchange if isinstance(exchange, str) else "",
            )
        )
    return found


def when_precise(value: datetime | None) -> str:
    """A time in UTC, ISO 8601 with milliseconds when it has them; ``-`` for none."""
    if value is None:
        return "-"
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    value = value.astimezone(UTC)
    if value.microsecond:
        return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class BodyView:
    """A body as shown: pretty JSON, UTF-8 text, or a hex dump; and whether it can be edited."""

    kind: str  # "json", "text", "binary"
    size: int
    text: str  # pretty JSON or the text; for a binary body its lenient UTF-8 reading
    hex: str
    editable: str | None  # the body as text for the edit box; None when it is not UTF-8
    cut: bool


def body_view(body: bytes, content_type: object = None) -> BodyView:
    """How a body is shown: JSON pretty-printed, else UTF-8 text, else hex (with a text column)."""
    head = body[:BODY_SHOWN]
    cut = len(body) > BODY_SHOWN
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return BodyView(
            "binary",
            len(body),
            head.decode("utf-8", "replace"),
            hexdump(body[:HEX_SHOWN]),
            None,
            len(body) > HEX_SHOWN,
        )
    try:
        parsed = json.loads(text) if text.strip() else None
    except (ValueError, RecursionError):
        parsed = None
    if parsed is not None and not cut:
        pretty = json.dumps(parsed, ensure_ascii=False, indent=2)
        return BodyView("json", len(body), pretty, "", text, False)
    return BodyView("text", len(body), text[:BODY_SHOWN], "", text, cut)


def hexdump(data: bytes) -> str:
    """``00000000  7b 22 6e ...  |{"n...|``, 16 bytes a line."""
    lines = []
    for start in range(0, len(data), 16):
        chunk = data[start : start + 16]
        hexes = " ".join(f"{b:02x}" for b in chunk)
        text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in chunk)
        lines.append(f"{start:08x}  {hexes:<47}  |{text}|")
    return "\n".join(lines)


async def login_page(request: Request) -> Response:
    """``/login``: the token form (``POST /login`` is :mod:`qworker.console.security`'s)."""
    target = request.query_params.get("next", "/")
    if not target.startswith("/") or target.startswith("//"):
        target = "/"
    failed = request.query_params.get("failed") is not None
    return _render(request, "login.html", {"next": target, "failed": failed})


#: The templates, with :func:`environment` (made once every filter above exists).
templates = Jinja2Templates(env=environment())


def routes() -> Sequence[BaseRoute]:
    """The page routes, for :func:`qworker.console.web.create_app` (static files are
    mounted there from :data:`STATIC_DIR`). Parameters are ``{name:segment}``
    (:mod:`qworker.console.paths`: a ``%2F`` inside a queue name or message id stays
    inside it)."""
    paths.install()
    return [
        Route("/", overview, methods=["GET"], name="overview"),
        Route("/login", login_page, methods=["GET"], name="login"),
        Route("/dlqs/{dlq:segment}", _params(dlq_page), methods=["GET"], name="dlq"),
        Route(
            "/dlqs/{dlq:segment}/groups/{fingerprint:segment}",
            _params(group_page),
            methods=["GET"],
            name="group",
        ),
        Route(
            "/dlqs/{dlq:segment}/messages/{message_id:segment}",
            _params(message_page),
            methods=["GET"],
            name="message",
        ),
    ]


def _params(
    handler: Callable[..., Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """A route endpoint calling ``handler(request, **path_params)``."""

    async def endpoint(request: Request) -> Response:
        return await handler(request, **request.path_params)

    endpoint.__name__ = handler.__name__
    return endpoint
