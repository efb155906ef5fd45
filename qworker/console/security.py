"""Who may read and who may change: tokens, sessions, CSRF and the browser's protections.

The rules (:func:`decide`, a pure function with a table-driven test):

- **No token configured**: the console is read-only. Reads need nothing (binding
  beyond localhost prints a warning at start); every change is refused (403).
- **A token configured**: every request needs it, reads included: either
  ``Authorization: Bearer <token>`` (scripts, chat bots), or a session cookie
  obtained by posting the token to ``/login`` (the pages). A change made with a
  session must also carry the session's CSRF token in ``X-CSRF-Token``, because a
  browser sends cookies with requests other sites make it send. A bearer token is
  never sent by a browser on its own, so it needs no CSRF token.
- Any change whose ``Origin`` header names another site is refused, whatever it carries.

Tokens are compared in constant time (:func:`hmac.compare_digest`); a wrong login
costs a second, one at a time, so guessing is slow. Sessions live in this process
only (a restart logs everybody out) and expire after :data:`SESSION_HOURS`.

Every response carries a Content-Security-Policy without inline scripts or styles
and with ``frame-ancestors 'none'``, ``nosniff``, no referrer to other sites (``same-origin``:
under ``no-referrer`` browsers send ``Origin: null`` with a page's own posts, which the guard
refuses as cross-site), and ``no-store``:
dead letters are producer-controlled and may hold personal data, so they are
neither run nor cached.
"""

from __future__ import annotations

import asyncio
import enum
import hmac
import secrets
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = structlog.get_logger("qworker.console")

#: The session cookie's name.
COOKIE = "qworker_console"
#: The header that carries a session's CSRF token.
CSRF_HEADER = "x-csrf-token"
#: Sessions expire this many hours after login; at most :data:`MAX_SESSIONS` live at once.
SESSION_HOURS = 12
MAX_SESSIONS = 1000
#: A wrong token at /login costs this many seconds (logins are checked one at a time).
LOGIN_PENALTY = 1.0
#: The shortest token accepted at start.
MIN_TOKEN_LENGTH = 16
#: The largest login form read.
LOGIN_BYTES = 4096

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'self'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
]
_NO_STORE = (b"cache-control", b"no-store")
#: Pages open to everyone (besides /static/): logging in, and out (harmless, so no CSRF).
OPEN_PAGES = ("/login", "/logout")

READ_ONLY = (
    "the console is read-only: it was started without a token "
    "(set QWORKER_CONSOLE_TOKEN or --token-file to allow replay, edit and purge)"
)


class Decision(enum.Enum):
    """What :func:`decide` lets a request do."""

    ALLOW = "allow"
    LOGIN = "login"  #: a page read without credentials: go to /login
    UNAUTHORIZED = "unauthorized"  #: 401: credentials needed
    FORBIDDEN = "forbidden"  #: 403: these credentials may not do this


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a request carries, already checked against the console's token."""

    bearer: bool = False  #: a valid ``Authorization: Bearer`` token
    session: bool = False  #: a valid session cookie
    csrf: bool = False  #: the session's CSRF token in ``X-CSRF-Token``
    foreign_origin: bool = False  #: an ``Origin`` header naming another site


def decide(
    *, writes: bool, api: bool, open_path: bool, token_configured: bool, given: Credentials
) -> tuple[Decision, str]:
    """The rule for one request (see the module docstring) and the reason, for the answer.

    Args:
        writes: The request changes something (any method but GET, HEAD, OPTIONS).
        api: It is a JSON API request (``/api/...``): answer 401, never redirect.
        open_path: The login form or a page asset.
        token_configured: The console was started with a token.
        given: What the request carries.
    """
    if writes and given.foreign_origin:
        return Decision.FORBIDDEN, "cross-site request refused"
    if open_path:
        return Decision.ALLOW, ""
    authenticated = given.bearer or given.session
    if not writes:
        if not token_configured or authenticated:
            return Decision.ALLOW, ""
        if api:
            return Decision.UNAUTHORIZED, "send Authorization: Bearer <token>"
        return Decision.LOGIN, ""
    if not token_configured:
        return Decision.FORBIDDEN, READ_ONLY
    if given.bearer:
        return Decision.ALLOW, ""
    if given.session:
        if given.csrf:
            return Decision.ALLOW, ""
        return Decision.FORBIDDEN, "missing or wrong CSRF token (reload the page)"
    return Decision.UNAUTHORIZED, "log in, or send Authorization: Bearer <token>"


@dataclass(slots=True)
class Session:
    csrf: str
    expires: float


class Access:
    """The console's token and its live sessions.

    Args:
        token: The token that allows changes (None: read-only console).
    """

    def __init__(self, token: str | None) -> None:
        self._token = token.encode() if token else None
        self._sessions: dict[str, Session] = {}
        self._login_lock = asyncio.Lock()

    @property
    def token_configured(self) -> bool:
        return self._token is not None

    def token_matches(self, given: str) -> bool:
        """Constant-time comparison with the configured token (False without one)."""
        if self._token is None:
            return False
        return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self._token)

    async def login(self, given: str) -> tuple[str, Session] | None:
        """A new session for the right token; a wrong one waits :data:`LOGIN_PENALTY`."""
        async with self._login_lock:
            if not self.token_matches(given):
                await asyncio.sleep(LOGIN_PENALTY)
                return None
        self._expire()
        while len(self._sessions) >= MAX_SESSIONS:
            del self._sessions[next(iter(self._sessions))]
        session_id = secrets.token_urlsafe(32)
        session = Session(secrets.token_urlsafe(32), time.monotonic() + SESSION_HOURS * 3600)
        self._sessions[session_id] = session
        return session_id, session

    def session(self, session_id: str | None) -> Session | None:
        """The live session with this id, if any."""
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None or session.expires < time.monotonic():
            return None
        return session

    def logout(self, session_id: str | None) -> None:
        """End a session."""
        if session_id:
            self._sessions.pop(session_id, None)

    def _expire(self) -> None:
        now = time.monotonic()
        for session_id in [k for k, s in self._sessions.items() if s.expires < now]:
            del self._sessions[session_id]

    def credentials(self, headers: Headers, session: Session | None) -> Credentials:
        """Check what a request carries."""
        bearer = False
        authorization = headers.get("authorization", "")
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            bearer = self.token_matches(value.strip())
        csrf = session is not None and hmac.compare_digest(
            headers.get(CSRF_HEADER, "").encode("utf-8", "surrogateescape"), session.csrf.encode()
        )
        return Credentials(bearer, session is not None, csrf, _foreign(headers))


