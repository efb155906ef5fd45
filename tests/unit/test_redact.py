"""Redaction of secrets and escaping of control characters (pure)."""

from __future__ import annotations

import pytest

from qworker.redact import MASK, escape_control, mask_url, redact


@pytest.mark.parametrize(
    ("text", "secret", "expected"),
    [
        ("amqp://user:s3cr3t@host:5672/vh", "s3cr3t", "amqp://user:***@host:5672/vh"),
        (
            "amqps://billing:mq%2Fpw@rabbit.internal/",
            "mq%2Fpw",
            "amqps://billing:***@rabbit.internal/",
        ),
        ("postgres://app:pg-pass@db:5432/shop", "pg-pass", "postgres://app:***@db:5432/shop"),
        (
            "postgresql+asyncpg://app:pg-pass@db/shop",
            "pg-pass",
            "postgresql+asyncpg://app:***@db/shop",
        ),
        ("redis://:r3dis@cache:6379/0", "r3dis", "redis://:***@cache:6379/0"),
        (
            "GET http://admin:h77p@example.com/x failed",
            "h77p",
            "GET http://admin:***@example.com/x failed",
        ),
        ("password=hunter2 next", "hunter2", "password=*** next"),
        ("PASSWORD = hunter2", "hunter2", "PASSWORD = ***"),
        ("passwd: hunter2", "hunter2", "passwd: ***"),
        ("db_pwd=hunter2;x=1", "hunter2", "db_pwd=***;x=1"),
        ('{"password": "hunter2", "user": "bob"}', "hunter2", '{"password": "***", "user": "bob"}'),
        ("{'token': 'tok-123', 'id': 7}", "tok-123", "{'token': '***', 'id': 7}"),
        ("api_key=AKIA1234", "AKIA1234", "api_key=***"),
        ("api-key: AKIA1234", "AKIA1234", "api-key: ***"),
        ("apiKey=abcd1234", "abcd1234", "apiKey=***"),
        ('{"apiKey":"abcd1234"}', "abcd1234", '{"apiKey":"***"}'),
        ("Authorization: Bearer eyJhbGciOi.eyJzdWIi.c2lnbmF0", "eyJhbGciOi", "Authorization: ***"),
        ("Authorization: Basic dXNlcjpwYXNz", "dXNlcjpwYXNz", "Authorization: ***"),
        ("Authorization: Token 9f8e7d6c", "9f8e7d6c", "Authorization: ***"),
        ("Proxy-Authorization: Negotiate YIIabc", "YIIabc", "Proxy-Authorization: ***"),
        ("{'Authorization': 'Token 9f8e7d6c'}", "9f8e7d6c", "{'Authorization': '***'}"),
        ("sent Bearer eyJhbGciOi.x.y to upstream", "eyJhbGciOi", "sent Bearer *** to upstream"),
        ("header was Basic dXNlcjpwYXNz", "dXNlcjpwYXNz", "header was Basic ***"),
        ("client_secret=cs-987&grant_type=x", "cs-987", "client_secret=***&grant_type=x"),
        (
            "GET /cb?code=1&access_token=at-456&state=s",
            "at-456",
            "GET /cb?code=1&access_token=***&state=s",
        ),
        ("refresh_token: rt-789", "rt-789", "refresh_token: ***"),
        ("aws_secret_access_key=wJalrXUtnFEMI", "wJalrXUtnFEMI", "aws_secret_access_key=***"),
        ("private_key='-----BEGIN'", "-----BEGIN", "private_key='***'"),
        ("credentials=alice:wonder", "alice:wonder", "credentials=***"),
    ],
)
def test_redact_removes_the_secret(text: str, secret: str, expected: str) -> None:
    """Each kind of secret is replaced by *** and the text around it is kept."""
    redacted = redact(text)
    assert secret not in redacted
    assert redacted == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "order 42 failed: KeyError('sku')",
        "the token was invalid",
        "password is too short",
        "connection refused: amqp://rabbit.internal:5672/",
        "https://example.com/path?page=2&sort=asc",
        "http://host/a:b@c",
        "user@example.com wrote: hello",
        "ValueError: amount_cents must be positive",
        "took 2.5s, retry in 5m",
        "ключ не найден 🎉",
        "line one\nline two\ttabbed",
    ],
)
def test_redact_leaves_non_secret_text_unchanged(text: str) -> None:
    """Text without secrets comes back exactly as it was."""
    assert redact(text) == text


