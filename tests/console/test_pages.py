"""The pages without a broker or a browser: the pure helpers of
:mod:`qworker.console.views`, and every page rendered from the XSS corpus by a stand-in
console (the browser tests do the same on the real broker)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

from qworker import dlq as lib
from qworker import headers as h
from qworker.console import pages, paths, views
from qworker.console.errors import Busy, NotFound
from qworker.console.service import DlqOverview, GroupRow, Page, Scan, ScanInfo
from qworker.dlq.records import dead_letter
from tests.console.xss_corpus import CORPUS_FINGERPRINT, PAYLOADS, corpus_letters
from tests.support.dlq import failure


@pytest.mark.parametrize(
    ("value", "link"),
    [
        ("https://runbooks.example.com/a?b=1#c", True),
        ("http://wiki/x", True),
        ("HTTPS://EXAMPLE.COM/", True),
        ("javascript:alert(1)", False),
        (" javascript:alert(1)", False),
        ("JaVaScRiPt:alert(1)", False),
        ("data:text/html,<script>alert(1)</script>", False),
        ("vbscript:msgbox(1)", False),
        ("//evil.example/x", False),
        ("/relative/path", False),
        ("https://example.com/\u202eexe", False),
        ("https://exa mple.com/", False),
        ("https:///no-host", False),
        ("https://example.com/" + "a" * 3000, False),
        (None, False),
        (42, False),
    ],
)
def test_only_absolute_http_urls_become_links(value: Any, link: bool) -> None:
    assert views.http_url(value) == (value if link else None)


def test_segments_are_percent_encoded_whole() -> None:
    """Every reserved character is encoded; a non-UTF-8 byte (a surrogate) as itself."""
    assert views.segment("a/b #c?d=%41+e") == "a%2Fb%20%23c%3Fd%3D%2541%2Be"
    assert views.segment("\udcff\x00<") == "%FF%00%3C"


def test_shown_escapes_controls_and_invisible_characters() -> None:
    assert views.shown("a\u202eb\u200bc\x00d\x1b[1m") == "a\\u202eb\\u200bc\\x00d\\x1b[1m"
    assert views.shown("two\nlines") == "two\\nlines"
    assert views.shown_block("two\r\nlines\u2028") == "two\nlines\\u2028"
    assert views.shown(None) == ""


def test_times_are_utc_iso() -> None:
    from datetime import timedelta, timezone

    local = datetime(2026, 11, 29, 3, 0, 5, 250_000, tzinfo=timezone(timedelta(hours=2)))
    assert views.when(local) == "2026-11-29T01:00:05Z"
    assert views.when_precise(local) == "2026-11-29T01:00:05.250Z"
    assert views.when(None) == "-"


def test_bodies_are_shown_as_json_text_or_hex() -> None:
    shown = views.body_view(b'{"b": 1, "a": "\\u00e9"}')
    assert (shown.kind, shown.text, shown.editable) == (
        "json",
        '{\n  "b": 1,\n  "a": "\u00e9"\n}',
        '{"b": 1, "a": "\\u00e9"}',
    )
    assert views.body_view(b"plain <b>text</b>").kind == "text"
    binary = views.body_view(b"\x00\xff<script>")
    assert binary.kind == "binary" and binary.editable is None
    assert binary.hex == "00000000  00 ff 3c 73 63 72 69 70 74 3e" + " " * 18 + "  |..<script>|"
    big = views.body_view(b"x" * (views.BODY_SHOWN + 1))
    assert big.cut and len(big.text) == views.BODY_SHOWN


def test_timeline_orders_attempts_then_the_dead_lettering_and_keeps_deaths_apart() -> None:
    history = [
        {
            "attempt": 2,
            "at": "2026-11-29T01:00:02.500+00:00",
            "error_type": "E",
            "error_message": "b",
        },
        {"attempt": 1, "at": "2026-11-29T01:00:01+00:00", "error_type": "E", "error_message": "a"},
        {"attempt": "x", "at": 5},  # forged: kept as an entry without a time
    ]
    headers = {
        **failure("q", at="2026-11-29T01:00:02.500000+00:00", attempt=2),
        h.HISTORY: history,
        "x-death": [{"queue": "q.retry.1s", "reason": "expired", "count": 3}],
    }
    dl = dead_letter("q.dlq", b"{}", {}, headers)
    moments = views.timeline(dl.headers, dl)
    assert [m.kind for m in moments] == ["failure", "failure", "failure", "last"]
    assert moments[0].at is None
    assert [m.title for m in moments[1:3]] == ["attempt 1 failed: E", "attempt 2 failed: E"]
    assert [(d.queue, d.reason, d.count) for d in views.deaths(dl.headers)] == [
        ("q.retry.1s", "expired", 3)
    ]


class FakeConsole:
    """The console's reading methods over fixed dead letters (no broker)."""

    def __init__(self, queue: str, letters: list[lib.DeadLetter]) -> None:
        self.queue = queue
        self.letters = letters
        aggregate = lib.Stats()
        for dl in letters:
            aggregate.add(dl)
        now = datetime.now(UTC)
        self.scan_result = Scan(
            queue=queue,
            depth=len(letters),
            scanned=len(letters),
            groups=[GroupRow.of(g) for g in aggregate.ranked()],
            reasons=dict(aggregate.reasons),
            oldest_failure=aggregate.oldest,
            info=ScanInfo(now, 0.25, len(letters), False, 0.0),
        )

    async def overview(self) -> list[DlqOverview]:
        scan = self.scan_result
        return [
            DlqOverview(
                self.queue, True, scan.depth, scan.oldest_failure, scan.groups[:3], scan.info
            ),
            DlqOverview("missing.dlq", False, problem="the broker has no such <queue>"),
        ]

    async def scan(self, dlq: str, *, rescan: bool = False) -> Scan:
        if dlq != self.queue:
            raise NotFound(f"no queue {dlq}")
        return self.scan_result

    async def messages(
        self, dlq: str, chosen: lib.Filter, *, limit: int = 50, offset: int = 0
    ) -> Page:
        matching = [dl for dl in self.letters if chosen.matches(dl)]
        return Page(
            matching[offset : offset + limit], offset, limit, len(matching) > offset + limit
        )

    async def message(self, dlq: str, message_id: str) -> lib.DeadLetter:
        if message_id == "busy":
            raise Busy("a replay (job <b>1</b>) is working on it")
        for dl in self.letters:
            if dl.message_id == message_id:
                return dl
        raise NotFound(f"no message {message_id} in {dlq}")


