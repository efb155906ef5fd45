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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Concatenate, ParamSpec
from urllib.parse import quote, urlencode

import jinja2
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.templating import Jinja2Templates

from qworker import headers as h
from qworker.console import paths, views
from qworker.console.errors import ConsoleError
from qworker.console.masking import masked_letter
from qworker.console.service import Console, GroupRow, filter_from

TEMPLATES_DIR = Path(__file__).parent / "templates"
STATIC_DIR = Path(__file__).parent / "static"
#: Messages listed per page of a group.
PAGE_SIZE = 50

#: The sortable columns of a DLQ's groups table: ``?sort=NAME`` or ``?sort=-NAME``.
SORT_KEYS: dict[str, Callable[[GroupRow], Any]] = {
    "fingerprint": lambda g: g.fingerprint,
    "count": lambda g: g.count,
    "reason": lambda g: g.reason or "",
    "error_type": lambda g: g.error_type or "",
    "handler": lambda g: g.handler or "",
    "error_code": lambda g: g.error_code or "",
    "first": lambda g: views.timestamp(g.first),
    "last": lambda g: views.timestamp(g.last),
}
DEFAULT_SORT = "-count"


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
        shown=views.shown,
        block=views.shown_block,
        q=views.segment,
        when=views.when,
        when_precise=views.when_precise,
        http_url=views.http_url,
        ago=views.ago,
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
    records = [masked_letter(dl) for dl in page.records]
    sample = next((dl for dl in records if dl.traceback), None)
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
            "messages": [views.listed(dl) for dl in records],
            "sample": sample,
            "export_query": urlencode({"fingerprint": fingerprint}),
            "crumbs": [(dlq, f"/dlqs/{views.segment(dlq)}"), (f"group {fingerprint}", None)],
        },
    )


@_page
async def message_page(request: Request, dlq: str, message_id: str) -> Response:
    """``/dlqs/{dlq}/messages/{message_id}``: one dead letter, all of it."""
    dl = masked_letter(await console_of(request).message(dlq, message_id))
    crumbs: list[tuple[str, str | None]] = [(dlq, f"/dlqs/{views.segment(dlq)}")]
    if dl.fingerprint:
        crumbs.append(
            (
                f"group {dl.fingerprint}",
                f"/dlqs/{views.segment(dlq)}/groups/{views.segment(dl.fingerprint)}",
            )
        )
    crumbs.append((f"message {message_id}", None))
    return _render(
        request,
        "message.html",
        {
            "dlq": dlq,
            "dl": dl,
            "message_id": message_id,
            "properties": [(k, views.value_text(v)) for k, v in dl.properties.items()],
            "headers": sorted(
                ((str(k), views.value_text(v)) for k, v in dl.headers.items()),
                key=lambda kv: (not kv[0].startswith(h.PREFIX), kv[0]),
            ),
            "timeline": views.timeline(dl.headers, dl),
            "deaths": views.deaths(dl.headers),
            "body": views.body_view(dl.body, dl.properties.get("content_type")),
            "crumbs": crumbs,
        },
    )


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
