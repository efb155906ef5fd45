"""The console in a real browser (Chromium), on the real broker, with a real worker.

Each test makes uuid-named queues, starts a console showing them, and drives its pages
as an on-call engineer would. Every page is also checked for script that should not run
(a dialog fails the test) and for errors on the browser's console (a CSP violation by
the console's own assets is one).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from aio_pika.abc import AbstractConnection
from pydantic import BaseModel

from qworker import App, Context, Permanent, RetryPolicy
from qworker.testing import running
from tests.console.browser.conftest import (
    TOKEN,
    ServeConsole,
    log_in,
    shoot,
    watched_page,
)
from tests.console.xss_corpus import hostile_queue
from tests.support.broker import depth, eventually, eventually_depth
from tests.support.dlq import drain, letters, make_dlq, publish

pytestmark = [pytest.mark.rabbitmq, pytest.mark.browser, pytest.mark.timeout(240)]

RUNBOOK = "https://runbooks.example.com/billing/unknown-customer"
#: A message id that must be percent-encoded in every URL the page and its script make.
MESSAGE_ID = "order/1 #a+b?c=%41"


class Order(BaseModel):
    order_id: str
    customer: str
    amount_cents: int


def q(name: str) -> str:
    return quote(name, safe="")


def once() -> RetryPolicy:
    return RetryPolicy(max_attempts=1, initial_delay=0.05, jitter=0)


async def test_replay_a_group_with_a_canary_from_the_browser(
    broker_url: str,
    cleanup: list[str],
    amqp: AbstractConnection,
    serve_console: ServeConsole,
    browser: Any,
) -> None:
    """Overview -> DLQ -> group; dry run shows 6, replay with canary 2: the group leaves
    the DLQ, the handler (fixed meanwhile) receives all 6, the other group stays."""
    queue = f"test.orders.{uuid.uuid4().hex[:8]}"
    dlq = f"{queue}.dlq"
    app = App(broker_url, name="billing")
    fixed = False
    handled: list[str | None] = []

    async def charge(order: Order, ctx: Context) -> None:
        if order.amount_cents < 0:
            raise Permanent(f"amount {order.amount_cents} must be positive", code="bad-amount")
        if not fixed:
            raise Permanent(f"customer {order.customer} not found", code="unknown-customer")
        handled.append(ctx.message_id)

    charge.__qualname__ = "charge"  # named as a module-level handler in the screenshots
    app.handler(queue, retry=once(), runbook=RUNBOOK)(charge)

    cleanup.extend(s.name for s in app.topology())
    async with running(app, concurrency=4):
        for i in range(6):
            customer = f"cus_{i}NffrFeUfNV2H"  # always cus_<id> once normalised: one group
            order = Order(order_id=f"o{i}", customer=customer, amount_cents=100)
            await app.publish(queue, order, message_id=f"order-{i}")
        for i in range(2):
            order = Order(order_id=f"n{i}", customer="cus_x", amount_cents=-5 - i)
            await app.publish(queue, order, message_id=f"negative-{i}")
        await eventually_depth(amqp, dlq, 8)

        server = serve_console([dlq], token=TOKEN, app=app)
        page, watch = await watched_page(browser)
        await page.goto(server.url + "/")  # with a token, every page asks for it first
        await page.wait_for_url("**/login?next=%2F")
        await shoot(page, "login")
        await log_in(page, server.url)

        # The overview: the DLQ with its depth and top groups.
        await page.goto(server.url + "/")
        row = page.locator(f'tr.dlq[data-dlq="{q(dlq)}"]')
        assert (await row.locator("td.count").inner_text()).strip() == "8"
        assert await row.locator("ol.top li").count() == 2
        await shoot(page, "overview")

        # The DLQ: two groups, 6 and 2, runbook as a link.
        await row.locator("a.queue").click()
        await page.wait_for_url(f"**/dlqs/{q(dlq)}")
        counts = await page.locator("tr.group td.count").all_inner_texts()
        assert [c.strip() for c in counts] == ["6", "2"]
        assert await page.locator(f'a.runbook[href="{RUNBOOK}"]').count() == 2
        await page.click('thead a:has-text("Count")')  # sorted ascending now
        counts = await page.locator("tr.group td.count").all_inner_texts()
        assert [c.strip() for c in counts] == ["2", "6"]
        await page.goto(f"{server.url}/dlqs/{q(dlq)}")
        await shoot(page, "groups")
        big = page.locator("tr.group").first
        fingerprint = await big.get_attribute("data-fingerprint")
        assert fingerprint
        await big.locator("a.fp").click()
        await page.wait_for_url(f"**/groups/{fingerprint}")

        # The group: its 6 messages and a sample traceback.
        assert (await page.inner_text("#group-count")).strip() == "6"
        assert await page.locator("table#messages tr.message").count() == 6
        assert "not found" in await page.inner_text("#sample-traceback")
        await shoot(page, "group")

        # Fix the handler, then dry run: 6, nothing changed.
        fixed = True
        await page.fill("[data-canary]", "2")
        await page.click("[data-dry-run]")
        summary = page.locator("[data-dry-summary]")
        await summary.wait_for(state="visible", timeout=30_000)
        assert "would replay 6 messages" in await summary.inner_text()
        assert await depth(amqp, dlq) == 8

        # Replay with canary 2: live progress, then done.
        await page.click("[data-replay-go]")
        job = page.locator("#replay-group [data-job]")
        await page.wait_for_function(
            "() => /Canaries first: 2 of 2 replayed/.test("
            "document.querySelector('#replay-group [data-job]').textContent)",
            timeout=30_000,
        )
        assert len(handled) <= 2  # the canaries went alone; the other 4 wait
        await shoot(page, "replay-progress", only="#replay-group")
        await page.wait_for_selector("#replay-group [data-job].done", timeout=90_000)
        text = await job.inner_text()
        assert "6 replayed of 6" in text, text
        assert "passed" in text, text  # the canaries' fate
        await shoot(page, "replay-done", only="#replay-group")

        await eventually(lambda: len(handled) == 6, timeout=30)
        assert sorted(handled) == [f"order-{i}" for i in range(6)]

        # The group is gone from the DLQ page; the other one stays.
        await page.goto(f"{server.url}/dlqs/{q(dlq)}")
        rows = page.locator("tr.group")
        assert await rows.count() == 1
        assert await rows.first.get_attribute("data-fingerprint") != fingerprint
        assert (await page.inner_text("#depth")).strip() == "2"
        watch.assert_clean()
    await app.close()
    left = await drain(amqp, dlq)
    assert sorted(t.message_id or "" for t in left) == ["negative-0", "negative-1"]


async def test_message_page_and_edit_and_retry_with_validation(
    broker_url: str,
    cleanup: list[str],
    amqp: AbstractConnection,
    serve_console: ServeConsole,
    browser: Any,
) -> None:
    """The message page shows properties, headers, traceback, history and the body as
    JSON; an edited body the handler's payload type refuses is refused with the reason
    (nothing published), a valid one is published to the origin and the dead letter leaves."""
    queue = f"test.edit.{uuid.uuid4().hex[:8]}"
    dlq = f"{queue}.dlq"
    app = App(broker_url, name="billing")

    async def charge(order: Order) -> None:
        raise LookupError(f"customer {order.customer} not found")  # transient: retried

    charge.__qualname__ = "charge"
    app.handler(queue, retry=RetryPolicy(max_attempts=3, initial_delay=0.05, jitter=0))(charge)

    cleanup.extend(s.name for s in app.topology())
    async with running(app, concurrency=2):
        order = Order(order_id="o1", customer="cus_gone", amount_cents=1250)
        await app.publish(queue, order, message_id=MESSAGE_ID, correlation_id="req-77")
        await eventually_depth(amqp, dlq, 1)
    await app.close()

    server = serve_console([dlq], token=TOKEN, app=app)
    page, watch = await watched_page(browser, allow=("422",))
    await log_in(page, server.url)
    await page.goto(f"{server.url}/dlqs/{q(dlq)}/messages/{q(MESSAGE_ID)}")
    assert (await page.inner_text("#message-id")).strip() == MESSAGE_ID
    assert "customer cus_gone not found" in await page.inner_text("#error-message")
    assert "LookupError" in await page.inner_text("#traceback")
    assert await page.locator("#timeline li.failure").count() == 3  # x-qworker-history
    headers = await page.inner_text("#headers")
    assert "x-qworker-fingerprint" in headers and "x-qworker-history" in headers
    assert "req-77" in await page.inner_text("#properties")
    assert '"amount_cents": 1250' in await page.inner_text("#body")
    await shoot(page, "message")

    await page.fill("[data-edit-body]", '{"order_id": "o1", "customer": "cus_new"}')
    await page.click("[data-edit-go]")
    result = page.locator("[data-edit-result]")
    await page.wait_for_selector("[data-edit-result].failed", timeout=30_000)
    text = await result.inner_text()
    assert "Refused, nothing was published" in text and "amount_cents" in text, text
    assert await depth(amqp, dlq) == 1
    await shoot(page, "edit-refused", only="#edit")

    await page.fill(
        "[data-edit-body]", '{"order_id": "o1", "customer": "cus_new", "amount_cents": 1250}'
    )
    await page.click("[data-edit-go]")
    await page.wait_for_selector("[data-edit-result].done", timeout=30_000)
    assert f"Published to {queue}" in await result.inner_text()
    taken = await drain(amqp, queue)
    assert [t.body for t in taken] == [
        b'{"order_id": "o1", "customer": "cus_new", "amount_cents": 1250}'
    ]
    assert await depth(amqp, dlq) == 0
    watch.assert_clean()


async def test_purge_needs_the_typed_dlq_name(
    queue_name: str,
    cleanup: list[str],
    amqp: AbstractConnection,
    serve_console: ServeConsole,
    browser: Any,
) -> None:
    """The group's export downloads its 3 records; the purge button stays disabled until
    the exact DLQ name is typed; then the group (and only it) is purged."""
    cleanup.extend(await make_dlq(amqp, queue_name))
    dlq = f"{queue_name}.dlq"
    await publish(
        amqp,
        dlq,
        [
            *letters(queue_name, 3, prefix="key"),
            *letters(queue_name, 2, prefix="val", error_type="builtins.ValueError"),
        ],
    )
    server = serve_console([dlq], token=TOKEN)
    page, watch = await watched_page(browser)
    await log_in(page, server.url)
    await page.goto(f"{server.url}/dlqs/{q(dlq)}")
    first = page.locator("tr.group").first
    assert (await first.locator("td.count").inner_text()).strip() == "3"
    await first.locator("a.fp").click()
    await page.wait_for_selector("#purge")

    async with page.expect_download() as download_info:
        await page.click('#export a:has-text("Download the group as JSONL")')
    download = await download_info.value
    lines = Path(await download.path()).read_text().splitlines()
    assert sorted(json.loads(line)["message_id"] for line in lines) == ["key0", "key1", "key2"]

    button = page.locator("[data-purge]")
    assert await button.is_disabled()
    await page.fill("[data-purge-confirm]", dlq[:-1])
    assert await button.is_disabled()
    await page.fill("[data-purge-confirm]", dlq + " ")
    assert await button.is_disabled()
    await page.fill("[data-purge-confirm]", dlq)
    assert await button.is_enabled()
    await button.click()
    await page.wait_for_selector("[data-purge-job].done", timeout=30_000)
    assert "3 purged" in await page.inner_text("[data-purge-job]")
    left = await drain(amqp, dlq)
    assert sorted(t.message_id or "" for t in left) == ["val0", "val1"]
    watch.assert_clean()


async def test_replay_of_selected_messages(
    queue_name: str,
    cleanup: list[str],
    amqp: AbstractConnection,
    serve_console: ServeConsole,
    browser: Any,
) -> None:
    """Two of four messages ticked and replayed: exactly those two reach the work queue.
    The queue's name holds `` /#+`` (legal), so every URL the script makes must encode it."""
    queue_name = hostile_queue(queue_name)
    cleanup.extend(await make_dlq(amqp, queue_name))
    dlq = f"{queue_name}.dlq"
    await publish(amqp, dlq, letters(queue_name, 4))
    server = serve_console([dlq], token=TOKEN)
    page, watch = await watched_page(browser)
    await log_in(page, server.url)
    await page.goto(f"{server.url}/dlqs/{q(dlq)}")
    await page.locator("tr.group a.fp").first.click()
    await page.wait_for_selector("table#messages")
    await page.check('[data-select][value="m1"]')
    await page.check('[data-select][value="m3"]')
    assert (await page.inner_text("[data-selected-count]")).strip() == "2"
    await page.click("[data-replay-selected]")
    await page.click("[data-selection-go]")
    await page.wait_for_selector("[data-selection-job].done", timeout=60_000)
    assert "2 replayed, 0 skipped, 0 failed, of 2 selected" in await page.inner_text(
        "[data-selection-job]"
    )
    replayed = await drain(amqp, queue_name)
    assert sorted(t.message_id or "" for t in replayed) == ["m1", "m3"]
    left = await drain(amqp, dlq)
    assert sorted(t.message_id or "" for t in left) == ["m0", "m2"]
    watch.assert_clean()