@pytest.mark.parametrize(
    "text",
    [
        "password=***",
        '{"token": "***"}',
        "amqp://u:***@h/",
        "Authorization: ***",
        "Bearer ***",
    ],
)
def test_redact_is_idempotent(text: str) -> None:
    """Redacting already-redacted text changes nothing."""
    assert redact(text) == text
    assert redact(redact(text + " password=x")) == redact(text + " password=x")


def test_redact_masks_every_occurrence() -> None:
    """Several secrets in one text are all masked."""
    text = "a=amqp://u:one@h/ b=redis://:two@r/ password=three token: four"
    redacted = redact(text)
    for secret in ("one", "two", "three", "four"):
        assert secret not in redacted.replace("token", "")
    assert redacted.count(MASK) == 4


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("amqp://guest:guest@localhost:5672/", "amqp://guest:***@localhost:5672/"),
        (
            "amqps://svc:p4ss@rabbit-1.prod:5671/billing",
            "amqps://svc:***@rabbit-1.prod:5671/billing",
        ),
        ("amqp://svc:p4ss@[::1]:5672/%2F", "amqp://svc:***@[::1]:5672/%2F"),
        ("amqp://localhost/vh", "amqp://localhost/vh"),
        ("amqp://user@localhost/vh", "amqp://user@localhost/vh"),
        (
            "amqps://svc:p4ss@h:5671/vh?cafile=/ca.pem&password=keypass",
            "amqps://svc:***@h:5671/vh?cafile=/ca.pem&password=***",
        ),
    ],
)
def test_mask_url_hides_the_password_and_keeps_host_port_vhost(url: str, expected: str) -> None:
    """The user, host, port, vhost and other query options stay readable."""
    assert mask_url(url) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain text", "plain text"),
        ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
        ("bell\x07", "bell\\x07"),
        ("carriage\rreturn", "carriage\\x0dreturn"),
        ("nul\x00byte", "nul\\x00byte"),
        ("back\x08space", "back\\x08space"),
        ("del\x7f", "del\\x7f"),
        ("c1 csi\x9b2J", "c1 csi\\x9b2J"),
        ("c1 nel\x85", "c1 nel\\x85"),
        ("vertical\x0btab\x0cfeed", "vertical\\x0btab\\x0cfeed"),
        ("two\nlines", "two\\nlines"),
        ("tab\tkept", "tab\tkept"),
        ("unicode é 🎉 kept", "unicode é 🎉 kept"),
    ],
)
def test_escape_control_escapes_terminal_control_characters(text: str, expected: str) -> None:
    """ESC, BEL, CR, NUL, DEL, C1 controls and newlines are shown escaped, not interpreted."""
    assert escape_control(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("two\nlines", "two\nlines"),
        ("a\r\nb", "a\\x0d\nb"),
        ("\x1b]0;title\x07\n", "\\x1b]0;title\\x07\n"),
    ],
)
def test_escape_control_can_keep_newlines(text: str, expected: str) -> None:
    """With keep_newlines, newlines stay; every other control character is still escaped."""
    assert escape_control(text, keep_newlines=True) == expected


def test_escape_control_output_has_no_control_characters() -> None:
    """After escaping, no character below 0x20 (except tab) or in 0x7f-0x9f remains."""
    every = "".join(chr(c) for c in range(0x00, 0xA0))
    escaped = escape_control(every)
    assert all(ch == "\t" or not (ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F) for ch in escaped)


@pytest.mark.parametrize(
    "text", ["pa\u017f\u017fword=hunter2", "\u017fecret: hunter2", "ap\u0131_key=hunter2"]
)
def test_non_ascii_letters_that_fold_to_a_trigger_word_are_still_redacted(text: str) -> None:
    """The no-trigger shortcut must not skip text the case-insensitive patterns would match."""
    assert "hunter2" not in redact(text)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (b"wire-\xff-id".decode("utf-8", "surrogateescape"), "wire-\\xff-id"),
        ("lone \ud800 high", "lone \\ud800 high"),
        ("\udc80\udcff", "\\x80\\xff"),
    ],
)
def test_escape_control_shows_surrogates_as_the_bytes_they_stand_for(text: str, shown: str) -> None:
    """A non-UTF-8 message id (decoded with surrogateescape) prints as \\xNN, never raw."""
    escaped = escape_control(text)
    assert escaped == shown
    escaped.encode("utf-8")  # printable on any UTF-8 terminal
