"""The console's JSON API on the real broker: every endpoint of SPEC section 7, its shapes
and values, and a clear answer (never a 500) for bad input.

Dead letters are real where the content does not matter (the ``shop`` app's handler raises
``Permanent``); hand-published, worker-shaped ones (``tests.support.dlq``) where a test
needs chosen reasons, times, codes or odd names.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import urllib.parse
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aio_pika.abc import AbstractConnection

from qworker import dlq as lib
from qworker import headers as h
from qworker.console import api
from qworker.console.openapi import DESCRIPTION
from qworker.dlq import audit
from qworker.testing import running
from qworker.topology import quarantine_name
from tests.console.conftest import ConsoleUnderTest, MakeConsole, Shop, quoted
from tests.support.broker import depth, eventually, eventually_depth, publish_job
from tests.support.dlq import Letter, drain, failure, letters, make_dlq, publish
from tests.support.workers import WorkerProcess

pytestmark = pytest.mark.rabbitmq

TOKEN = "api-test-token-0123456789abcdef"
FINGERPRINT = re.compile(r"[0-9a-f]{12}")


def at(minutes: int) -> str:
    """A failure time ``minutes`` after a fixed instant (ISO 8601)."""
    return (datetime(2026, 11, 20, 8, 0, tzinfo=UTC) + timedelta(minutes=minutes)).isoformat()


def ids(records: list[dict[str, Any]]) -> list[str]:
    return [r["message_id"] for r in records]


async def assorted(amqp: AbstractConnection, queue: str, cleanup: list[str]) -> list[Letter]:
    """Declare ``queue``'s topology (its names go to ``cleanup``); publish 8 dead letters of
    4 kinds to its DLQ, in this order:

    - k0..k2: KeyError, permanent_error, billing.handlers:charge, failed at minutes 0-2
    - v0, v1: ValueError, timeout, shipping.handlers:dispatch, minutes 10-11, code E_SHIP
    - c0: KeyError as k*, but code E_LIMIT and minute 20, body mentions "needle"
    - p0, p1: RuntimeError, poison, mail.handlers:send, minutes 30-31
    """
    seeded = [
        *(
            Letter(json.dumps({"n": i}).encode(), failure(queue, at=at(i)), f"k{i}")
            for i in range(3)
        ),
        *(
            Letter(
                b'{"parcel": 1}',
                {
                    **failure(
                        queue,
                        error_type="builtins.ValueError",
                        message="bad zip",
                        handler="shipping.handlers:dispatch",
                        reason="timeout",
                        at=at(10 + i),
                    ),
                    h.ERROR_CODE: "E_SHIP",
                },
                f"v{i}",
            )
            for i in range(2)
        ),
        Letter(
            b'{"note": "the needle is here"}',
            {**failure(queue, at=at(20)), h.ERROR_CODE: "E_LIMIT"},
            "c0",
        ),
        *(
            Letter(
                b"{}",
                failure(
                    queue,
                    error_type="builtins.RuntimeError",
                    message="worker died",
                    handler="mail.handlers:send",
                    reason="poison",
                    at=at(30 + i),
                ),
                f"p{i}",
            )
            for i in range(2)
        ),
    ]
    cleanup.extend(await make_dlq(amqp, queue))
    await publish(amqp, f"{queue}.dlq", seeded)
    return seeded


# Reading


async def test_overview_lists_every_dlq_with_depth_oldest_failure_and_top_groups(
    shop: Shop,
    queue_name: str,
    cleanup: list[str],
    amqp: AbstractConnection,
    make_console: MakeConsole,
) -> None:
    """The app's DLQ (real dead letters), a hand-filled one, an empty one and a missing one:
    each with its depth, oldest failure, top groups and scan time, or why it has none."""
    await shop.dead_letters(3)
    other = f"{queue_name}-other"
    empty = f"{queue_name}-empty"
    missing = f"{queue_name}-missing.dlq"
    cleanup.extend([*await make_dlq(amqp, other), *await make_dlq(amqp, empty)])
    await publish(amqp, f"{other}.dlq", letters(other, 2, at=at(5)))
    c = await make_console(f"{other}.dlq", f"{empty}.dlq", missing, app=shop.app)
    before = datetime.now(UTC)

    answer = await c.get("/api/dlqs")

    assert answer.status_code == 200, answer.text
    rows = {row["queue"]: row for row in answer.json()}
    assert list(rows) == [f"{other}.dlq", f"{empty}.dlq", missing, shop.dlq]
    for row in rows.values():
        assert {"queue", "messages", "oldest_failure"} <= row.keys()
    real = rows[shop.dlq]
    assert (real["messages"], real["exists"], real["problem"]) == (3, True, None)
    oldest = datetime.fromisoformat(real["oldest_failure"])
    assert before - timedelta(minutes=1) < oldest <= datetime.now(UTC)
    [group] = real["top_groups"]
    assert group["count"] == 3 and group["error_type"] == "qworker.errors.Permanent"
    assert group["error_code"] == "UNKNOWN_CUSTOMER" and group["reason"] == "permanent_error"
    assert group["handler"].endswith(".charge")
    assert real["scan"]["stale"] is False and real["scan"]["depth_now"] == 3
    hand = rows[f"{other}.dlq"]
    assert (hand["messages"], hand["oldest_failure"]) == (2, at(5))
    assert rows[f"{empty}.dlq"] == {
        "queue": f"{empty}.dlq",
        "messages": 0,
        "oldest_failure": None,
        "exists": True,
        "top_groups": [],
        "scan": None,
        "problem": None,
    }
    gone = rows[missing]
    assert (gone["exists"], gone["messages"]) == (False, 0)
    assert "no such queue" in gone["problem"]


async def test_groups_have_every_field_and_the_scan_headers(
    queue_name: str, cleanup: list[str], amqp: AbstractConnection, make_console: MakeConsole
) -> None:
    """Largest group first; first/last failure, sample id, code; when the scan was taken."""
    await assorted(amqp, queue_name, cleanup)
    c = await make_console()
    before = datetime.now(UTC)

    answer = await c.get(c.path(f"{queue_name}.dlq", "groups"))

    assert answer.status_code == 200, answer.text
    groups = answer.json()
    assert [g["count"] for g in groups] == [3, 2, 2, 1]  # largest first (ties in any order)
    by_kind = {(g["error_type"], g["error_code"]): g for g in groups}
    keyerrors = by_kind["builtins.KeyError", None]
    shipping = by_kind["builtins.ValueError", "E_SHIP"]
    poison = by_kind["builtins.RuntimeError", None]
    coded = by_kind["builtins.KeyError", "E_LIMIT"]
    assert (keyerrors["count"], shipping["count"], poison["count"], coded["count"]) == (3, 2, 2, 1)
    keys = {"fingerprint", "count", "reason", "error_type", "handler", "first", "last"}
    assert all(keys | {"sample_message_id"} <= g.keys() for g in groups)
    assert all(FINGERPRINT.fullmatch(g["fingerprint"]) for g in groups)
    assert (keyerrors["first"], keyerrors["last"]) == (at(0), at(2))
    assert keyerrors["sample_message_id"] in {"k0", "k1", "k2"}
    assert (keyerrors["reason"], keyerrors["handler"]) == (
        "permanent_error",
        "billing.handlers:charge",
    )
    assert (shipping["reason"], shipping["handler"]) == ("timeout", "shipping.handlers:dispatch")
    assert (poison["reason"], poison["first"], poison["last"]) == ("poison", at(30), at(31))
    assert coded["sample_message_id"] == "c0"
    taken = datetime.fromisoformat(answer.headers["x-qworker-scan-taken-at"])
    assert before <= taken <= datetime.now(UTC)
    assert float(answer.headers["x-qworker-scan-seconds"]) >= 0
    assert answer.headers["x-qworker-scan-stale"] == "false"


async def test_messages_filter_by_every_key(
    queue_name: str, cleanup: list[str], amqp: AbstractConnection, make_console: MakeConsole
) -> None:
    """Each filter key of the CLI selects what the CLI's option would, oldest first."""
    await assorted(amqp, queue_name, cleanup)
    dlq = f"{queue_name}.dlq"
    c = await make_console()
    groups = (await c.get(c.path(dlq, "groups"))).json()
    shipping = next(g for g in groups if g["error_type"] == "builtins.ValueError")
    cases: list[tuple[dict[str, str], list[str]]] = [
        ({}, ["k0", "k1", "k2", "v0", "v1", "c0", "p0", "p1"]),
        ({"error_type": "KeyError"}, ["k0", "k1", "k2", "c0"]),
        ({"error_type": "builtins.ValueError"}, ["v0", "v1"]),
        ({"reason": "poison"}, ["p0", "p1"]),
        ({"reason": "expired"}, []),
        ({"handler": "dispatch"}, ["v0", "v1"]),
        ({"handler": "mail.handlers:send"}, ["p0", "p1"]),
        ({"message_id": "v1"}, ["v1"]),
        ({"grep": "needle"}, ["c0"]),
        ({"grep": "bad zip"}, ["v0", "v1"]),  # the error message
        ({"since": at(10), "until": at(20)}, ["v0", "v1", "c0"]),
        ({"since": at(30)}, ["p0", "p1"]),
        ({"until": at(1)}, ["k0", "k1"]),
        ({"fingerprint": shipping["fingerprint"]}, ["v0", "v1"]),
        ({"fingerprint": shipping["fingerprint"][:6].upper()}, ["v0", "v1"]),
        ({"error_code": "E_LIMIT"}, ["c0"]),
        ({"error_code": "E_SHIP", "message_id": "v0"}, ["v0"]),
        ({"error_type": "KeyError", "reason": "poison"}, []),
        ({"reason": "", "grep": ""}, ["k0", "k1", "k2", "v0", "v1", "c0", "p0", "p1"]),
    ]
    for params, expected in cases:
        answer = await c.get(c.path(dlq, "messages"), params=params)
        assert answer.status_code == 200, (params, answer.text)
        assert ids(answer.json()) == expected, params
        assert "x-qworker-next-offset" not in answer.headers
    assert await depth(amqp, dlq) == 8