async def test_read_only_console_offers_no_working_write_action(
    queue_name: str,
    cleanup: list[str],
    amqp: AbstractConnection,
    serve_console: ServeConsole,
    browser: Any,
) -> None:
    """Without a token: the pages say how to enable actions, every action control is
    disabled, and a change forced through the API from the page is refused (403)."""
    cleanup.extend(await make_dlq(amqp, queue_name))
    dlq = f"{queue_name}.dlq"
    await publish(amqp, dlq, letters(queue_name, 2))
    server = serve_console([dlq])
    page, watch = await watched_page(browser, allow=("403",))
    await page.goto(f"{server.url}/dlqs/{q(dlq)}")
    assert "--token-file" in await page.inner_text("#read-only")
    await page.locator("tr.group a.fp").first.click()
    await page.wait_for_selector("#actions")
    assert "started without a token" in await page.inner_text("#actions .why-disabled")
    for control in (
        "[data-dry-run]",
        "[data-canary]",
        "[data-rate]",
        "[data-purge-confirm]",
        "[data-purge]",
        "[data-replay-selected]",
        "[data-select-all]",
        "[data-select]",
    ):
        for node in await page.locator(control).all():
            assert await node.is_disabled(), control
    await shoot(page, "read-only")
    await page.goto(f"{server.url}/dlqs/{q(dlq)}/messages/m0")
    assert await page.locator("[data-edit-body]").is_disabled()
    assert await page.locator("[data-edit-go]").is_disabled()
    status = await page.evaluate(
        """async (dlq) => {
            const r = await fetch("/api/dlqs/" + encodeURIComponent(dlq) + "/replay", {
                method: "POST", headers: {"Content-Type": "application/json"},
                body: JSON.stringify({filter: {}})});
            return r.status;
        }""",
        dlq,
    )
    assert status == 403
    await asyncio.sleep(0.2)
    assert await depth(amqp, dlq) == 2
    watch.assert_clean()


