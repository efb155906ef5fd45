"""The console's guarantees on the real broker, through its API: browsing removes and
reorders nothing, passes over one DLQ take turns, actions exclude reads and each other, a
CLI replay at the same time loses nothing, scans are cached and dropped after a change,
and a broker that is down is asked at most once per back-off.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import httpx
import pytest
from aio_pika.abc import AbstractConnection

from qworker import dlq as lib
from qworker.connection import connect_once
from qworker.console import broker
from tests.console.conftest import ConsoleUnderTest, MakeConsole
from tests.support.broker import depth
from tests.support.dlq import drain, letters, make_dlq, publish

pytestmark = pytest.mark.rabbitmq

TOKEN = "service-test-token-0123456789abcdef"


def ids(answer: Any) -> list[str]:
    return [record["message_id"] for record in answer.json()]


async def filled(amqp: AbstractConnection, queue: str, count: int, cleanup: list[str]) -> str:
    """``queue``'s topology (its names go to ``cleanup``); its DLQ with ``count`` KeyErrors
    ``m*`` then ``count // 3`` ValueError timeouts ``t*`` (two groups, two fingerprints)."""
    cleanup.extend(await make_dlq(amqp, queue))
    dlq = f"{queue}.dlq"
    timeouts = letters(
        queue, count // 3, prefix="t", reason="timeout", error_type="builtins.ValueError"
    )
    await publish(amqp, dlq, [*letters(queue, count), *timeouts])
    return dlq


# Browsing


async def browse_everything(c: ConsoleUnderTest, dlq: str) -> list[httpx.Response]:
    """One of each read: overview, groups (cached and rescanned), two pages, a filter, one
    message, a missing one, an export."""
    return [
        await c.get("/api/dlqs"),
        await c.get(c.path(dlq, "groups")),
        await c.get(c.path(dlq, "groups"), params={"rescan": "1"}),
        await c.get(c.path(dlq, "messages"), params={"limit": 5, "offset": 20}),
        await c.get(c.path(dlq, "messages"), params={"limit": 500}),
        await c.get(c.path(dlq, "messages"), params={"reason": "timeout"}),
        await c.get(c.path(dlq, "messages", "t7")),
        await c.get(c.path(dlq, "messages", "absent")),
        await c.get(c.path(dlq, "export")),
    ]


async def test_browsing_leaves_the_dlq_as_it_was(
    queue_name: str, cleanup: list[str], amqp: AbstractConnection, make_console: MakeConsole
) -> None:
    """Every kind of read: afterwards the DLQ holds every message, in the same order (32
    messages; see the next test for more)."""
    dlq = await filled(amqp, queue_name, 24, cleanup)
    everything = [*(f"m{i}" for i in range(24)), *(f"t{i}" for i in range(8))]
    c = await make_console(dlq)

    reads = await browse_everything(c, dlq)

    assert [r.status_code for r in reads] == [200] * 7 + [404, 200]
    assert ids(reads[4]) == everything
    assert await depth(amqp, dlq) == len(everything)
    assert [t.message_id for t in await drain(amqp, dlq)] == everything


async def test_pages_after_a_scan_neither_skip_nor_repeat_messages(
    queue_name: str, cleanup: list[str], amqp: AbstractConnection, make_console: MakeConsole
) -> None:
    """After a scan every message of a quorum DLQ has been returned once; a page that
    stopped early would move what it read behind the rest (RabbitMQ delivers returned
    messages first, in return order), so page 2 would skip. The console holds the rest
    of the queue (keep_order): pages 1, 2, 3 are the DLQ in order, which stays as it was."""
    dlq = await filled(amqp, queue_name, 150, cleanup)
    everything = [*(f"m{i}" for i in range(150)), *(f"t{i}" for i in range(50))]
    c = await make_console(dlq)
    assert (await c.get(c.path(dlq, "groups"))).status_code == 200  # the full read

    pages = [
        ids(await c.get(c.path(dlq, "messages"), params={"limit": 60, "offset": offset}))
        for offset in (0, 60, 120)
    ]
    one = await c.get(c.path(dlq, "messages", "m70"))

    assert [len(page) for page in pages] == [60, 60, 60]
    assert [m for page in pages for m in page] == everything[:180]
    assert one.status_code == 200
    assert [t.message_id for t in await drain(amqp, dlq)] == everything