async def test_messages_page_with_limit_offset_and_next_offset(
    queue_name: str, cleanup: list[str], amqp: AbstractConnection, make_console: MakeConsole
) -> None:
    """Pages of ``limit`` from ``offset``; X-Qworker-Next-Offset names the next page, and is
    absent on the last; paging a filtered list counts matching messages only."""
    cleanup.extend(await make_dlq(amqp, queue_name))
    dlq = f"{queue_name}.dlq"
    await publish(
        amqp,
        dlq,
        [
            *letters(queue_name, 7),
            *letters(queue_name, 3, prefix="t", reason="timeout"),
        ],
    )
    c = await make_console()
    url = c.path(dlq, "messages")
    pages: list[tuple[dict[str, Any], list[str], str | None]] = [
        ({"limit": 3}, ["m0", "m1", "m2"], "3"),
        ({"limit": 3, "offset": 3}, ["m3", "m4", "m5"], "6"),
        ({"limit": 3, "offset": 6}, ["m6", "t0", "t1"], "9"),
        ({"limit": 3, "offset": 9}, ["t2"], None),
        ({"limit": 3, "offset": 10}, [], None),
        ({"limit": 500, "offset": 0}, [*(f"m{i}" for i in range(7)), "t0", "t1", "t2"], None),
        ({"reason": "timeout", "limit": 2}, ["t0", "t1"], "2"),
        ({"reason": "timeout", "limit": 2, "offset": 2}, ["t2"], None),
        ({}, [*(f"m{i}" for i in range(7)), "t0", "t1", "t2"], None),  # default limit 50
    ]
    for params, expected, next_offset in pages:
        answer = await c.get(url, params=params)
        assert answer.status_code == 200, (params, answer.text)
        assert ids(answer.json()) == expected, params
        assert answer.headers.get("x-qworker-next-offset") == next_offset, params