class State:
    """What the console's guard leaves in ``request.state`` (here: fixed)."""

    def __init__(self, app: ASGIApp, can_write: bool) -> None:
        self.app, self.can_write = app, can_write

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = scope.get("raw_path")
        if scope["type"] == "http" and isinstance(raw, bytes):
            scope = {**scope, "path": raw.decode("latin-1")}
        state = scope.setdefault("state", {})
        state.update(
            can_write=self.can_write,
            token_configured=self.can_write,
            csrf="csrf-\"'<>" if self.can_write else None,
        )
        await self.app(scope, receive, send)


def corpus_console() -> FakeConsole:
    queue = "test.pages.dlq"
    letters = [
        dead_letter(queue, letter.body, {"message_id": letter.message_id}, letter.headers)
        for letter in corpus_letters("test.pages")
    ]
    return FakeConsole(queue, letters)


#: Payloads that would be markup if they reached a page as they are.
MARKUP_PAYLOADS = [p[:200] for p in PAYLOADS if "<" in p or '"' in p]


@pytest.mark.parametrize("can_write", [True, False])
async def test_every_page_renders_the_corpus_as_text(can_write: bool) -> None:
    """No payload's markup reaches a page unescaped; the pages answer 200 (404 for
    unknown messages, 409 busy) and carry no inline script or style."""
    paths.install()
    console = corpus_console()
    app = Starlette(
        routes=list(pages.routes()), middleware=[Middleware(State, can_write=can_write)]
    )
    app.state.console = console
    q = console.queue
    urls = [
        "/",
        "/login?next=" + quote("javascript:alert(1)"),
        f"/dlqs/{q}",
        f"/dlqs/{q}?sort=-last",
        f"/dlqs/{q}?sort=<script>",
        f"/dlqs/{q}/groups/{CORPUS_FINGERPRINT}",
        f"/dlqs/{q}/groups/{CORPUS_FINGERPRINT}?page=2",
        *(f"/dlqs/{q}/messages/{views.segment(dl.message_id)}" for dl in console.letters),
    ]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://console.test") as client:
        for url in urls:
            answer = await client.get(url)
            assert answer.status_code == 200, (url, answer.text[:300])
            html = answer.text
            for payload in MARKUP_PAYLOADS:
                assert payload not in html, (url, payload)
            assert re.search(r"<[^>]+\sstyle=", html) is None, url
            assert re.search(r"<[^>]+\son[a-z]+=", html) is None, url
            assert all(
                not href.lower().startswith(("javascript:", "data:"))
                for href in re.findall(r'href="([^"]*)"', html)
                if href != "data:,"
            ), url
            assert len(re.findall(r"<script", html)) == 1, url
        missing = await client.get(f"/dlqs/{q}/messages/{views.segment('<img src=x>')}")
        assert missing.status_code == 404
        assert "no message &lt;img src=x&gt; in" in missing.text
        busy = await client.get(f"/dlqs/{q}/messages/busy")
        assert busy.status_code == 409 and "job &lt;b&gt;1&lt;/b&gt;" in busy.text
        group = await client.get(f"/dlqs/{q}/groups/{CORPUS_FINGERPRINT}")
        assert "&lt;script&gt;alert(&#39;qxss-script&#39;)&lt;/script&gt;" in group.text
        page = await client.get(f"/dlqs/{q}/messages/{views.segment(PAYLOADS[0])}")
        disabled = " disabled" in page.text.split("data-edit-go", 1)[1].split(">", 1)[0]
        assert disabled is not can_write