async def test_browsing_a_larger_quorum_dlq_keeps_its_order(
    queue_name: str, cleanup: list[str], amqp: AbstractConnection, make_console: MakeConsole
) -> None:
    """As above with 60 messages: every read sees, and leaves, the DLQ in queue order."""
    dlq = await filled(amqp, queue_name, 45, cleanup)
    everything = [*(f"m{i}" for i in range(45)), *(f"t{i}" for i in range(15))]
    c = await make_console(dlq)

    reads = await browse_everything(c, dlq)
    again = await c.get(c.path(dlq, "messages"), params={"limit": 500})

    assert [r.status_code for r in reads] == [200] * 7 + [404, 200]
    assert await depth(amqp, dlq) == len(everything)
    assert sorted(ids(again)) == sorted(everything)  # nothing lost, whatever the order
    assert ids(again) == everything
    assert [t.message_id for t in await drain(amqp, dlq)] == everything


async def test_concurrent_reads_of_one_dlq_each_see_every_message(
    queue_name: str, cleanup: list[str], amqp: AbstractConnection, make_console: MakeConsole
) -> None:
    """Several tabs at once (two lists, a rescan, an export): the console runs their passes
    one after another, so none of them misses the messages another one holds."""
    dlq = await filled(amqp, queue_name, 30, cleanup)
    everything = [*(f"m{i}" for i in range(30)), *(f"t{i}" for i in range(10))]
    c = await make_console(dlq)

    first, second, groups, export = await asyncio.gather(
        c.get(c.path(dlq, "messages"), params={"limit": 500}),
        c.get(c.path(dlq, "messages"), params={"limit": 500}),
        c.get(c.path(dlq, "groups"), params={"rescan": "1"}),
        c.get(c.path(dlq, "export")),
    )

    # Each sees every message (the order is the next test's subject).
    assert sorted(ids(first)) == sorted(everything) == sorted(ids(second))
    assert sum(g["count"] for g in groups.json()) == 40
    assert len(export.text.splitlines()) == 40
    assert await depth(amqp, dlq) == 40