async def test_one_message_is_its_export_record(
    queue_name: str, cleanup: list[str], amqp: AbstractConnection, make_console: MakeConsole
) -> None:
    """``messages/{id}``: the record as ``dlq export`` writes it (binary bodies in base64);
    an id that is in no message: 404 with a sentence."""
    cleanup.extend(await make_dlq(amqp, queue_name))
    dlq = f"{queue_name}.dlq"
    headers = failure(queue_name, at=at(3))
    await publish(
        amqp,
        dlq,
        [
            Letter(b'{"order_id": "o7"}', headers, "text"),
            Letter(b"\x00\xff\xfebin", headers, "binary", content_type=None),
        ],
    )
    c = await make_console()

    text = await c.get(c.path(dlq, "messages", "text"))
    binary = await c.get(c.path(dlq, "messages", "binary"))
    missing = await c.get(c.path(dlq, "messages", "no-such-id"))

    assert text.status_code == 200, text.text
    record = text.json()
    assert {
        k: record[k]
        for k in (
            "queue",
            "message_id",
            "reason",
            "error_type",
            "failed_at",
            "body",
            "body_encoding",
        )
    } == {
        "queue": dlq,
        "message_id": "text",
        "reason": "permanent_error",
        "error_type": "builtins.KeyError",
        "failed_at": at(3),
        "body": '{"order_id": "o7"}',
        "body_encoding": "utf-8",
    }
    assert FINGERPRINT.fullmatch(record["fingerprint"])
    assert record["headers"][h.ERROR_MESSAGE] == "customer 42 not found"
    assert record["properties"]["message_id"] == "text"
    assert binary.status_code == 200, binary.text
    assert binary.json()["body_encoding"] == "base64"
    assert base64.b64decode(binary.json()["body"]) == b"\x00\xff\xfebin"
    assert missing.status_code == 404
    assert missing.json() == {"error": f"no message with this id in {dlq}"}


async def test_export_is_jsonl_that_read_records_parses(
    queue_name: str, cleanup: list[str], amqp: AbstractConnection, make_console: MakeConsole
) -> None:
    """``export`` answers JSONL (a download) that ``qworker.dlq.read_records`` reads back:
    same ids, bodies and failures; filter and limit respected; the DLQ unchanged."""
    seeded = await assorted(amqp, queue_name, cleanup)
    dlq = f"{queue_name}.dlq"
    c = await make_console()

    everything = await c.get(c.path(dlq, "export"))
    keyerrors = await c.get(c.path(dlq, "export"), params={"error_type": "KeyError", "limit": 2})

    assert everything.status_code == 200, everything.text
    assert everything.headers["content-type"].startswith("application/x-ndjson")
    assert everything.headers["content-disposition"].startswith("attachment; filename=")
    records = list(lib.read_records(everything.text.splitlines(), "export.jsonl"))
    assert [(r.message_id, r.body) for r in records] == [(s.message_id, s.body) for s in seeded]
    assert [r.error_type for r in records][:3] == ["builtins.KeyError"] * 3
    assert records[3].error_code == "E_SHIP" and records[3].reason == "timeout"
    assert [r.message_id for r in lib.read_records(keyerrors.text.splitlines(), "k")] == [
        "k0",
        "k1",
    ]
    assert await depth(amqp, dlq) == len(seeded)


# Changing


async def test_replay_runs_a_job_to_done_and_the_handler_gets_every_message(
    shop: Shop, amqp: AbstractConnection, make_console: MakeConsole
) -> None:
    """POST replay -> 202 {"job"}; the job ends ``done`` with the counts; the fixed handler
    gets each message once; the DLQ is empty; the audit trail names the console."""
    order_ids = await shop.dead_letters(4)
    c = await make_console(app=shop.app, token=TOKEN)
    shop.fixed = True
    since = datetime.now(UTC) - timedelta(seconds=5)
    async with running(shop.app):
        started = await c.post(c.path(shop.dlq, "replay"), {})
        assert started.status_code == 202, started.text
        assert set(started.json()) == {"job", "state"}
        job = await c.wait_job(started.json()["job"])
        await eventually(lambda: len(shop.handled) == 4, message=lambda: str(shop.handled))
    assert job["state"] == "done", job
    assert (job["replayed"], job["skipped"], job["failed"], job["error"]) == (4, 0, 0, None)
    assert job["kind"] == "replay" and job["dlq"] == shop.dlq and job["finished_at"]
    assert "console" in job["actor"]
    assert sorted(shop.handled) == order_ids
    assert await depth(amqp, shop.dlq) == 0
    [record] = [r async for r in audit.read(amqp, since=since) if r.dlq == shop.dlq]
    assert (record.action, record.outcome, record.replay_id) == ("replay", "ok", job["replay_id"])
    assert "(console, from " in record.actor
    assert record.counts == {"replayed": 4, "skipped": 0, "failed": 0}
    assert sorted(record.message_ids) == order_ids


