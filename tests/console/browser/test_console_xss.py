"""Dead letters are producer-controlled: the XSS corpus in every field renders as text.

Each page showing the corpus is opened twice: once with the Content-Security-Policy
bypassed (so escaping alone is tested: a payload that became markup would open a dialog
or leave an element or attribute the console never writes), and once with the CSP on
(no violation reported, so the console's own assets obey it).
"""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import quote

import pytest
from aio_pika.abc import AbstractConnection

from tests.console.browser.conftest import TOKEN, ServeConsole, log_in, watched_page
from tests.console.xss_corpus import (
    CORPUS_FINGERPRINT,
    JAVASCRIPT_RUNBOOK,
    PAYLOADS,
    hostile_queue,
    publish_corpus,
)
from tests.support.dlq import letters, make_dlq, publish

pytestmark = [pytest.mark.rabbitmq, pytest.mark.browser, pytest.mark.timeout(300)]

#: Run in the page after it loaded: everything that would show a payload became markup.
FOREIGN_MARKUP = """() => {
    const found = [];
    const allowedTags = new Set(["HTML", "HEAD", "META", "TITLE", "LINK", "SCRIPT", "BODY",
        "HEADER", "NAV", "A", "SPAN", "DIV", "P", "MAIN", "FOOTER", "H1", "H2", "H3", "TABLE",
        "THEAD", "TBODY", "TR", "TH", "TD", "TIME", "OL", "UL", "LI", "STRONG", "CODE", "PRE",
        "DL", "DT", "DD", "SECTION", "LABEL", "INPUT", "BUTTON", "TEXTAREA", "DETAILS",
        "SUMMARY", "FORM", "BR", "PROGRESS", "WBR"]);
    for (const node of document.querySelectorAll("*")) {
        if (!allowedTags.has(node.tagName)) found.push("element " + node.tagName);
        for (const attr of node.attributes) {
            const name = attr.name.toLowerCase();
            if (name.startsWith("on") || name === "style" || name === "srcdoc" ||
                (name === "autofocus" && node.id !== "token") || name === "formaction") {
                found.push("attribute " + name + " on " + node.tagName);
            }
            const ourIcon = node.tagName === "LINK" && attr.value === "data:,";
            if ((name === "href" || name === "src" || name === "action") && !ourIcon &&
                /^\\s*(javascript|data|vbscript):/i.test(attr.value)) {
                found.push(name + "=" + attr.value);
            }
        }
    }
    for (const script of document.scripts) {
        if (!script.src || new URL(script.src).pathname !== "/static/console.js") {
            found.push("script " + (script.src || script.textContent.slice(0, 60)));
        }
    }
    if (window.__xss !== undefined) found.push("window.__xss set");
    return found;
}"""


TEXTAREA = next(p for p in PAYLOADS if p.startswith("</textarea>"))


def q(name: str) -> str:
    return quote(name, safe="")


async def _links(page: Any, selector: str) -> list[str]:
    return [
        href
        for href in await page.eval_on_selector_all(
            selector, "nodes => nodes.map(n => n.getAttribute('href'))"
        )
        if href
    ]


async def test_xss_corpus_renders_as_text_on_every_page(
    cleanup: list[str],
    amqp: AbstractConnection,
    serve_console: ServeConsole,
    browser: Any,
) -> None:
    """Overview, DLQ, group and every message page of the corpus, the login and error
    pages: no dialog, no foreign element, attribute or script; the payloads are there as
    text; the ``javascript:`` runbook is no link; a queue name with `` /#+,@:`` works."""
    base = f"test.xss.{uuid.uuid4().hex[:8]}"
    hostile = hostile_queue(f"test.xss.{uuid.uuid4().hex[:8]}")
    cleanup.extend(await make_dlq(amqp, base))
    cleanup.extend(await make_dlq(amqp, hostile))
    dlq, hostile_dlq = f"{base}.dlq", f"{hostile}.dlq"
    await publish_corpus(amqp, dlq, base)
    await publish(amqp, hostile_dlq, letters(hostile, 2))
    server = serve_console([dlq, hostile_dlq], token=TOKEN)

    for bypass_csp in (True, False):
        page, watch = await watched_page(browser, bypass_csp=bypass_csp, allow=("404", "400"))
        await log_in(page, server.url)
        visited: list[str] = []

        async def visit(path: str, page: Any = page, visited: list[str] = visited) -> None:
            response = await page.goto(server.url + path)
            assert response is not None and response.status in (200, 400, 404), (path, response)
            assert await page.evaluate(FOREIGN_MARKUP) == [], path
            visited.append(path)

        await visit("/")
        await visit(f"/dlqs/{q(dlq)}")
        assert await page.locator("a.runbook").count() == 0
        assert JAVASCRIPT_RUNBOOK in await page.inner_text("#groups")
        await visit(f"/dlqs/{q(dlq)}/groups/{CORPUS_FINGERPRINT}")
        body = await page.inner_text("main")
        assert "<script>alert('qxss-script')</script>" in body
        assert "{{7*7}}" in body
        message_links = await _links(page, "table#messages td.mid a")
        assert len(message_links) >= len(PAYLOADS)
        if bypass_csp:
            for link in message_links:
                await visit(link)
                assert await page.locator("#message-id").count() == 1, link
            # A message page shows its payload whole, as text: in the headers table.
            await visit(f"/dlqs/{q(dlq)}/messages/{q(PAYLOADS[0])}")
            assert PAYLOADS[0] in await page.inner_text("#headers")
            assert PAYLOADS[0] in await page.input_value("[data-edit-body]")
            await visit(f"/dlqs/{q(dlq)}/messages/{q(TEXTAREA)}")
            assert await page.input_value("[data-edit-body]") == TEXTAREA
        else:
            for link in message_links[:5]:
                await visit(link)
        # The group whose fingerprint header was itself a payload.
        await visit(f"/dlqs/{q(dlq)}")
        for link in await _links(page, "tr.group a.fp"):
            await visit(link)
        # A queue name with URL-breaking characters, and error pages quoting names.
        await visit(f"/dlqs/{q(hostile_dlq)}")
        assert (await page.inner_text("#depth")).strip() == "2"
        await page.locator("tr.group a.fp").first.click()
        await page.wait_for_selector("table#messages")
        await page.locator("table#messages td.mid a").first.click()
        await page.wait_for_selector("#message-id")
        assert hostile_dlq in await page.inner_text("nav.crumbs")
        await visit(f"/dlqs/{q(dlq)}/messages/{q('<img src=x onerror=alert(1)>')}")
        await visit(f"/dlqs/{q(dlq)}/groups/{q('<svg onload=alert(1)>')}")
        await visit(f"/login?next={q('javascript:alert(1)')}")
        watch.assert_clean()
        assert len(visited) > 8
        await page.context.close()