async def test_group_messages_are_paginated(
    queue_name: str,
    cleanup: list[str],
    amqp: AbstractConnection,
    serve_console: ServeConsole,
    browser: Any,
) -> None:
    """60 dead letters of one group: 50 on page 1, 10 on page 2 (no Next), Previous leads
    back to 50, and the DLQ still holds all 60."""
    cleanup.extend(await make_dlq(amqp, queue_name))
    dlq = f"{queue_name}.dlq"
    await publish(amqp, dlq, letters(queue_name, 60))
    server = serve_console([dlq])
    page, watch = await watched_page(browser)
    try:
        await page.goto(f"{server.url}/dlqs/{q(dlq)}")
        await page.locator("tr.group a.fp").first.click()
        await page.wait_for_selector("table#messages")
        first = await page.locator("table#messages td.mid a").all_inner_texts()
        assert len(first) == 50
        await page.click("nav.pager a[rel=next]")
        await page.wait_for_url("**?page=2")
        second = await page.locator("table#messages td.mid a").all_inner_texts()
        assert len(second) == 10
        # The pages are the DLQ in order, neither skipping nor repeating (docs/console.md).
        assert first + second == [f"m{i}" for i in range(60)]
        assert await page.locator("nav.pager a[rel=next]").count() == 0
        await page.click("nav.pager a[rel=prev]")
        await page.wait_for_url("**?page=1")
        assert await page.locator("table#messages tr.message").count() == 50
        assert await depth(amqp, dlq) == 60  # browsing removed nothing
        watch.assert_clean()
    finally:
        await page.context.close()