async def test_a_dry_run_counts_and_changes_nothing(
    queue_name: str, cleanup: list[str], amqp: AbstractConnection, make_console: MakeConsole
) -> None:
    """``dry_run``: the job says how many would go (filter respected); nothing moves, no
    audit record."""
    cleanup.extend(await make_dlq(amqp, queue_name))
    dlq = f"{queue_name}.dlq"
    await publish(
        amqp, dlq, [*letters(queue_name, 3), *letters(queue_name, 2, prefix="t", reason="timeout")]
    )
    c = await make_console(token=TOKEN)
    since = datetime.now(UTC) - timedelta(seconds=5)

    started = await c.post(
        c.path(dlq, "replay"), {"dry_run": True, "filter": {"reason": "timeout"}}
    )

    assert started.status_code == 202, started.text
    job = await c.wait_job(started.json()["job"])
    assert (job["state"], job["kind"], job["would_replay"], job["replayed"]) == (
        "done",
        "dry-run",
        2,
        0,
    )
    assert (await depth(amqp, dlq), await depth(amqp, queue_name)) == (5, 0)
    assert [r async for r in audit.read(amqp, since=since) if r.dlq == dlq] == []
    again = await c.get(c.path(dlq, "messages"))
    assert ids(again.json()) == ["m0", "m1", "m2", "t0", "t1"]


async def test_a_canary_that_passes_lets_the_rest_go(
    shop: Shop, amqp: AbstractConnection, make_console: MakeConsole
) -> None:
    """``canary`` 2: two go first, are handled, then the other three; the job says passed."""
    await shop.dead_letters(5)
    c = await make_console(token=TOKEN)
    shop.fixed = True
    async with running(shop.app):
        started = await c.post(
            c.path(shop.dlq, "replay"), {"canary": 2, "canary_wait": 0.3, "canary_timeout": 20}
        )
        job = await c.wait_job(started.json()["job"])
        await eventually(lambda: len(shop.handled) == 5)
    assert (job["state"], job["canary"], job["replayed"]) == ("done", "passed", 5), job
    assert await depth(amqp, shop.dlq) == 0


async def test_a_canary_that_dies_again_stops_the_replay(
    shop: Shop, amqp: AbstractConnection, make_console: MakeConsole
) -> None:
    """Still broken: the two canaries die again, the job fails saying so, and the other
    three were never touched (all five are in the DLQ again)."""
    await shop.dead_letters(5)
    c = await make_console(token=TOKEN)
    async with running(shop.app):
        started = await c.post(
            c.path(shop.dlq, "replay"), {"canary": 2, "canary_wait": 0.3, "canary_timeout": 20}
        )
        job = await c.wait_job(started.json()["job"])
        await eventually_depth(amqp, shop.dlq, 5)  # the canaries died again
        left = await drain(amqp, shop.dlq, settle=True)
    assert (job["state"], job["canary"]) == ("failed", "died"), job
    assert job["replayed"] == 2 and "canary" in job["error"]
    replays = sorted(h.read_int(t.headers, h.REPLAY_COUNT) for t in left)
    assert replays == [0, 0, 0, 1, 1]


async def test_rate_and_to(
    queue_name: str, cleanup: list[str], amqp: AbstractConnection, make_console: MakeConsole
) -> None:
    """``to`` sends every copy to another queue; ``rate`` 10/s spreads 6 over about 0.5 s."""
    target = f"{queue_name}.fixed"
    cleanup.extend([*await make_dlq(amqp, queue_name), target])
    channel = await amqp.channel()
    await channel.declare_queue(target, durable=True)
    await channel.close()
    dlq = f"{queue_name}.dlq"
    await publish(amqp, dlq, letters(queue_name, 6))
    c = await make_console(token=TOKEN)

    started = await c.post(c.path(dlq, "replay"), {"to": target, "rate": 10})

    job = await c.wait_job(started.json()["job"])
    assert (job["state"], job["replayed"]) == ("done", 6), job
    took = datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"])
    assert took >= timedelta(seconds=0.4), took
    assert sorted(t.message_id or "" for t in await drain(amqp, target)) == [
        f"m{i}" for i in range(6)
    ]
    assert (await depth(amqp, dlq), await depth(amqp, queue_name)) == (0, 0)


async def test_purge_needs_the_exact_name_and_removes_only_the_filtered(
    queue_name: str, cleanup: list[str], amqp: AbstractConnection, make_console: MakeConsole
) -> None:
    """A missing or wrong ``confirm``: 400, nothing goes. Right: a job that purges the
    filtered messages only; the others stay, in order."""
    cleanup.extend(await make_dlq(amqp, queue_name))
    dlq = f"{queue_name}.dlq"
    await publish(
        amqp, dlq, [*letters(queue_name, 3), *letters(queue_name, 2, prefix="t", reason="timeout")]
    )
    c = await make_console(token=TOKEN)
    url = c.path(dlq, "purge")
    for body, says in (
        ({"filter": {"reason": "timeout"}}, 'purging needs "confirm"'),
        ({"confirm": queue_name}, "confirm with the DLQ's exact name"),
        ({"confirm": dlq.upper()}, "confirm with the DLQ's exact name"),
        ({"confirm": f" {dlq}"}, "confirm with the DLQ's exact name"),
        ({"confirm": 5}, 'purging needs "confirm"'),
        ({"confirm": dlq, "everything": True}, "unknown field 'everything'"),
    ):
        refused = await c.post(url, body)
        assert refused.status_code == 400, (body, refused.text)
        assert says in refused.json()["error"], body
    assert await depth(amqp, dlq) == 5

    started = await c.post(url, {"confirm": dlq, "filter": {"reason": "timeout"}})

    assert started.status_code == 202, started.text
    job = await c.wait_job(started.json()["job"])
    assert (job["state"], job["kind"], job["purged"]) == ("done", "purge", 2), job
    assert [t.message_id for t in await drain(amqp, dlq)] == ["m0", "m1", "m2"]


