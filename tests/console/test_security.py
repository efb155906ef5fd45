"""Who may read and who may change, through the whole ASGI app: token, bearer, login
sessions with CSRF tokens, cross-site requests, and the security headers on every answer.

These requests never reach the broker: reads ask for the OpenAPI description or a job that
does not exist (404), and changes carry a body the API refuses (400) once the guard has let
them through. So "allowed" is a 400/404 and "refused" a 401/403, and the console points at
a closed port.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.parse

import httpx
import pytest

from qworker.console import api, security
from qworker.console.security import COOKIE, CSRF_HEADER, LOGIN_PENALTY, READ_ONLY
from qworker.console.service import Console
from qworker.console.web import STATIC
from tests.console.conftest import BASE_URL, ConsoleUnderTest, MakeConsole

TOKEN = "security-test-token-0123456789abcdef"
NOWHERE = ["amqp://guest:guest@127.0.0.1:1/"]
#: A read the guard decides on without the broker: allowed -> 404, refused -> 401.
READ = "/api/jobs/0000000000000000"
#: A change the API refuses once let through: allowed -> 400, refused -> 401/403.
WRITE = "/api/dlqs/orders.dlq/replay"
REFUSED_BODY = {"bogus": True}


def write_paths() -> list[str]:
    """Every API route that changes something, with its parameters filled in."""
    found = []
    for route in api.routes:
        if "POST" in (route.methods or ()):
            found.append(re.sub(r"\{[^}]+\}", "x", route.path))
    return found


async def with_token(make_console: MakeConsole, token: str | None = TOKEN) -> ConsoleUnderTest:
    return await make_console(token=token, urls=NOWHERE)


async def log_in(c: ConsoleUnderTest, token: str = TOKEN, next_: str = "/") -> httpx.Response:
    return await c.client.post("/login", data={"token": token, "next": next_})


def csrf_of(c: ConsoleUnderTest) -> str:
    session = c.access.session(c.client.cookies.get(COOKIE))
    assert session is not None, "not logged in"
    return session.csrf


# No token configured: read-only


async def test_without_a_token_reads_are_open_and_every_write_is_refused(
    make_console: MakeConsole,
) -> None:
    """Reads need nothing; every change (each POST route of the API) answers 403 with the
    read-only sentence, whatever it carries; /login too."""
    c = await with_token(make_console, None)
    assert (await c.client.get("/api/openapi.json")).status_code == 200
    assert (await c.client.get(READ)).status_code == 404
    assert len(write_paths()) == 3
    for path in write_paths():
        for headers in ({}, {"authorization": f"Bearer {TOKEN}"}):
            answer = await c.client.post(path, json={"confirm": "x"}, headers=headers)
            assert answer.status_code == 403, (path, answer.text)
            assert answer.json() == {"error": READ_ONLY}
    login = await log_in(c)
    assert (login.status_code, login.text) == (403, READ_ONLY)
    assert COOKIE not in c.client.cookies


# A token configured


async def test_with_a_token_reads_need_it_too(make_console: MakeConsole) -> None:
    """No credentials: API 401 with WWW-Authenticate, a page redirects to the login form
    (keeping where it was going); a bearer token in any case of ``Bearer`` works; a wrong one,
    another scheme or a non-ASCII one is a 401."""
    c = await with_token(make_console)
    bare = await c.client.get(READ)
    assert bare.status_code == 401
    assert bare.json() == {"error": "send Authorization: Bearer <token>"}
    assert bare.headers["www-authenticate"] == 'Bearer realm="qworker console"'
    page = await c.client.get("/dlqs/orders.dlq?sort=count")
    assert page.status_code == 303
    assert page.headers["location"] == "/login?" + urllib.parse.urlencode(
        {"next": "/dlqs/orders.dlq?sort=count"}
    )
    for scheme in ("Bearer", "bearer", "BEARER"):
        ok = await c.client.get(READ, headers={"authorization": f"{scheme} {TOKEN}"})
        assert ok.status_code == 404, scheme
    authorization: str | bytes
    for authorization in (
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN[:-1]}",
        f"Basic {TOKEN}",
        "Bearer",
        "Bearer \u00e9\u00e9\u00e9".encode(),  # UTF-8 bytes on the wire
    ):
        raw = authorization if isinstance(authorization, bytes) else authorization.encode()
        wrong = await c.client.get(READ, headers={b"authorization": raw})
        assert wrong.status_code == 401, authorization


async def test_with_a_token_writes_need_the_bearer(make_console: MakeConsole) -> None:
    """A change with the bearer token passes the guard; without it 401, with a wrong one 401."""
    c = await with_token(make_console)
    allowed = await c.client.post(WRITE, json=REFUSED_BODY, headers=c.bearer)
    assert allowed.status_code == 400 and "unknown field 'bogus'" in allowed.json()["error"]
    for headers in ({}, {"authorization": "Bearer not-the-token-0123456789"}):
        refused = await c.client.post(WRITE, json=REFUSED_BODY, headers=headers)
        assert refused.status_code == 401, headers
        assert refused.json() == {"error": "log in, or send Authorization: Bearer <token>"}


async def test_a_session_reads_and_writes_with_its_csrf_token(make_console: MakeConsole) -> None:
    """POST /login (form) sets an HttpOnly, SameSite=Strict session cookie and goes to
    ``next``; the session reads; it changes only with its CSRF token in X-CSRF-Token;
    /logout ends it."""
    c = await with_token(make_console)
    login = await log_in(c, next_="/api/openapi.json")
    assert login.status_code == 303
    assert login.headers["location"] == "/api/openapi.json"
    cookie = login.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert "Max-Age=43200" in cookie
    assert (await c.client.get(READ)).status_code == 404
    no_csrf = await c.client.post(WRITE, json=REFUSED_BODY)
    assert no_csrf.status_code == 403
    assert no_csrf.json() == {"error": "missing or wrong CSRF token (reload the page)"}
    wrong = await c.client.post(WRITE, json=REFUSED_BODY, headers={CSRF_HEADER: "nope"})
    assert wrong.status_code == 403
    csrf = csrf_of(c)
    allowed = await c.client.post(WRITE, json=REFUSED_BODY, headers={CSRF_HEADER: csrf})
    assert allowed.status_code == 400, allowed.text

    logout = await c.client.post("/logout")
    assert logout.status_code == 303 and logout.headers["location"] == "/"
    assert COOKIE not in c.client.cookies
    assert (await c.client.get(READ)).status_code == 401


async def test_a_stolen_csrf_token_without_the_session_is_not_enough(
    make_console: MakeConsole,
) -> None:
    """The CSRF token alone (no session cookie), or another session's token: refused."""
    c = await with_token(make_console)
    await log_in(c)
    csrf = csrf_of(c)
    c.client.cookies.clear()
    alone = await c.client.post(WRITE, json=REFUSED_BODY, headers={CSRF_HEADER: csrf})
    assert alone.status_code == 401
    await log_in(c)
    assert csrf_of(c) != csrf
    other = await c.client.post(WRITE, json=REFUSED_BODY, headers={CSRF_HEADER: csrf})
    assert other.status_code == 403