async def test_replay_to_another_queue_names_it_and_refuses_a_missing_one(
    queue_name: str,
    cleanup: list[str],
    amqp: AbstractConnection,
    serve_console: ServeConsole,
    browser: Any,
) -> None:
    """The "To queue" field reaches the replay: a queue that does not exist fails the dry
    run with the reason (nothing moves); an existing one receives the group."""
    cleanup.extend(await make_dlq(amqp, queue_name))
    dlq, parking = f"{queue_name}.dlq", f"{queue_name}.parking"
    cleanup.append(parking)
    channel = await amqp.channel()
    await channel.declare_queue(parking, durable=True)
    await channel.close()
    await publish(amqp, dlq, letters(queue_name, 2))
    server = serve_console([dlq], token=TOKEN)
    page, watch = await watched_page(browser)
    await log_in(page, server.url)
    await page.goto(f"{server.url}/dlqs/{q(dlq)}")
    await page.locator("tr.group a.fp").first.click()
    await page.wait_for_selector("#replay-group")

    await page.fill("[data-to]", f"{queue_name}.nowhere")
    await page.click("[data-dry-run]")
    await page.wait_for_selector("#replay-group [data-job].failed", timeout=30_000)
    assert "The dry run failed" in await page.inner_text("#replay-group [data-job]")
    assert await depth(amqp, dlq) == 2

    await page.fill("[data-to]", parking)
    await page.fill("[data-canary]", "")
    await page.click("[data-dry-run]")
    summary = page.locator("[data-dry-summary]")
    await summary.wait_for(state="visible", timeout=30_000)
    assert f"To queue {parking}." in await summary.inner_text()
    await page.click("[data-replay-go]")
    await page.wait_for_selector("#replay-group [data-job].done", timeout=30_000)
    moved = await drain(amqp, parking)
    assert sorted(t.message_id or "" for t in moved) == ["m0", "m1"]
    assert await depth(amqp, dlq) == 0
    watch.assert_clean()