async def test_edit_is_validated_by_the_handler_then_replays_the_new_body(
    shop: Shop, amqp: AbstractConnection, make_console: MakeConsole
) -> None:
    """With the app known, a body its handler's pydantic payload refuses is a 422 that says
    why (nothing changes); a good one goes back to the queue, is handled, and leaves the DLQ."""
    await shop.dead_letters(1)
    c = await make_console(app=shop.app, token=TOKEN)
    url = c.path(shop.dlq, "messages", "o0", "edit")

    refused = await c.post(url, {"body": '{"order_id": "o0", "amount_cents": "lots"}'})
    not_json = await c.post(url, {"body": "order o0, 12 euros"})

    assert refused.status_code == 422, refused.text
    assert refused.json()["error"].startswith("the handler would refuse this body")
    assert "amount_cents" in refused.json()["error"]
    assert not_json.status_code == 422, not_json.text
    assert (await depth(amqp, shop.dlq), await depth(amqp, shop.queue)) == (1, 0)

    shop.fixed = True
    async with running(shop.app):
        edited = await c.post(url, {"body": '{"order_id": "o0", "amount_cents": 1250}'})
        assert edited.status_code == 200, edited.text
        await eventually(lambda: shop.handled == ["o0"])
    assert edited.json() == {
        "target": shop.queue,
        "message_id": "o0",
        "validated": True,
        "warning": None,
    }
    assert await depth(amqp, shop.dlq) == 0


async def test_edit_takes_base64_and_to(
    queue_name: str, cleanup: list[str], amqp: AbstractConnection, make_console: MakeConsole
) -> None:
    """Without an app, nothing validates (``validated`` false); a base64 body arrives as
    those exact bytes, in the ``to`` queue; an unknown id is a 404."""
    target = f"{queue_name}.fixed"
    cleanup.extend([*await make_dlq(amqp, queue_name), target])
    channel = await amqp.channel()
    await channel.declare_queue(target, durable=True)
    await channel.close()
    dlq = f"{queue_name}.dlq"
    await publish(amqp, dlq, letters(queue_name, 2))
    c = await make_console(token=TOKEN)
    new = b"\x00\x01binary\xff"

    edited = await c.post(
        c.path(dlq, "messages", "m1", "edit"),
        {"body": base64.b64encode(new).decode(), "body_encoding": "base64", "to": target},
    )
    missing = await c.post(c.path(dlq, "messages", "nope", "edit"), {"body": "{}"})

    assert edited.status_code == 200, edited.text
    assert edited.json()["target"] == target and edited.json()["validated"] is False
    [taken] = await drain(amqp, target)
    assert (taken.message_id, taken.body) == ("m1", new)
    assert missing.status_code == 404 and missing.json() == {
        "error": f"no message with this id in {dlq}"
    }
    assert [t.message_id for t in await drain(amqp, dlq)] == ["m0"]


async def test_a_worker_process_dead_letter_edited_in_the_console_is_handled(
    worker: WorkerProcess,
    queue_name: str,
    cleanup: list[str],
    amqp: AbstractConnection,
    make_console: MakeConsole,
) -> None:
    """A real worker (``qworker run``, the ledger app) dead-letters a message; the console
    shows its group and record as the worker wrote them; an edit to a good body goes back to
    the worker, which handles it."""
    cleanup.append(quarantine_name(queue_name))  # the worker fixture does not list it
    worker.start()
    await publish_job(amqp, queue_name, "job-1", mode="permanent")
    dlq = f"{queue_name}.dlq"
    await eventually_depth(amqp, dlq, 1)
    c = await make_console(dlq, token=TOKEN)

    [group] = (await c.get(c.path(dlq, "groups"))).json()
    record = (await c.get(c.path(dlq, "messages", "job-1"))).json()
    edited = await c.post(
        c.path(dlq, "messages", "job-1", "edit"), {"body": '{"id": "job-1", "mode": "ok"}'}
    )

    assert (group["count"], group["reason"]) == (1, "permanent_error")
    assert (group["error_type"], group["handler"]) == (
        "qworker.errors.Permanent",
        "tests.apps.ledger_app:handle",
    )
    assert group["sample_message_id"] == "job-1"
    assert record["headers"][h.ERROR_MESSAGE] == "bad message"
    assert "Traceback" in record["headers"][h.ERROR_TRACEBACK]
    assert json.loads(record["body"]) == {"id": "job-1", "mode": "permanent"}
    assert edited.status_code == 200, edited.text
    assert (edited.json()["target"], edited.json()["validated"]) == (queue_name, False)
    await eventually(lambda: worker.ledger() == ["job-1"], message=worker.output)
    assert await depth(amqp, dlq) == 0


async def test_targets_a_replay_cannot_have_are_refused_and_nothing_moves(
    queue_name: str, cleanup: list[str], amqp: AbstractConnection, make_console: MakeConsole
) -> None:
    """``to`` a reserved ``amq.*`` name, the DLQ itself or a name with control characters:
    400 before any job; a missing queue: the job fails saying so; an edit answers 400/404;
    a filter that selects nothing is a job done with zero counts."""
    cleanup.extend(await make_dlq(amqp, queue_name))
    dlq = f"{queue_name}.dlq"
    await publish(amqp, dlq, letters(queue_name, 2))
    c = await make_console(token=TOKEN)
    for to, says in (
        ("amq.gen-x", "is a reserved amq.* name"),
        (dlq, "is the DLQ itself"),
        ("bad\x01name", "queue name contains control characters"),
    ):
        refused = await c.post(c.path(dlq, "replay"), {"to": to})
        assert refused.status_code == 400, (to, refused.text)
        assert says in refused.json()["error"], (to, refused.text)
    started = await c.post(c.path(dlq, "replay"), {"to": f"{queue_name}.ghost"})
    job = await c.wait_job(started.json()["job"])
    assert (job["state"], job["replayed"]) == ("failed", 0), job
    assert "not found" in job["error"], job
    for to, status in (("amq.x", 400), (f"{queue_name}.ghost", 404)):
        edit = await c.post(c.path(dlq, "messages", "m0", "edit"), {"body": "{}", "to": to})
        assert edit.status_code == status, (to, edit.text)
    nothing = await c.post(c.path(dlq, "replay"), {"filter": {"message_id": "absent"}})
    job = await c.wait_job(nothing.json()["job"])
    assert (job["state"], job["replayed"], job["skipped"], job["failed"]) == ("done", 0, 0, 0)
    assert [t.message_id for t in await drain(amqp, dlq)] == ["m0", "m1"]


