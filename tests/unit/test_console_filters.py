"""The console's pure decisions, table-driven: what an API request asks for, and who may.

- :func:`filter_from`: a JSON object or query parameters -> :class:`qworker.dlq.Filter`.
- :func:`replay_options`: a replay request -> :class:`qworker.dlq.ReplayOptions`.
- :func:`edited_body`: an edit request -> the new body's bytes.
- :func:`check_queue_name`: names no queue can have, refused before the broker is asked.
- :func:`safe_next`: where a login may send the browser (this console only).
- :func:`is_local`: whether ``--host`` is reachable from this machine only.
- :func:`decide` and :meth:`Access.credentials`: who may read and who may change.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from starlette.datastructures import Headers

from qworker import dlq as lib
from qworker.cli.console import is_local
from qworker.console.api import MAX_CANARY, MAX_RATE, edited_body, replay_options
from qworker.console.errors import Invalid
from qworker.console.security import (
    CSRF_HEADER,
    READ_ONLY,
    Access,
    Credentials,
    Decision,
    Session,
    decide,
    safe_next,
)
from qworker.console.service import FILTER_KEYS, check_queue_name, filter_from

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
T1 = datetime(2026, 11, 2, 12, 0, tzinfo=UTC)


# filter_from


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (None, lib.Filter()),
        ({}, lib.Filter()),
        ({"error_type": "KeyError"}, lib.Filter(error_type="KeyError")),
        ({"reason": "timeout"}, lib.Filter(reason="timeout")),
        ({"reason": "unknown"}, lib.Filter(reason="unknown")),
        ({"handler": "billing:charge"}, lib.Filter(handler="billing:charge")),
        ({"message_id": "inv/2024/17"}, lib.Filter(message_id="inv/2024/17")),
        ({"grep": "customer 42"}, lib.Filter(grep="customer 42")),
        ({"error_code": "PAYMENT_DECLINED"}, lib.Filter(error_code="PAYMENT_DECLINED")),
        ({"fingerprint": "ABCDEF12"}, lib.Filter(fingerprint="abcdef12")),
        ({"fingerprint": "0123456789ab"}, lib.Filter(fingerprint="0123456789ab")),
        (
            {"since": "2026-11-01T12:00:00Z", "until": "2026-11-02T12:00:00+00:00"},
            lib.Filter(since=T0, until=T1),
        ),
        # An empty form field or a JSON null means "any".
        ({"reason": "", "error_type": None, "grep": ""}, lib.Filter()),
        ({key: "" for key in FILTER_KEYS}, lib.Filter()),
    ],
    ids=lambda value: repr(value)[:60],
)
def test_filter_from_builds_the_cli_filter(given: Any, expected: lib.Filter) -> None:
    """Each key is the CLI option of the same name; empty and null values are unset."""
    assert filter_from(given) == expected


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ({"bogus": "x"}, "unknown filter key 'bogus'; known keys: fingerprint"),
        ({"error-type": "KeyError"}, "unknown filter key 'error-type'"),
        ({"reason": 5}, "filter reason must be text, not int"),
        ({"since": ["1h"]}, "filter since must be text, not list"),
        ({"grep": True}, "filter grep must be text, not bool"),
        ({"reason": "nope"}, "unknown reason 'nope'"),
        ({"fingerprint": "abc"}, "fingerprint 'abc': give at least 6"),
        ({"fingerprint": "zzzzzzzz"}, "fingerprint 'zzzzzzzz'"),
        ({"error_code": "not a code!"}, "error_code 'not a code!' cannot match"),
        ({"since": "yesterday-ish"}, "cannot read time 'yesterday-ish'"),
        (
            {"since": "2026-11-02T00:00:00Z", "until": "2026-11-01T00:00:00Z"},
            "since is later than until",
        ),
        (["reason", "timeout"], "filter must be a JSON object"),
        ("reason=timeout", "filter must be a JSON object"),
    ],
    ids=lambda value: repr(value)[:60],
)
def test_filter_from_refuses_with_the_api_names(given: Any, says: str) -> None:
    """Unknown keys, wrong types and values the CLI refuses: Invalid (400), naming the API
    key (``error_type``), never the CLI option (``--error-type``)."""
    with pytest.raises(Invalid) as caught:
        filter_from(given)
    assert caught.value.status == 400
    assert says in caught.value.message
    assert "--" not in caught.value.message


def test_an_unknown_filter_key_is_quoted_and_capped() -> None:
    """A hostile key is shown with repr (escaped) and the list of them capped at 200 chars."""
    with pytest.raises(Invalid) as caught:
        filter_from({"<script>\n" + "k" * 500: "x"})
    assert "\\n" in caught.value.message and "\n" not in caught.value.message
    assert len(caught.value.message) < 400


# replay_options


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, lib.ReplayOptions()),
        ({"filter": {"reason": "timeout"}}, lib.ReplayOptions()),
        ({"dry_run": True}, lib.ReplayOptions(dry_run=True)),
        ({"canary": 0}, lib.ReplayOptions(canary=0)),
        ({"canary": MAX_CANARY}, lib.ReplayOptions(canary=MAX_CANARY)),
        ({"rate": 2.5}, lib.ReplayOptions(rate=2.5)),
        ({"rate": MAX_RATE}, lib.ReplayOptions(rate=MAX_RATE)),
        ({"rate": 7}, lib.ReplayOptions(rate=7.0)),
        ({"to": "orders.fixed"}, lib.ReplayOptions(to="orders.fixed")),
        ({"limit": 1}, lib.ReplayOptions(limit=1)),
        (
            {"canary": 3, "canary_wait": 0.5, "canary_timeout": 20},
            lib.ReplayOptions(canary=3, canary_wait=0.5, canary_timeout=20.0),
        ),
        # null means "the default", as an unset form field does.
        (
            {"canary": None, "rate": None, "to": None, "limit": None, "canary_wait": None},
            lib.ReplayOptions(),
        ),
    ],
    ids=lambda value: repr(value)[:60],
)
def test_replay_options_from_a_request(body: dict[str, Any], expected: lib.ReplayOptions) -> None:
    """The request's fields become the library's options; the rest keep their defaults."""
    assert replay_options(body) == expected


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"bogus": 1}, "unknown field 'bogus'; known: filter, canary"),
        ({"canery": 2}, "unknown field 'canery'"),
        ({"canary": -1}, "canary must be 0 to 10000"),
        ({"canary": MAX_CANARY + 1}, "canary must be 0 to 10000"),
        ({"canary": 1.5}, "canary must be a whole number"),
        ({"canary": "2"}, "canary must be a whole number"),
        ({"canary": True}, "canary must be a whole number"),
        ({"rate": 0}, "rate must be a number above 0 and at most 100000"),
        ({"rate": -3}, "rate must be a number above 0"),
        ({"rate": MAX_RATE * 2}, "at most 100000"),
        ({"rate": "5"}, "rate must be a number"),
        ({"rate": False}, "rate must be a number"),
        ({"canary_wait": 3601}, "canary_wait must be a number above 0 and at most 3600"),
        ({"canary_timeout": 0}, "canary_timeout must be a number above 0"),
        ({"limit": 0}, "limit must be 1 or more"),
        ({"limit": "all"}, "limit must be a whole number"),
        ({"to": ""}, "to must be non-empty text"),
        ({"to": 5}, "to must be non-empty text"),
        ({"dry_run": "yes"}, "dry_run must be true or false"),
        ({"dry_run": 1}, "dry_run must be true or false"),
        ({"dry_run": None}, "dry_run must be true or false"),
    ],
    ids=lambda value: repr(value)[:60],
)
def test_replay_options_refuse_wrong_fields_and_values(body: dict[str, Any], says: str) -> None:
    """A typo or a wrong type is a 400 that says which field and what it must be."""
    with pytest.raises(Invalid) as caught:
        replay_options(body)
    assert caught.value.status == 400
    assert says in caught.value.message


# edited_body


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"body": '{"order_id": "o1"}'}, b'{"order_id": "o1"}'),
        ({"body": "caf\u00e9 \u2713", "body_encoding": "utf-8"}, "caf\u00e9 \u2713".encode()),
        ({"body": ""}, b""),
        ({"body": "AP8Abg==", "body_encoding": "base64"}, b"\x00\xff\x00n"),
        ({"body": "", "body_encoding": "base64"}, b""),
    ],
    ids=lambda value: repr(value)[:60],
)
def test_edited_body_is_text_or_base64(body: dict[str, Any], expected: bytes) -> None:
    """The body as the export format writes it: UTF-8 text by default, or base64."""
    assert edited_body(body) == expected


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({}, '"body" must be text'),
        ({"body": None}, '"body" must be text'),
        ({"body": {"order_id": "o1"}}, '"body" must be text'),
        ({"body": 5}, '"body" must be text'),
        ({"body": "\ud800"}, '"body" is not valid UTF-8 text'),
        ({"body": "not base64!", "body_encoding": "base64"}, '"body" is not valid base64'),
        ({"body": "AP8\nAbg==", "body_encoding": "base64"}, '"body" is not valid base64'),
        ({"body": "abc", "body_encoding": "base64"}, '"body" is not valid base64'),
        ({"body": "x", "body_encoding": "latin-1"}, '"body_encoding" must be "utf-8" or "base64"'),
        ({"body": "x", "body_encoding": None}, '"body_encoding" must be "utf-8" or "base64"'),
    ],
    ids=lambda value: repr(value)[:60],
)
def test_edited_body_refuses_what_it_cannot_decode(body: dict[str, Any], says: str) -> None:
    """A body that is not text, a lone surrogate, bad base64, an unknown encoding: 400."""
    with pytest.raises(Invalid) as caught:
        edited_body(body)
    assert says in caught.value.message


# check_queue_name


@pytest.mark.parametrize(
    "name",
    ["orders.dlq", "a", "x" * 255, "eu/orders +#@,:.dlq", "amq.x"],
    ids=lambda value: repr(value)[:40],
)
def test_names_the_client_can_send_are_let_through(name: str) -> None:
    """Up to 255 bytes of what pamqp sends (letters, digits, space, -_.:@#,/+)."""
    check_queue_name(name)


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("", "empty"),
        ("x" * 256, "longer than 255 bytes"),
        ("\u00e9" * 128, "longer than 255 bytes"),  # 128 characters, 256 bytes
        ("\u00e9" * 127, "can only address queue names"),  # RabbitMQ would take it
        ("eu/orders \u00fc.dlq", "can only address queue names"),
        ("tab\there", "can only address queue names"),
        ("x(eu).dlq", "can only address queue names"),
        ("trailing\n", "can only address queue names"),
    ],
    ids=lambda value: repr(value)[:40],
)
def test_names_no_queue_can_have_are_refused(name: str, says: str) -> None:
    """Empty, over AMQP's 255 bytes (counted in UTF-8), or what pamqp will not send: 400
    before the broker is asked."""
    with pytest.raises(Invalid) as caught:
        check_queue_name(name)
    assert says in caught.value.message