async def test_groups_sort_by_every_column_and_ignore_unknown_sorts() -> None:
    paths.install()
    console = corpus_console()
    app = Starlette(routes=list(pages.routes()), middleware=[Middleware(State, can_write=False)])
    app.state.console = console
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://console.test") as client:
        for column in pages.SORT_KEYS:
            for sort in (column, f"-{column}"):
                answer = await client.get(f"/dlqs/{console.queue}?sort={sort}")
                assert answer.status_code == 200
                active = re.search(r'aria-sort="(ascending|descending)"', answer.text)
                assert active is not None
                assert active.group(1) == ("descending" if sort.startswith("-") else "ascending")


async def test_message_and_group_pages_mask_secrets_and_show_the_trace_id() -> None:
    """A producer's ``authorization`` header, a password in an error text (a forged dead
    letter's, never redacted by a worker) and a URL password: shown as ``***`` on the
    message page and the group page; the body stays as it is (it is the message, and
    edit & retry needs it); the trace id is shown."""
    paths.install()
    queue = "test.secrets.dlq"
    headers = {
        **failure("test.secrets", message="login failed: password=hunter2"),
        "authorization": "Bearer opaque-credential-123",
        "x-api-key": "k-987654321",
        "note": "from amqp://svc:s3cr3t@rabbit/",
        h.TRACE_ID: "4bf92f3577b34da6a3ce929d0e0e4736",
    }
    dl = dead_letter(queue, b'{"card": "visible body"}', {"message_id": "s1"}, headers)
    app = Starlette(routes=list(pages.routes()), middleware=[Middleware(State, can_write=True)])
    app.state.console = FakeConsole(queue, [dl])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://console.test") as client:
        message = await client.get(f"/dlqs/{queue}/messages/s1")
        group = await client.get(f"/dlqs/{queue}/groups/{dl.fingerprint}")
    for answer in (message, group):
        assert answer.status_code == 200, answer.text[:300]
        for secret in ("hunter2", "opaque-credential-123", "k-987654321", "s3cr3t"):
            assert secret not in answer.text, secret
    assert "***" in message.text
    assert "visible body" in message.text
    assert "4bf92f3577b34da6a3ce929d0e0e4736" in message.text
    assert "Trace id" in message.text