async def test_an_edit_to_the_dlq_itself_is_a_400(
    queue_name: str, cleanup: list[str], amqp: AbstractConnection, make_console: MakeConsole
) -> None:
    """``to`` naming the DLQ itself is a bad request, like ``amq.*``: 400 (and not 409,
    which tells the user to wait and try again)."""
    cleanup.extend(await make_dlq(amqp, queue_name))
    dlq = f"{queue_name}.dlq"
    await publish(amqp, dlq, letters(queue_name, 1))
    c = await make_console(token=TOKEN)
    edit = await c.post(c.path(dlq, "messages", "m0", "edit"), {"body": "{}", "to": dlq})
    assert "is the DLQ itself" in edit.json()["error"]
    assert edit.status_code == 400, edit.text
    assert await depth(amqp, dlq) == 1


async def test_an_unknown_job_is_404(make_console: MakeConsole) -> None:
    """``GET /api/jobs/{id}`` of a job this console never ran: 404 with a sentence."""
    c = await make_console()
    answer = await c.get("/api/jobs/0123456789abcdef")
    assert answer.status_code == 404
    assert answer.json()["error"].startswith("no such job")


async def test_openapi_describes_every_api_route_and_nothing_else(
    make_console: MakeConsole,
) -> None:
    """``/api/openapi.json`` is the description; its paths and methods are the API routes'."""
    c = await make_console()
    answer = await c.get("/api/openapi.json")
    assert answer.status_code == 200
    assert answer.json() == json.loads(json.dumps(DESCRIPTION))

    def shape(path: str) -> str:  # parameter names and convertors aside
        return re.sub(r"\{[^}]+\}", "{}", path)

    routed = {
        (shape(route.path), method.lower())
        for route in api.routes
        for method in (route.methods or ())
        if method != "HEAD"
    }
    described = {
        (shape(path), method)
        for path, operations in answer.json()["paths"].items()
        for method in operations
    }
    assert described == routed


# Queue names with '/', spaces and unicode


async def test_a_dlq_named_with_slash_and_spaces_works_end_to_end(
    cleanup: list[str], amqp: AbstractConnection, make_console: MakeConsole
) -> None:
    """``eu/orders +#@,:1.dlq``, percent-encoded in every path, and a message id with ``/``:
    overview, groups, messages, one message, export, replay to its origin, purge."""
    queue = f"test.{uuid.uuid4().hex[:8]}/eu orders +#@,:1"
    dlq = f"{queue}.dlq"
    cleanup.extend(await make_dlq(amqp, queue))
    await publish(
        amqp,
        dlq,
        [
            Letter(b'{"n": 1}', failure(queue), "inv/2024/17"),
            Letter(b'{"n": 2}', failure(queue), "inv/2024/18"),
            Letter(b'{"n": 3}', failure(queue, reason="timeout"), "t 1"),
        ],
    )
    c = await make_console(dlq, token=TOKEN)
    assert "%2F" in c.path(dlq) and "%20" in c.path(dlq) and "%23" in c.path(dlq)

    overview = (await c.get("/api/dlqs")).json()
    groups = await c.get(c.path(dlq, "groups"))
    listed = await c.get(c.path(dlq, "messages"))
    one = await c.get(c.path(dlq, "messages", "inv/2024/17"))
    export = await c.get(c.path(dlq, "export"))

    assert [(row["queue"], row["messages"]) for row in overview] == [(dlq, 3)]
    assert groups.status_code == 200 and sum(g["count"] for g in groups.json()) == 3
    assert ids(listed.json()) == ["inv/2024/17", "inv/2024/18", "t 1"]
    assert one.status_code == 200 and one.json()["queue"] == dlq
    assert one.json()["message_id"] == "inv/2024/17"
    assert export.headers["content-disposition"].endswith('.jsonl"')
    assert len(export.text.splitlines()) == 3

    replayed = await c.post(c.path(dlq, "replay"), {"filter": {"reason": "permanent_error"}})
    job = await c.wait_job(replayed.json()["job"])
    assert (job["state"], job["replayed"]) == ("done", 2), job
    assert sorted(t.message_id or "" for t in await drain(amqp, queue)) == [
        "inv/2024/17",
        "inv/2024/18",
    ]
    purged = await c.post(c.path(dlq, "purge"), {"confirm": dlq})
    job = await c.wait_job(purged.json()["job"])
    assert (job["state"], job["purged"]) == ("done", 1), job
    assert await depth(amqp, dlq) == 0


# Bad input: a clear answer, never a 500


async def bad_read(c: ConsoleUnderTest, url: str, params: dict[str, Any] | None = None) -> Any:
    answer = await c.get(url, params=params)
    assert answer.status_code < 500, (url, params, answer.status_code, answer.text)
    return answer