async def test_a_read_waits_its_turn_then_answers_busy(
    queue_name: str,
    cleanup: list[str],
    amqp: AbstractConnection,
    make_console: MakeConsole,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While one pass holds the DLQ, another read waits at most ``read_wait`` and then
    answers 409 saying another request reads it; the first pass is unharmed."""
    dlq = await filled(amqp, queue_name, 3, cleanup)
    scanning, release = asyncio.Event(), asyncio.Event()
    real_stats = lib.stats

    async def slow_stats(*args: Any, **kwargs: Any) -> Any:
        scanning.set()
        await release.wait()
        return await real_stats(*args, **kwargs)

    monkeypatch.setattr(lib, "stats", slow_stats)
    c = await make_console(dlq, read_wait=0.2)
    scan = asyncio.create_task(c.get(c.path(dlq, "groups")))
    await asyncio.wait_for(scanning.wait(), 10)

    began = time.monotonic()
    waiting = await c.get(c.path(dlq, "messages"))
    took = time.monotonic() - began
    release.set()
    scanned = await scan

    assert waiting.status_code == 409, waiting.text
    assert waiting.json() == {"error": f"{dlq} is being read by another request; try again"}
    assert 0.15 <= took < 5, took
    assert scanned.status_code == 200 and sum(g["count"] for g in scanned.json()) == 4


# Actions and reads


async def test_while_a_replay_runs_reads_and_other_actions_are_busy_at_once(
    queue_name: str, cleanup: list[str], amqp: AbstractConnection, make_console: MakeConsole
) -> None:
    """A replay (rate 6/s, 12 messages) holds its DLQ: reads answer 409 at once (not a wrong
    picture), a second replay, a purge and an edit too; the overview still answers, with a
    ``problem``; after the job every read works again."""
    cleanup.extend(await make_dlq(amqp, queue_name))
    dlq = f"{queue_name}.dlq"
    await publish(amqp, dlq, letters(queue_name, 12))
    c = await make_console(dlq, token=TOKEN)

    started = await c.post(c.path(dlq, "replay"), {"rate": 6})
    assert started.status_code == 202, started.text
    job_id = started.json()["job"]
    began = time.monotonic()
    during = {
        "messages": await c.get(c.path(dlq, "messages")),
        "message": await c.get(c.path(dlq, "messages", "m11")),
        "groups": await c.get(c.path(dlq, "groups")),
        "export": await c.get(c.path(dlq, "export")),
        "replay": await c.post(c.path(dlq, "replay"), {}),
        "dry run": await c.post(c.path(dlq, "replay"), {"dry_run": True}),
        "purge": await c.post(c.path(dlq, "purge"), {"confirm": dlq}),
        "edit": await c.post(c.path(dlq, "messages", "m11", "edit"), {"body": "{}"}),
    }
    overview = await c.get("/api/dlqs")
    took = time.monotonic() - began
    job_during = (await c.get(f"/api/jobs/{job_id}")).json()

    for what, answer in during.items():
        assert answer.status_code == 409, (what, answer.text)
        assert job_id in answer.json()["error"], (what, answer.json())
    assert "is working on" in during["messages"].json()["error"]
    assert "already working on" in during["replay"].json()["error"]
    assert took < 1.5, took  # at once: nobody waited for the job (it takes about 2 s)
    assert job_during["state"] in ("queued", "running"), job_during
    [row] = overview.json()
    assert overview.status_code == 200 and job_id in row["problem"]

    job = await c.wait_job(job_id)
    assert (job["state"], job["replayed"]) == ("done", 12), job
    after = await c.get(c.path(dlq, "messages"))
    assert after.status_code == 200 and after.json() == []
    assert await depth(amqp, queue_name) == 12


async def test_a_cli_replay_during_console_browsing_loses_nothing(
    broker_url: str,
    queue_name: str,
    cleanup: list[str],
    amqp: AbstractConnection,
    make_console: MakeConsole,
) -> None:
    """``qworker.dlq.replay`` (the CLI's library call, its own connection) while the console
    lists and rescans the DLQ in a loop: every message is in the DLQ or in the target,
    exactly once; what the console held was skipped, not lost."""
    cleanup.extend(await make_dlq(amqp, queue_name))
    dlq = f"{queue_name}.dlq"
    count = 300
    await publish(amqp, dlq, letters(queue_name, count))
    c = await make_console(dlq)
    cli_connection = await aio_pika.connect(broker_url)
    try:
        replay = asyncio.create_task(lib.replay(cli_connection, dlq))
        statuses: list[int] = []
        for round_ in range(200):  # bounded; normally a few rounds
            if replay.done() and round_ >= 2:
                break
            listed, grouped = await asyncio.gather(
                c.get(c.path(dlq, "messages"), params={"limit": 500}),
                c.get(c.path(dlq, "groups"), params={"rescan": "1"}),
            )
            statuses += [listed.status_code, grouped.status_code]
        result = await asyncio.wait_for(replay, 60)
    finally:
        await cli_connection.close()

    assert set(statuses) == {200}, statuses
    assert result.error is None and result.failed == 0, result
    in_dlq = [t.message_id or "" for t in await drain(amqp, dlq)]
    in_target = [t.message_id or "" for t in await drain(amqp, queue_name)]
    assert len(in_dlq) + len(in_target) == count
    assert sorted(in_dlq + in_target) == sorted(f"m{i}" for i in range(count))
    assert result.replayed == len(in_target)


# The scan cache


async def test_the_scan_is_reused_marked_stale_and_dropped_after_a_replay(
    queue_name: str, cleanup: list[str], amqp: AbstractConnection, make_console: MakeConsole
) -> None:
    """A second groups request reuses the scan (same X-Qworker-Scan-Taken-At); a DLQ that
    moved meanwhile keeps it, marked stale; ``rescan=1`` scans again; a console replay of a
    group drops the scan, and the group is gone from the next one."""
    dlq = await filled(amqp, queue_name, 6, cleanup)  # 6 KeyErrors, 2 timeouts
    c = await make_console(dlq, token=TOKEN)
    url = c.path(dlq, "groups")

    first = await c.get(url)
    second = await c.get(url)
    overview = await c.get("/api/dlqs")
    taken = first.headers["x-qworker-scan-taken-at"]
    assert second.headers["x-qworker-scan-taken-at"] == taken
    assert second.json() == first.json()
    assert overview.json()[0]["scan"]["taken_at"] == taken
    assert first.headers["x-qworker-scan-stale"] == "false"

    await publish(amqp, dlq, letters(queue_name, 1, prefix="late"))
    moved = await c.get(url)
    assert moved.headers["x-qworker-scan-taken-at"] == taken
    assert moved.headers["x-qworker-scan-stale"] == "true"
    assert [g["count"] for g in moved.json()] == [6, 2]

    rescanned = await c.get(url, params={"rescan": "1"})
    assert rescanned.headers["x-qworker-scan-taken-at"] > taken
    assert rescanned.headers["x-qworker-scan-stale"] == "false"
    assert [g["count"] for g in rescanned.json()] == [7, 2]

    timeouts = next(g for g in rescanned.json() if g["reason"] == "timeout")
    started = await c.post(
        c.path(dlq, "replay"), {"filter": {"fingerprint": timeouts["fingerprint"]}}
    )
    job = await c.wait_job(started.json()["job"])
    assert (job["state"], job["replayed"]) == ("done", 2), job
    after = await c.get(url)
    assert after.headers["x-qworker-scan-taken-at"] > rescanned.headers["x-qworker-scan-taken-at"]
    assert [(g["count"], g["reason"]) for g in after.json()] == [(7, "permanent_error")]
    assert await depth(amqp, queue_name) == 2


async def test_an_old_scan_of_a_moved_dlq_is_taken_again(
    queue_name: str, cleanup: list[str], amqp: AbstractConnection, make_console: MakeConsole
) -> None:
    """Past ``scan_ttl``, a DLQ whose depth moved is scanned again; an unmoved one is not."""
    dlq = await filled(amqp, queue_name, 3, cleanup)
    c = await make_console(dlq, scan_ttl=0.0)
    url = c.path(dlq, "groups")
    taken = (await c.get(url)).headers["x-qworker-scan-taken-at"]
    assert (await c.get(url)).headers["x-qworker-scan-taken-at"] == taken  # depth unchanged
    await publish(amqp, dlq, letters(queue_name, 1, prefix="late"))
    again = await c.get(url)
    assert again.headers["x-qworker-scan-taken-at"] > taken
    assert sum(g["count"] for g in again.json()) == 5


async def test_an_empty_scan_is_never_reused_for_a_dlq_that_filled(
    queue_name: str, cleanup: list[str], amqp: AbstractConnection, make_console: MakeConsole
) -> None:
    """A scan of an empty DLQ (or of a quorum DLQ that reported 0 for a moment after a node
    restart) is not shown for the DLQ once it holds messages, however young the scan."""
    cleanup.extend(await make_dlq(amqp, queue_name))
    dlq = f"{queue_name}.dlq"
    c = await make_console(dlq)
    url = c.path(dlq, "groups")
    empty = await c.get(url)
    assert empty.json() == []
    await publish(amqp, dlq, letters(queue_name, 2))
    filled_now = await c.get(url)
    assert filled_now.headers["x-qworker-scan-stale"] == "false"
    assert sum(g["count"] for g in filled_now.json()) == 2


# The broker down


def count_connects(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Patch the console's connect to record each attempt's time (and still try)."""
    attempts: list[float] = []
    real: Callable[..., Awaitable[Any]] = connect_once

    async def counted(*args: Any, **kwargs: Any) -> Any:
        attempts.append(time.monotonic())
        return await real(*args, **kwargs)

    monkeypatch.setattr(broker, "connect_once", counted)
    return attempts


async def test_a_broker_that_is_down_is_503_and_asked_once_per_back_off(
    make_console: MakeConsole, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every request answers 503 with one line at once; within the back-off, however many
    requests come, the console does not try to connect again."""
    attempts = count_connects(monkeypatch)
    c = await make_console("orders.dlq", urls=["amqp://guest:guest@127.0.0.1:1/"])
    answers = []
    for path in ("/api/dlqs", "/api/dlqs", c.path("orders.dlq", "groups")):
        answers.append(await c.get(path))
    answers += await asyncio.gather(
        *(c.get(c.path("orders.dlq", "messages")) for _ in range(5)),
        c.get(c.path("orders.dlq", "messages", "m1")),
        c.get(c.path("orders.dlq", "export")),
    )

    assert len(attempts) == 1
    for answer in answers:
        assert answer.status_code == 503, answer.text
        error = answer.json()["error"]
        assert error and "\n" not in error and len(error) < 500, error
        assert "'unsafe-inline'" not in answer.headers["content-security-policy"]
        assert answer.headers["cache-control"] == "no-store"
    assert "next attempt in" in answers[-1].json()["error"]
    assert "guest:guest" not in answers[0].json()["error"]


async def test_after_the_back_off_the_console_tries_again_then_waits_longer(
    make_console: MakeConsole, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next request after the back-off is one new attempt; the back-off then doubles."""
    attempts = count_connects(monkeypatch)
    monkeypatch.setattr(broker, "FIRST_WAIT", 0.2)
    c = await make_console("orders.dlq", urls=["amqp://guest:guest@127.0.0.1:1/"])
    url = c.path("orders.dlq", "groups")
    assert (await c.get(url)).status_code == 503
    assert (await c.get(url)).status_code == 503
    assert len(attempts) == 1
    await asyncio.sleep(0.25)  # the back-off is time itself: nothing else to wait for
    assert (await c.get(url)).status_code == 503
    assert (await c.get(url)).status_code == 503
    assert len(attempts) == 2
    await asyncio.sleep(0.1)  # doubled to 0.4 s: not over yet
    assert (await c.get(url)).status_code == 503
    assert len(attempts) == 2


async def test_an_action_with_the_broker_down_fails_its_job_with_a_sentence(
    make_console: MakeConsole, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replay asked for while the broker is down: its job ends ``failed`` saying why."""
    count_connects(monkeypatch)
    c = await make_console("orders.dlq", urls=["amqp://guest:guest@127.0.0.1:1/"], token=TOKEN)
    started = await c.post(c.path("orders.dlq", "replay"), {})
    assert started.status_code == 202, started.text
    job = await c.wait_job(started.json()["job"], timeout=20)
    assert job["state"] == "failed" and job["error"], job
    assert "\n" not in job["error"]