def _foreign(headers: Headers) -> bool:
    origin = headers.get("origin")
    if origin is None:
        return False
    if origin == "null":
        return True
    return urllib.parse.urlsplit(origin).netloc.lower() != headers.get("host", "").lower()


class Guard:
    """ASGI middleware: applies :func:`decide` and adds the security headers to every answer.

    It leaves ``request.state.can_write``, ``request.state.csrf`` (the session's CSRF
    token, for the pages' ``<meta>``) and ``request.state.token_configured`` for the
    routes, and ``request.state.session_id``.

    Args:
        app: The application it guards.
        access: The token and sessions.
    """

    def __init__(self, app: ASGIApp, access: Access) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        path = request.url.path
        session_id = request.cookies.get(COOKIE)
        session = self.access.session(session_id)
        given = self.access.credentials(request.headers, session)
        writes = request.method not in ("GET", "HEAD", "OPTIONS")
        api = path.startswith("/api/") or path == "/api"
        decision, reason = decide(
            writes=writes,
            api=api,
            open_path=path in OPEN_PAGES or path.startswith("/static/"),
            token_configured=self.access.token_configured,
            given=given,
        )
        state = scope.setdefault("state", {})
        state["token_configured"] = self.access.token_configured
        state["can_write"] = self.access.token_configured and (given.bearer or given.session)
        state["csrf"] = session.csrf if session is not None else None
        state["session_id"] = session_id if session is not None else None
        secured, started = _secured(send)
        if decision is Decision.ALLOW:
            try:
                await self.app(scope, receive, secured)
            except Exception:
                # Answered here, not by Starlette's outermost error middleware, so that
                # even a crash carries the security headers (and no traceback).
                log.exception("console.request_failed", path=path, method=request.method)
                if started():
                    raise
                crash: Response
                if api:
                    crash = JSONResponse({"error": "internal error (logged)"}, status_code=500)
                else:
                    crash = PlainTextResponse("internal error (logged)", status_code=500)
                await crash(scope, receive, secured)
            return
        response: Response
        if decision is Decision.LOGIN:
            target = path + (f"?{request.url.query}" if request.url.query else "")
            response = RedirectResponse(
                "/login?" + urllib.parse.urlencode({"next": target}), status_code=303
            )
        else:
            status = 401 if decision is Decision.UNAUTHORIZED else 403
            if api:
                response = JSONResponse({"error": reason}, status_code=status)
            else:
                response = PlainTextResponse(reason, status_code=status)
            if status == 401:
                response.headers["www-authenticate"] = 'Bearer realm="qworker console"'
        await response(scope, receive, secured)


def _secured(send: Send) -> tuple[Send, Callable[[], bool]]:
    """``send`` adding the security headers; and whether the answer has started."""
    sent = False

    def started() -> bool:
        return sent

    async def send_secured(message: Message) -> None:
        nonlocal sent
        if message["type"] == "http.response.start":
            sent = True
            headers = [
                (name, value)
                for name, value in message.get("headers", [])
                if name.lower() != b"cache-control"
            ]
            message = {**message, "headers": [*headers, *SECURITY_HEADERS, _NO_STORE]}
        await send(message)

    return send_secured, started


def safe_next(target: str | None) -> str:
    """Where to go after login: a path of this console only (never another site)."""
    if (
        not target
        or not target.startswith("/")
        or target.startswith("//")
        or "\\" in target
        or any(ord(c) < 32 for c in target)
    ):
        return "/"
    return target


async def login(request: Request) -> Response:
    """``POST /login`` (form: ``token``, ``next``): a session cookie, then back to ``next``."""
    access: Access = request.app.state.access
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > LOGIN_BYTES:
            return PlainTextResponse("login form too large", status_code=413)
    form = urllib.parse.parse_qs(raw.decode("utf-8", "replace"), max_num_fields=4)
    token = form.get("token", [""])[0]
    target = safe_next(form.get("next", ["/"])[0])
    if not access.token_configured:
        return PlainTextResponse(READ_ONLY, status_code=403)
    made = await access.login(token)
    if made is None:
        return RedirectResponse(
            "/login?" + urllib.parse.urlencode({"next": target, "failed": "1"}), status_code=303
        )
    session_id, _ = made
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        COOKIE,
        session_id,
        max_age=SESSION_HOURS * 3600,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return response


async def logout(request: Request) -> Response:
    """``POST /logout``: end the session."""
    access: Access = request.app.state.access
    access.logout(request.cookies.get(COOKIE))
    response = RedirectResponse("/", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


def state_of(request: Request) -> dict[str, Any]:
    """What :class:`Guard` left for the routes (for the pages' templates)."""
    return {
        "can_write": bool(getattr(request.state, "can_write", False)),
        "csrf": getattr(request.state, "csrf", None),
        "token_configured": bool(getattr(request.state, "token_configured", False)),
    }
