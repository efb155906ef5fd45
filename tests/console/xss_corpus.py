"""Hostile dead letters: XSS payloads in every field a producer (or a forger) controls.

Dead letters are producer-controlled, so the console must show every byte of them as
text. :data:`PAYLOADS` is the corpus; :func:`corpus_letters` builds dead letters that
carry each payload in the message id, header keys and values, error type, message and
traceback, handler, history, the broker's death history, properties and the body, with a
``javascript:`` runbook; :func:`publish_corpus` puts them into a DLQ. The browser tests
render them and the API tests may check their JSON.

Every script a payload would run calls ``alert``/``confirm``/``prompt`` (a dialog the
browser tests fail on) or sets ``window.__xss`` (checked after each page).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from aio_pika.abc import AbstractConnection

from qworker import headers as h
from tests.support.dlq import Letter, failure, publish

#: One group id shared by the corpus's dead letters (a well-formed fingerprint header),
#: so that one group page lists them all.
CORPUS_FINGERPRINT = "c0ffee0bad01"

#: The payloads. Each must reach the page as the same text, never as markup or script.
PAYLOADS: list[str] = [
    "<script>alert('qxss-script')</script>",
    "<SCRIPT SRC=//example.invalid/x.js></SCRIPT>",
    "<img src=x onerror=alert('qxss-img')>",
    '<img src="x" onerror="window.__xss=1">',
    "<svg onload=alert('qxss-svg')>",
    "<svg><script>alert('qxss-svg-script')</script></svg>",
    "<iframe src=\"javascript:alert('qxss-iframe')\"></iframe>",
    "<a href=\"javascript:alert('qxss-href')\">click</a>",
    "javascript:alert('qxss-url')",
    "\"'><script>alert('qxss-break')</script>",
    '" onmouseover="alert(\'qxss-attr\')" x="',
    "' onfocus='alert(1)' autofocus='",
    "`><img src=x onerror=alert('qxss-backtick')>",
    "{{7*7}}",
    "${7*7}",
    "{% raw %}{{ config }}{% endraw %}",
    "</textarea><script>alert('qxss-textarea')</script>",
    "</script><script>alert('qxss-close-script')</script>",
    "</pre><img src=x onerror=alert('qxss-pre')>",
    "</title><script>alert('qxss-title')</script>",
    "<style>body{display:none}</style>",
    "<div style=\"background:url(javascript:alert('qxss-css'))\">",
    "x:expression(alert('qxss-expression'))",
    '<meta http-equiv="refresh" content="0;url=javascript:alert(\'qxss-meta\')">',
    '<base href="https://example.invalid/">',
    "<math><mtext><table><mglyph><style><img src=x onerror=alert('qxss-mxss')>",
    "&lt;script&gt;alert('qxss-entity')&lt;/script&gt;",
    "\u202egnp.exe\u202c and \u200bzero\u200dwidth\ufeff",
    "NUL\x00and\x07bell\x1b[31mred\x1b[0m\x7f",
    "line1\r\nline2\u2028line3",
    "<" * 300 + "script>alert('qxss-long')</script>",
    "A" * 20_000,
]

#: Payloads that fit where AMQP allows at most 255 bytes (message ids, header keys).
SHORT = [p for p in PAYLOADS if len(p.encode()) <= 255]

#: The runbook every corpus dead letter names: must never become a link.
JAVASCRIPT_RUNBOOK = "javascript:alert('qxss-runbook')"

#: Characters pamqp lets into a queue name besides letters, digits, ``-_.:``: a queue name
#: with them must be percent-encoded in every URL (``/`` and ``#`` above all).
HOSTILE_QUEUE_CHARS = " /#+,@:"


def hostile_queue(base: str) -> str:
    """A legal queue name (for aio-pika's client) holding every URL-breaking character it
    allows: ``base`` + `` a/b#c+d,e@f:g``. RabbitMQ clients refuse ``<>"'`` in queue names,
    so markup cannot come through a queue name; path breakers can."""
    return f"{base} a/b#c+d,e@f:g"


def _letter(origin: str, index: int, payload: str) -> Letter:
    """A dead letter of ``origin`` carrying ``payload`` in every field."""
    short = payload if len(payload.encode()) <= 200 else payload[:60]
    headers: dict[str, Any] = failure(
        origin, error_type=f"qxss.{index}", message=payload, handler=short
    )
    headers.update(
        {
            h.ERROR_TYPE: short,
            h.ERROR_MESSAGE: payload,
            h.ERROR_TRACEBACK: (
                "Traceback (most recent call last):\n"
                f'  File "/srv/{short}.py", line 1, in <module>\n'
                f"{short}: {payload}\n"
            ),
            h.HANDLER: short,
            h.FINGERPRINT: CORPUS_FINGERPRINT,
            h.RUNBOOK: JAVASCRIPT_RUNBOOK,
            h.ERROR_CODE: short,
            h.WORKER: short,
            h.ORIGINAL_EXCHANGE: short,
            h.ORIGINAL_ROUTING_KEY: short,
            h.HISTORY: [
                {
                    "attempt": 1,
                    "at": "2026-11-29T01:00:00+00:00",
                    "error_type": short,
                    "error_message": payload,
                },
                {"attempt": short, "at": short, "error_type": 7, "error_message": ["x"]},
            ],
            h.DEATHS: [
                {
                    "queue": short,
                    "reason": short,
                    "count": 2,
                    "exchange": short,
                    "time": datetime(2026, 11, 29, 1, 0, tzinfo=UTC),
                }
            ],
            short: payload,
            f"x-user-{index}": {"nested": payload, "list": [short, 1, None]},
        }
    )
    return Letter(
        body=payload.encode("utf-8", "surrogateescape"),
        headers=headers,
        message_id=short,
        content_type=short[:100],
    )


def corpus_letters(origin: str) -> list[Letter]:
    """One dead letter of work queue ``origin`` per payload, plus three more: a body that
    is JSON holding the payloads, a binary body, and one whose fingerprint header itself is
    a payload (so its group id is computed)."""
    found = [_letter(origin, i, p) for i, p in enumerate(PAYLOADS)]
    found.append(
        Letter(
            body=('{"payloads": ' + json.dumps(SHORT) + "}").encode(),
            headers={**failure(origin, message="json body"), h.FINGERPRINT: CORPUS_FINGERPRINT},
            message_id="qxss-json-body",
        )
    )
    found.append(
        Letter(
            body=b"\x00\xff<script>alert('qxss-binary')</script>\xfe",
            headers={**failure(origin, message="binary body"), h.FINGERPRINT: CORPUS_FINGERPRINT},
            message_id="qxss-binary-body",
            content_type="application/octet-stream",
        )
    )
    found.append(
        Letter(
            body=b"{}",
            headers={
                **failure(origin, message="<b>forged fingerprint</b>"),
                h.FINGERPRINT: "<img src=x onerror=alert('qxss-fp')>",
            },
            message_id="qxss-forged-fingerprint",
        )
    )
    return found


async def publish_corpus(connection: AbstractConnection, dlq: str, origin: str) -> list[Letter]:
    """Publish :func:`corpus_letters` of ``origin`` into ``dlq``; returns them."""
    letters = corpus_letters(origin)
    await publish(connection, dlq, letters)
    return letters