async def test_cross_site_changes_are_refused_whatever_they_carry(
    make_console: MakeConsole,
) -> None:
    """An ``Origin`` naming another site (or ``null``) on a change: 403, even with the bearer
    token or a session and its CSRF token, and on /login (no login CSRF). Same-site changes
    and cross-site reads pass."""
    c = await with_token(make_console)
    await log_in(c)
    csrf = csrf_of(c)
    for origin in (
        "http://evil.example",
        "null",
        "http://console.test:9999",
        "https://console.test.evil",
    ):
        for headers in (c.bearer, {CSRF_HEADER: csrf}):
            answer = await c.client.post(
                WRITE, json=REFUSED_BODY, headers={**headers, "origin": origin}
            )
            assert answer.status_code == 403, (origin, headers)
            assert answer.json() == {"error": "cross-site request refused"}
        login = await c.client.post(
            "/login", data={"token": TOKEN, "next": "/"}, headers={"origin": origin}
        )
        assert login.status_code == 403 and login.text == "cross-site request refused"
    same = await c.client.post(WRITE, json=REFUSED_BODY, headers={**c.bearer, "origin": BASE_URL})
    assert same.status_code == 400
    read = await c.client.get(READ, headers={**c.bearer, "origin": "http://evil.example"})
    assert read.status_code == 404


async def test_a_wrong_login_redirects_with_failed_and_costs_the_penalty(
    make_console: MakeConsole,
) -> None:
    """A wrong token at /login: back to the form with ``failed=1``, no cookie, after
    :data:`LOGIN_PENALTY` seconds."""
    c = await with_token(make_console)
    began = time.monotonic()
    answer = await log_in(c, token="wrong-token-0123456789abcdef", next_="/dlqs/a%2Fb")
    took = time.monotonic() - began
    assert answer.status_code == 303
    assert answer.headers["location"] == "/login?" + urllib.parse.urlencode(
        {"next": "/dlqs/a%2Fb", "failed": "1"}
    )
    assert "set-cookie" not in answer.headers and COOKIE not in c.client.cookies
    assert took >= LOGIN_PENALTY * 0.95, took