# safe_next


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (None, "/"),
        ("", "/"),
        ("/", "/"),
        ("/dlqs/orders.dlq", "/dlqs/orders.dlq"),
        ("/dlqs/eu%2Forders.dlq/groups?sort=count", "/dlqs/eu%2Forders.dlq/groups?sort=count"),
        ("//evil.example", "/"),
        ("//evil.example/dlqs", "/"),
        ("https://evil.example/", "/"),
        ("http:/evil.example", "/"),
        ("javascript:alert(1)", "/"),
        ("evil.example", "/"),
        ("/\\evil.example", "/"),
        ("\\\\evil.example", "/"),
        ("/\t/evil.example", "/"),
        ("/x\r\nSet-Cookie: a=b", "/"),
        ("/x\x00", "/"),
    ],
    ids=lambda value: repr(value)[:40],
)
def test_safe_next_stays_on_this_console(target: str | None, expected: str) -> None:
    """After login the browser goes to a path of this console, never to another site."""
    assert safe_next(target) == expected


# is_local


@pytest.mark.parametrize(
    ("host", "local"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("localhost.", True),
        ("localhost.example.com", False),
        ("::1", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.5", False),
        ("10.0.0.1", False),
        ("example.com", False),
        ("", False),
    ],
)
def test_is_local(host: str, local: bool) -> None:
    """Loopback addresses and ``localhost`` are local; any other bind warns without a token."""
    assert is_local(host) is local


# decide

NOTHING = Credentials()
BEARER = Credentials(bearer=True)
SESSION = Credentials(session=True)
SESSION_CSRF = Credentials(session=True, csrf=True)
CSRF_ONLY = Credentials(csrf=True)
FOREIGN = Credentials(foreign_origin=True)
FOREIGN_BEARER = Credentials(bearer=True, foreign_origin=True)
FOREIGN_SESSION_CSRF = Credentials(session=True, csrf=True, foreign_origin=True)

A, L, U, F = Decision.ALLOW, Decision.LOGIN, Decision.UNAUTHORIZED, Decision.FORBIDDEN


@pytest.mark.parametrize(
    ("writes", "api", "open_path", "token", "given", "expected", "reason"),
    [
        # Reads, no token configured: open to all (the console binds 127.0.0.1 by default).
        (False, True, False, False, NOTHING, A, ""),
        (False, False, False, False, NOTHING, A, ""),
        (False, True, False, False, FOREIGN, A, ""),
        # Reads, token configured: bearer or session; else 401 (API) or the login page.
        (False, True, False, True, NOTHING, U, "send Authorization: Bearer <token>"),
        (False, False, False, True, NOTHING, L, ""),
        (False, True, False, True, BEARER, A, ""),
        (False, True, False, True, SESSION, A, ""),
        (False, False, False, True, SESSION, A, ""),
        (False, True, False, True, CSRF_ONLY, U, "send Authorization: Bearer <token>"),
        # Open paths (login form, assets) are open for reading whatever is configured.
        (False, False, True, True, NOTHING, A, ""),
        (False, False, True, False, NOTHING, A, ""),
        # Changes, no token configured: read-only, whatever the request carries.
        (True, True, False, False, NOTHING, F, READ_ONLY),
        (True, True, False, False, SESSION_CSRF, F, READ_ONLY),
        (True, False, False, False, NOTHING, F, READ_ONLY),
        # Changes, token configured.
        (True, True, False, True, BEARER, A, ""),
        (True, True, False, True, SESSION_CSRF, A, ""),
        (True, False, False, True, SESSION_CSRF, A, ""),
        (True, True, False, True, SESSION, F, "missing or wrong CSRF token (reload the page)"),
        (True, True, False, True, NOTHING, U, "log in, or send Authorization: Bearer <token>"),
        (True, True, False, True, CSRF_ONLY, U, "log in, or send Authorization: Bearer <token>"),
        # A change another site makes the browser send: refused, whatever it carries.
        (True, True, False, True, FOREIGN_BEARER, F, "cross-site request refused"),
        (True, True, False, True, FOREIGN_SESSION_CSRF, F, "cross-site request refused"),
        (True, False, True, True, FOREIGN, F, "cross-site request refused"),  # POST /login
        (True, False, True, False, FOREIGN, F, "cross-site request refused"),
        # POST /login and /logout themselves are open (the login checks the token).
        (True, False, True, True, NOTHING, A, ""),
        (True, False, True, False, NOTHING, A, ""),
    ],
)
def test_decide(
    writes: bool,
    api: bool,
    open_path: bool,
    token: bool,
    given: Credentials,
    expected: Decision,
    reason: str,
) -> None:
    """The access rule of the console, one row per kind of request."""
    assert decide(
        writes=writes, api=api, open_path=open_path, token_configured=token, given=given
    ) == (expected, reason)


# Access.credentials

TOKEN = "unit-test-token-0123456789"
LIVE = Session(csrf="csrf-token-of-the-session", expires=float("inf"))


@pytest.mark.parametrize(
    ("headers", "session", "expected"),
    [
        ({}, None, Credentials()),
        ({"authorization": f"Bearer {TOKEN}"}, None, Credentials(bearer=True)),
        ({"authorization": f"bearer {TOKEN}"}, None, Credentials(bearer=True)),
        ({"authorization": f"BEARER  {TOKEN} "}, None, Credentials(bearer=True)),
        ({"authorization": f"Bearer {TOKEN}x"}, None, Credentials()),
        ({"authorization": f"Bearer {TOKEN[:-1]}"}, None, Credentials()),
        ({"authorization": f"Basic {TOKEN}"}, None, Credentials()),
        ({"authorization": f"Bearer{TOKEN}"}, None, Credentials()),
        ({"authorization": "Bearer "}, None, Credentials()),
        ({"authorization": "Bearer \u00e9\u00e9"}, None, Credentials()),
        ({}, LIVE, Credentials(session=True)),
        ({CSRF_HEADER: LIVE.csrf}, LIVE, Credentials(session=True, csrf=True)),
        ({CSRF_HEADER: "wrong"}, LIVE, Credentials(session=True)),
        ({CSRF_HEADER: LIVE.csrf}, None, Credentials()),
        ({"origin": "http://console.test", "host": "console.test"}, None, Credentials()),
        ({"origin": "http://CONSOLE.test", "host": "console.test"}, None, Credentials()),
        (
            {"origin": "http://evil.example", "host": "console.test"},
            None,
            Credentials(foreign_origin=True),
        ),
        (
            {"origin": "http://console.test:8026", "host": "console.test:8025"},
            None,
            Credentials(foreign_origin=True),
        ),
        ({"origin": "null", "host": "console.test"}, None, Credentials(foreign_origin=True)),
    ],
    ids=lambda value: repr(value)[:50],
)
def test_credentials(
    headers: dict[str, str], session: Session | None, expected: Credentials
) -> None:
    """What a request carries, checked against the token (any case of ``Bearer``, the exact
    token only), the session's CSRF token, and whether its ``Origin`` is another site."""
    raw = [(k.encode(), v.encode("utf-8")) for k, v in headers.items()]
    assert Access(TOKEN).credentials(Headers(raw=raw), session) == expected


def test_without_a_token_no_bearer_matches() -> None:
    """A read-only console has no token, so no ``Authorization`` header makes one up."""
    access = Access(None)
    assert not access.token_configured
    assert not access.token_matches("")
    assert access.credentials(Headers({"authorization": "Bearer "}), None) == Credentials()