async def test_bad_queries_are_400_with_a_sentence(
    queue_name: str, cleanup: list[str], amqp: AbstractConnection, make_console: MakeConsole
) -> None:
    """Unknown parameters, filter values the CLI refuses, limits and offsets out of range."""
    cleanup.extend(await make_dlq(amqp, queue_name))
    dlq = f"{queue_name}.dlq"
    await publish(amqp, dlq, letters(queue_name, 2))
    c = await make_console()
    messages, export = c.path(dlq, "messages"), c.path(dlq, "export")
    cases: list[tuple[str, dict[str, Any], str]] = [
        (messages, {"bogus": "1"}, "unknown parameter 'bogus'"),
        (messages, {"error-type": "KeyError"}, "unknown parameter 'error-type'"),
        (messages, {"limit": "0"}, "limit must be 1 to 500"),
        (messages, {"limit": "501"}, "limit must be 1 to 500"),
        (messages, {"limit": "ten"}, "limit must be a whole number"),
        (messages, {"limit": "-1"}, "limit must be a whole number"),
        (messages, {"limit": "1" * 30}, "limit must be a whole number"),
        (messages, {"offset": "-5"}, "offset must be a whole number"),
        (messages, {"offset": "1.5"}, "offset must be a whole number"),
        (messages, {"reason": "nope"}, "unknown reason 'nope'"),
        (messages, {"fingerprint": "xyz"}, "fingerprint 'xyz'"),
        (messages, {"error_code": "a b"}, "cannot match"),
        (messages, {"since": "the other day"}, "cannot read time"),
        (messages, {"since": at(5), "until": at(1)}, "since is later than until"),
        (export, {"offset": "3"}, "unknown parameter 'offset'"),
        (export, {"limit": "x"}, "limit must be a whole number"),
        (c.path(dlq, "groups"), {}, ""),  # rescan absent: fine, the control case
    ]
    for url, params, says in cases:
        answer = await bad_read(c, url, params)
        if not says:
            assert answer.status_code == 200
            continue
        assert answer.status_code == 400, (params, answer.text)
        assert says in answer.json()["error"], (params, answer.json())
        assert "--" not in answer.json()["error"]
    assert await depth(amqp, dlq) == 2


async def test_bad_bodies_are_400_and_change_nothing(
    queue_name: str, cleanup: list[str], amqp: AbstractConnection, make_console: MakeConsole
) -> None:
    """Not JSON, not an object, unknown fields, wrong types, a body over 8 MiB: 400 with a
    sentence, and the DLQ as it was."""
    cleanup.extend(await make_dlq(amqp, queue_name))
    dlq = f"{queue_name}.dlq"
    await publish(amqp, dlq, letters(queue_name, 2))
    c = await make_console(token=TOKEN)
    replay, purge = c.path(dlq, "replay"), c.path(dlq, "purge")
    edit = c.path(dlq, "messages", "m0", "edit")
    raw_cases: list[tuple[str, bytes, str]] = [
        (replay, b"{not json", "the body is not JSON"),
        (replay, b"\xff\xfe", "the body is not JSON"),
        (replay, b"[]", "the body must be a JSON object"),
        (replay, b'"replay"', "the body must be a JSON object"),
        (replay, b"null", "the body must be a JSON object"),
        (replay, b" " * (8 * 1024 * 1024 + 1), "request body over 8 MiB"),
        (edit, b'{"body": "' + b"x" * (9 * 1024 * 1024) + b'"}', "request body over 8 MiB"),
    ]
    for url, raw, says in raw_cases:
        answer = await c.client.post(url, content=raw, headers=c.bearer)
        assert answer.status_code in (400, 413), (raw[:20], answer.text)
        assert says in answer.json()["error"], (raw[:20], answer.json())
    json_cases: list[tuple[str, Any, str]] = [
        (replay, {"filter": {"bogus": "x"}}, "unknown filter key 'bogus'"),
        (replay, {"filter": "reason=timeout"}, "filter must be a JSON object"),
        (replay, {"filter": {"reason": 3}}, "filter reason must be text, not int"),
        (replay, {"filter": {"reason": "nope"}}, "unknown reason"),
        (replay, {"canary": "2"}, "canary must be a whole number"),
        (replay, {"rate": -1}, "rate must be a number above 0"),
        (replay, {"dry_run": "true"}, "dry_run must be true or false"),
        (replay, {"to": ""}, "to must be non-empty text"),
        (replay, {"to": "x" * 256}, "longer than 255 bytes"),
        (replay, {"everything": True}, "unknown field 'everything'"),
        (purge, {"confirm": dlq, "limit": 0}, "limit must be 1 or more"),
        (purge, {"confirm": dlq, "filter": {"since": "soon"}}, "cannot read time"),
        (edit, {}, '"body" must be text'),
        (edit, {"body": {"a": 1}}, '"body" must be text'),
        (edit, {"body": "%%%", "body_encoding": "base64"}, '"body" is not valid base64'),
        (edit, {"body": "x", "body_encoding": "utf-16"}, '"body_encoding" must be'),
        (edit, {"body": "x", "headers": {}}, "unknown field 'headers'"),
        (edit, {"body": "x", "to": 7}, "to must be non-empty text"),
    ]
    for url, body, says in json_cases:
        answer = await c.post(url, body)
        assert answer.status_code == 400, (body, answer.text)
        assert says in answer.json()["error"], (body, answer.json())
    assert [t.message_id for t in await drain(amqp, dlq)] == ["m0", "m1"]


async def test_names_no_queue_can_have_and_missing_queues_are_clear(
    queue_name: str, cleanup: list[str], amqp: AbstractConnection, make_console: MakeConsole
) -> None:
    """Over 255 bytes: 400 before the broker is asked. A DLQ that does not exist: 404. An
    empty name matches no route: 404. Never a 500."""
    cleanup.extend(await make_dlq(amqp, queue_name))
    c = await make_console(token=TOKEN)
    too_long = "q" * 256
    for url in (c.path(too_long, "groups"), c.path(too_long, "messages"), c.path(too_long)):
        answer = await bad_read(c, url)
        if url.endswith(quoted(too_long)):
            assert answer.status_code == 404  # /api/dlqs/{dlq} alone is no route
            continue
        assert answer.status_code == 400, answer.text
        assert "longer than 255 bytes" in answer.json()["error"]
    for name in (f"{queue_name}.nothing.dlq", f"{queue_name}/no such/queue.dlq"):
        for url in (
            c.path(name, "groups"),
            c.path(name, "messages"),
            c.path(name, "messages", "m0"),
            c.path(name, "export"),
        ):
            answer = await bad_read(c, url)
            assert answer.status_code == 404, (name, url, answer.text)
            assert "not found" in answer.json()["error"], answer.json()
    for url in ("/api/dlqs//groups", "/api/dlqs//messages", "/api/dlqs/x/messages//edit"):
        answer = await bad_read(c, url)
        assert answer.status_code in (404, 405), (url, answer.text)
    assert (await c.get("/api/dlqs")).status_code == 200  # the console still answers