async def test_wrong_logins_are_checked_one_at_a_time(
    make_console: MakeConsole, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guessing in parallel does not help: 4 wrong logins at once take 4 penalties."""
    monkeypatch.setattr(security, "LOGIN_PENALTY", 0.15)
    c = await with_token(make_console)
    began = time.monotonic()
    answers = await asyncio.gather(*(log_in(c, token=f"guess-{i}" * 4) for i in range(4)))
    took = time.monotonic() - began
    assert all(a.headers["location"].endswith("failed=1") for a in answers)
    assert took >= 4 * 0.15 * 0.95, took


@pytest.mark.parametrize(
    ("next_", "location"),
    [
        ("//evil.example/", "/"),
        ("https://evil.example/dlqs", "/"),
        ("/\\evil.example", "/"),
        ("javascript:alert(1)", "/"),
        ("/\r\nSet-Cookie: x=y", "/"),
        ("/dlqs/eu%2Forders.dlq", "/dlqs/eu%2Forders.dlq"),
    ],
)
async def test_next_cannot_leave_the_console(
    make_console: MakeConsole, next_: str, location: str
) -> None:
    """After a login (right or wrong), the browser is sent to a path of this console only."""
    c = await with_token(make_console)
    right = await log_in(c, next_=next_)
    assert right.headers["location"] == location
    query = urllib.parse.parse_qs(right.headers["location"].partition("?")[2])
    assert not query.get("next")


async def test_a_login_form_over_4_kib_is_413(make_console: MakeConsole) -> None:
    """The login form is read up to 4 KiB; more is refused without checking the token."""
    c = await with_token(make_console)
    answer = await c.client.post("/login", data={"token": TOKEN, "next": "/" + "x" * 5000})
    assert answer.status_code == 413
    assert COOKIE not in c.client.cookies


# Security headers


def assert_secured(answer: httpx.Response, what: str) -> None:
    csp = answer.headers.get("content-security-policy", "")
    assert csp, (what, dict(answer.headers))
    assert "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp, what
    assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp, what
    assert "object-src 'none'" in csp, what
    assert answer.headers.get("x-content-type-options") == "nosniff", what
    assert answer.headers.get("x-frame-options") == "DENY", what
    assert answer.headers.get("referrer-policy") == "same-origin", what
    assert answer.headers.get_list("cache-control") == ["no-store"], what


async def test_security_headers_on_every_kind_of_answer(make_console: MakeConsole) -> None:
    """CSP without inline scripts, frame-ancestors 'none', nosniff, no referrer and no-store
    on API answers, API errors, the guard's refusals and redirects, static files (their own
    caching headers replaced), unknown routes and the login form."""
    open_console = await with_token(make_console, None)
    locked = await with_token(make_console)
    asset = sorted(p.name for p in STATIC.iterdir() if p.is_file())[0]
    answers = {
        "API 200": await open_console.client.get("/api/openapi.json"),
        "API 404": await open_console.client.get(READ),
        "API 400": await locked.client.post(WRITE, json=REFUSED_BODY, headers=locked.bearer),
        "guard 403": await open_console.client.post(WRITE, json=REFUSED_BODY),
        "guard 401": await locked.client.get(READ),
        "guard 303": await locked.client.get("/"),
        "static file": await locked.client.get(f"/static/{asset}"),
        "static 404": await locked.client.get("/static/no-such-file.js"),
        "no route": await open_console.client.get("/api/no/such/route"),
        "login 303": await log_in(locked),
        "login 413": await locked.client.post("/login", data={"token": "x" * 5000}),
        "wrong method": await open_console.client.get("/api/dlqs/x/replay"),
    }
    assert answers["static file"].status_code == 200
    assert answers["wrong method"].status_code == 405
    for what, answer in answers.items():
        assert_secured(answer, what)


async def test_security_headers_on_a_500(
    make_console: MakeConsole, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even an answer to a bug (500) is not cached and carries the CSP."""

    async def broken(self: Console) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Console, "overview", broken)
    c = await with_token(make_console, None)
    answer = await c.client.get("/api/dlqs")
    assert answer.status_code == 500
    assert "a bug" not in answer.text  # no traceback or message leaks
    assert_secured(answer, "500")