#: Names RabbitMQ accepts (any UTF-8 up to 255 bytes) that aio-pika's protocol layer (pamqp)
#: refuses to send: it allows only ``[a-zA-Z0-9-_.:@#,/+ ]`` in a queue name.


async def management(base: str, method: str, path: str, body: Any = None) -> Any:
    """A call of the broker's management API (to make what aio-pika cannot name)."""
    parts = urllib.parse.urlsplit(base)
    auth = base64.b64encode(f"{parts.username}:{parts.password}".encode()).decode()
    request = urllib.request.Request(
        f"{parts.scheme}://{parts.hostname}:{parts.port}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"authorization": f"Basic {auth}", "content-type": "application/json"},
    )

    def call() -> Any:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
            return json.loads(raw) if raw else None

    return await asyncio.to_thread(call)


async def test_a_dlq_named_with_unicode_gets_a_clear_refusal(
    management_url: str, make_console: MakeConsole
) -> None:
    """``eu/orders ü✓.dlq`` (made and filled through the management API, since aio-pika
    cannot name it): pamqp refuses to send such a name, so every read answers 400 with
    a sentence saying why and the overview shows the DLQ with that problem (a decision:
    docs/console.md); no frame is sent, so nothing can be lost."""
    dlq = f"test.{uuid.uuid4().hex[:8]}/eu orders \u00fc\u2713.dlq"
    where = f"/api/queues/%2F/{quoted(dlq)}"
    await management(management_url, "PUT", where, {"durable": True})
    try:
        for i in range(2):
            headers = {
                h.REASON: "permanent_error",
                h.ERROR_TYPE: "builtins.KeyError",
                h.ERROR_MESSAGE: "customer 42 not found",
                h.LAST_FAILURE_AT: at(i),
            }
            routed = await management(
                management_url,
                "POST",
                "/api/exchanges/%2F/amq.default/publish",
                {
                    "properties": {"message_id": f"u{i}", "headers": headers},
                    "routing_key": dlq,
                    "payload": '{"n": 1}',
                    "payload_encoding": "string",
                },
            )
            assert routed == {"routed": True}
        c = await make_console(dlq)
        assert "%C3%BC" in c.path(dlq)

        overview = await c.get("/api/dlqs")
        reads = [
            await c.get(c.path(dlq, "groups")),
            await c.get(c.path(dlq, "messages")),
            await c.get(c.path(dlq, "messages", "u1")),
            await c.get(c.path(dlq, "export")),
        ]

        assert overview.status_code == 200, overview.text
        [row] = overview.json()
        assert (row["queue"], row["exists"]) == (dlq, False)
        assert "pamqp" in row["problem"]
        for read in reads:
            assert read.status_code == 400, read.text
            assert "can only address queue names" in read.json()["error"]
    finally:
        await management(management_url, "DELETE", where)


async def test_names_the_client_cannot_send_get_a_clear_4xx(
    queue_name: str, make_console: MakeConsole
) -> None:
    """Control characters, non-ASCII, brackets: every read of such a DLQ answers 400 or 404
    with a sentence, never a 500."""
    c = await make_console()
    for name in (f"{queue_name}\x01.dlq", f"{queue_name}\n.dlq", f"{queue_name}-\u00e9.dlq"):
        for url in (c.path(name, "groups"), c.path(name, "messages"), c.path(name, "export")):
            answer = await c.get(url)
            assert answer.status_code in (400, 404), (name, url, answer.status_code, answer.text)
            assert answer.json()["error"]


async def test_one_odd_name_does_not_hide_the_other_dlqs(
    queue_name: str, cleanup: list[str], amqp: AbstractConnection, make_console: MakeConsole
) -> None:
    """The overview shows every DLQ; a name the client cannot send gets a ``problem`` row
    (as a missing queue does) instead of failing the whole page."""
    cleanup.extend(await make_dlq(amqp, queue_name))
    await publish(amqp, f"{queue_name}.dlq", letters(queue_name, 1))
    c = await make_console(f"{queue_name}.dlq", f"{queue_name}(eu).dlq")
    answer = await c.get("/api/dlqs")
    assert answer.status_code == 200, answer.text
    rows = answer.json()
    assert [(row["queue"], row["exists"]) for row in rows] == [
        (f"{queue_name}.dlq", True),
        (f"{queue_name}(eu).dlq", False),
    ]
    assert rows[1]["problem"]


async def test_actions_on_a_missing_dlq_say_not_found(
    queue_name: str, make_console: MakeConsole
) -> None:
    """Replay, purge and edit of a DLQ that does not exist: a clear 404 or a job that failed
    saying so, never a 500 and never a job that claims success."""
    c = await make_console(token=TOKEN)
    dlq = f"{queue_name}.dlq"
    edit = await c.post(c.path(dlq, "messages", "m0", "edit"), {"body": "{}"})
    assert edit.status_code == 404, edit.text
    for url, body in ((c.path(dlq, "replay"), {}), (c.path(dlq, "purge"), {"confirm": dlq})):
        answer = await c.post(url, body)
        assert answer.status_code in (202, 404), answer.text
        if answer.status_code == 202:
            job = await c.wait_job(answer.json()["job"])
            assert job["state"] == "failed", job
            assert "not found" in job["error"], job
        else:
            assert "not found" in answer.json()["error"]
