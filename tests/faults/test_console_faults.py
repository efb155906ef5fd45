"""The failed-message console under faults, on a private node (never the shared one).

Nothing lost, nothing wedged: the node is killed (``kill -9``) while the console scans a DLQ
of a few thousand dead letters, while it reads a deep page, and while a replay job runs (with
and without a rate); a ``qworker console`` process is killed with SIGKILL mid-replay; the broker
closes the console's connection between two requests. Expected each time: a request answers 503
(never a 500, never after a long hang), a job ends ``failed`` with a sentence, the console asks
a down broker no more often than its back-off allows and answers again once the broker is back,
without a restart; every dead letter is in the DLQ or its target (at worst in both, within the
replay's in-flight bound), counted by id by a reader independent of the console.

A kill -9 costs a node boot (about 5 s), so each kill scenario runs once, in a module fixture
that records what happened, and several tests assert on the record, one per guarantee.

The private node has the management plugin (on a port of its own), so the DLQ library's
delivery guard reads the node's own delivery limits, as ``qworker console --management-url``
does in production; nothing here asks the shared node anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest
from aio_pika.abc import AbstractConnection

from qworker.connection import connect_once
from qworker.console import broker
from qworker.console.security import Access
from qworker.console.service import Console, ConsoleSettings
from qworker.console.web import create_app
from qworker.dlq.acks import ACK_BATCH
from qworker.dlq.probes import use_management
from qworker.dlq.send import DEFAULT_WINDOW
from tests.console.conftest import BASE_URL, CONSOLE_TOKEN, ConsoleUnderTest, quoted
from tests.faults.injector import close_connections
from tests.faults.nodes import ROOT, RabbitNode, free_port
from tests.faults.scenario import delete_queues
from tests.faults.size import SIZE
from tests.support.broker import answers, depth
from tests.support.dlq import drain, letters, make_dlq, publish

pytestmark = [pytest.mark.faults, pytest.mark.rabbitmq, pytest.mark.timeout(SIZE.timeout)]

FULL = SIZE.name == "full"
#: Dead letters in the DLQ that is scanned and paged while the node dies.
SCANNED = 20_000 if FULL else 3_000
#: Dead letters replayed as fast as confirms allow, and at ``RATE`` per second.
REPLAYED = 10_000 if FULL else 2_000
PACED = 3_000 if FULL else 600
RATE = 500.0 if FULL else 200.0
#: The longest any request (or a job's end) may take while the broker dies or is down: one
#: connect attempt may take ``broker.CONNECT_TIMEOUT``; a dead node refuses at once.
REQUEST_BOUND = 15.0
#: How long after the node is back the console must answer again: the longest back-off wait,
#: and a margin for the node to finish recovering its queues.
RECOVERY_BOUND = broker.LONGEST_WAIT + 15.0
#: A message may be in the DLQ and its target both when its copy reached the target (confirmed,
#: or published with its confirm lost) but the dead letter's ack never took effect: at most the
#: publishes awaiting their confirm (``window``) plus the confirmed copies whose acks wait for
#: their batch (docs/dlq.md: "at worst (killed between a confirm and the ack) in both").
DUPLICATE_BOUND = DEFAULT_WINDOW + ACK_BATCH

#: Bugs these tests found (see the report of the tests marked with them).


# The private node and its faults.


class ConsoleNode(RabbitNode):
    """A private node with the management plugin on ``management_port`` (127.0.0.1 only)."""

    management_port: int = 0

    @property
    def management_url(self) -> str:
        return f"http://guest:guest@127.0.0.1:{self.management_port}/"

    def _write_config(self) -> None:
        super()._write_config()
        with open(self.base / "rabbitmq.conf", "a", encoding="utf-8") as conf:
            conf.write(
                f"management.tcp.port = {self.management_port}\nmanagement.tcp.ip = 127.0.0.1\n"
            )
        (self.base / "enabled_plugins").write_text("[rabbitmq_management].\n")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    return True


def kill9(node: RabbitNode) -> None:
    """SIGKILL the node's own OS process (by the pid it wrote) and wait until it is gone."""
    pid = node.os_pid()
    assert pid is not None, "the node wrote no pid file"
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while _alive(pid) or answers("127.0.0.1", node.port):
        assert time.monotonic() < deadline, f"{node.name} still alive 30 s after kill -9"
        time.sleep(0.05)


def running(node: RabbitNode) -> None:
    """Start the node again if an earlier test left it dead."""
    if not answers("127.0.0.1", node.port):
        pid = node.os_pid()
        if pid is not None and _alive(pid):
            kill9(node)
        node.start()


async def restart(node: RabbitNode) -> None:
    """Boot the killed node again, on the same data directory."""
    await asyncio.to_thread(node.start)


@pytest.fixture(scope="module")
def console_node() -> Iterator[ConsoleNode]:
    """The module's private node; halted and deleted at the end."""
    directory = Path(tempfile.mkdtemp(prefix="qwf-console-"))
    node = ConsoleNode(directory, f"qwfc{uuid.uuid4().hex[:6]}@localhost", free_port(), free_port())
    node.management_port = free_port()
    try:
        node.start()
        yield node
    finally:
        node.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def node(console_node: ConsoleNode) -> ConsoleNode:
    """The private node, running."""
    running(console_node)
    return console_node


# The console, and what its answers must look like.


def count_connects(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Patch the console's connect to record each attempt's start (and still try)."""
    attempts: list[float] = []
    real = connect_once

    async def counted(*args: Any, **kwargs: Any) -> AbstractConnection:
        attempts.append(time.monotonic())
        return await real(*args, **kwargs)

    monkeypatch.setattr(broker, "connect_once", counted)
    return attempts


def check_back_off(attempts: list[float]) -> None:
    """Consecutive attempts after a failed one are at least the back-off apart: 1 s, doubling
    to 30 s."""
    wait = 0.0
    for before, after in itertools.pairwise(attempts):
        wait = min(broker.LONGEST_WAIT, wait * 2 or broker.FIRST_WAIT)
        assert after - before >= wait - 0.05, (
            f"attempts {[round(a - attempts[0], 2) for a in attempts]} s: "
            f"{after - before:.2f} s between two, the back-off was {wait} s"
        )


def allowed_attempts(span: float) -> int:
    """The most connect attempts the back-off allows within ``span`` seconds."""
    attempts, wait, spent = 1, 0.0, 0.0
    while True:
        wait = min(broker.LONGEST_WAIT, wait * 2 or broker.FIRST_WAIT)
        if spent + wait > span:
            return attempts
        spent += wait
        attempts += 1


@contextlib.asynccontextmanager
async def console_on(node: ConsoleNode, dlq: str) -> AsyncIterator[ConsoleUnderTest]:
    """An in-process console on the node (as ``tests/console/conftest.py`` builds one), with the
    node's management API for DLQ names and delivery limits, and the changes token."""
    console = Console(
        ConsoleSettings(urls=[node.url], management_url=node.management_url, extra_dlqs=(dlq,))
    )
    access = Access(CONSOLE_TOKEN)
    web = create_app(console, access)
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=web, raise_app_exceptions=False),
        base_url=BASE_URL,
        timeout=60,
    )
    with use_management(node.management_url):
        try:
            yield ConsoleUnderTest(console, access, web, client, CONSOLE_TOKEN)
        finally:
            await client.aclose()
            await asyncio.wait_for(console.close(), 30)


@dataclass(frozen=True)
class Hit:
    """One answer during a fault: its status (0: none within :data:`REQUEST_BOUND`), its
    ``error`` and how long it took."""

    status: int
    error: str
    seconds: float

    def check_one_line(self) -> None:
        """Answered in time; an error is one sentence, no traceback, no password."""
        assert self.status and self.seconds <= REQUEST_BOUND, self
        if self.status >= 400:
            assert self.error and "\n" not in self.error and len(self.error) < 500, self
            assert "Traceback" not in self.error and "guest:guest" not in self.error, self


async def hit(request: Awaitable[httpx.Response]) -> Hit:
    """The answer to ``request`` as a :class:`Hit` (waits at most :data:`REQUEST_BOUND`)."""
    started = time.monotonic()
    try:
        answer = await asyncio.wait_for(request, REQUEST_BOUND)
    except TimeoutError:
        return Hit(0, "no answer", time.monotonic() - started)
    seconds = time.monotonic() - started
    error = ""
    if answer.status_code >= 400:
        try:
            error = str(answer.json()["error"])
        except (ValueError, KeyError, TypeError):
            error = answer.text[:1000]
    return Hit(answer.status_code, error, seconds)


async def timed(request: Awaitable[httpx.Response]) -> httpx.Response:
    """The answer to ``request``, which must come within :data:`REQUEST_BOUND` seconds."""
    try:
        return await asyncio.wait_for(request, REQUEST_BOUND)
    except TimeoutError:
        raise AssertionError(f"a request hung for {REQUEST_BOUND} s") from None


async def settled(c: ConsoleUnderTest) -> bool:
    """Whether every pass that answered early gave its DLQ back within the bound."""
    try:
        await asyncio.wait_for(c.console.settled(), REQUEST_BOUND)
    except TimeoutError:
        return False
    return True


async def until_answered(
    c: ConsoleUnderTest, url: str, params: dict[str, Any] | None = None
) -> tuple[list[int], httpx.Response | None]:
    """Ask ``url`` until it answers 200 (or anything but 503, or :data:`RECOVERY_BOUND` s pass):
    the statuses seen, and the 200 answer (None without one)."""
    statuses: list[int] = []
    deadline = time.monotonic() + RECOVERY_BOUND
    while time.monotonic() < deadline:
        answer = await hit_or_answer(c.get(url, params=params))
        statuses.append(answer.status_code if answer is not None else 0)
        if answer is not None and answer.status_code == 200:
            return statuses, answer
        if statuses[-1] != 503:
            break
        await asyncio.sleep(0.25)
    return statuses, None


async def hit_or_answer(request: Awaitable[httpx.Response]) -> httpx.Response | None:
    with contextlib.suppress(TimeoutError):
        return await asyncio.wait_for(request, REQUEST_BOUND)
    return None


# Dead letters, and counting them without the console.


async def fill(node: RabbitNode, queue: str, count: int) -> tuple[str, list[str]]:
    """``queue`` and ``queue.dlq`` as qworker declares them (quorum); ``count`` dead letters in
    two groups (KeyErrors ``k*``, two thirds, and ValueError timeouts ``t*``). The DLQ and the
    ids in queue order."""
    dlq = f"{queue}.dlq"
    timeouts = count // 3
    made = [
        *letters(queue, count - timeouts, prefix="k"),
        *letters(queue, timeouts, prefix="t", reason="timeout", error_type="builtins.ValueError"),
    ]
    connection = await aio_pika.connect(node.url, timeout=10)
    try:
        await make_dlq(connection, queue)
        await publish(connection, dlq, made)
        assert await depth(connection, dlq) == count
    finally:
        await connection.close()
    return dlq, [letter.message_id for letter in made if letter.message_id is not None]


async def watch_depth(
    node: RabbitNode, queue: str, until: Callable[[int], bool], work: asyncio.Future[Any]
) -> int:
    """Poll ``queue``'s ready count (another connection) until ``until(count)``; the count.

    Fails when ``work`` ended first: the fault would not have hit it mid-way."""
    connection = await aio_pika.connect(node.url, timeout=10)
    try:
        deadline = time.monotonic() + 60
        while True:
            count = await depth(connection, queue)
            if until(count):
                return count
            assert not work.done(), f"it ended before the fault ({queue} at {count})"
            assert time.monotonic() < deadline, f"{queue} stuck at {count}"
            await asyncio.sleep(0.01)
    finally:
        await connection.close()


async def settled_depth(connection: AbstractConnection, queue: str) -> int:
    """``queue``'s ready count once it holds still (what a dead client held has come back)."""
    count = await depth(connection, queue)
    for _ in range(100):
        await asyncio.sleep(0.3)
        if count == (count := await depth(connection, queue)):
            break
    return count


async def back(node: RabbitNode, queues: list[str], at_least: int) -> int:
    """Wait until ``queues`` hold ``at_least`` messages between them again after a boot: a quorum
    queue answers a passive declare with 0 messages for a second or so while it recovers.
    Returns the last count (below ``at_least`` after 30 s: lost or still held messages, which
    the final count names)."""
    connection = await aio_pika.connect(node.url, timeout=10)
    try:
        deadline = time.monotonic() + 30
        while (seen := sum([await depth(connection, queue) for queue in queues])) < at_least:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        return seen
    finally:
        await connection.close()


async def peek_one(connection: AbstractConnection, queue: str) -> Counter[str]:
    """Every message id in ``queue``, read by a plain consumer and given back (channel closed,
    nothing acked); returns once the queue holds all of them again."""
    expected = await settled_depth(connection, queue)
    ids: Counter[str] = Counter()
    if not expected:
        return ids
    complete = asyncio.Event()

    async def take(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        ids[str(message.message_id)] += 1
        if ids.total() >= expected:
            complete.set()

    channel = await connection.channel()
    await channel.set_qos(prefetch_count=min(expected + 10, 65_535))
    declared = await channel.declare_queue(queue, passive=True)
    await declared.consume(take)
    await asyncio.wait_for(complete.wait(), 60)
    await channel.close()
    deadline = time.monotonic() + 30
    while await depth(connection, queue) < expected:
        assert time.monotonic() < deadline, f"{queue}: the messages read did not come back"
        await asyncio.sleep(0.1)
    return ids


async def peek(node: RabbitNode, *queues: str) -> dict[str, Counter[str]]:
    """:func:`peek_one` of each queue (nothing removed)."""
    connection = await aio_pika.connect(node.url, timeout=10)
    try:
        return {queue: await peek_one(connection, queue) for queue in queues}
    finally:
        await connection.close()


async def holdings(node: RabbitNode, *queues: str) -> dict[str, Counter[str]]:
    """Every message id in each queue, taken by a plain consumer (destructive: a final check).

    Waits until the ready counts hold still, so that messages the broker is still returning
    from a dead client are counted."""
    connection = await aio_pika.connect(node.url, timeout=10)
    try:
        return {
            queue: Counter(str(t.message_id) for t in await drain(connection, queue, settle=True))
            for queue in queues
        }
    finally:
        await connection.close()


def accounted(ids: list[str], dlq: Counter[str], target: Counter[str]) -> int:
    """Assert every id is in the DLQ or the target, nothing else, no id twice in one queue;
    the number of ids in both (replayed and still dead-lettered)."""
    both = dlq + target
    lost = set(ids) - set(both)
    assert not lost, f"lost {len(lost)}: {sorted(lost)[:10]}"
    assert set(both) == set(ids), f"unknown ids: {sorted(set(both) - set(ids))[:10]}"
    twice = {i: n for q in (dlq, target) for i, n in q.items() if n > 1}
    assert not twice, f"ids twice in one queue: {dict(list(twice.items())[:10])}"
    return len(set(dlq) & set(target))


# 1. kill -9 while the console reads: a scan, then a deep page.


@dataclass
class ReadKills:
    """What happened when the node was killed under a scan, then under a page read."""

    ids: list[str]
    scan: Hit
    scan_settled: bool
    held_at_kill: int
    #: Requests of every kind while the node was down and booting.
    down: list[Hit]
    down_seconds: float
    #: Connect attempts from the first kill until the console answered again (or gave up).
    attempts: list[float]
    #: Statuses of a rescan after the boot, until it answered 200 (or anything but 503).
    recovered: list[int]
    recovered_groups: int | None
    page: Hit
    page_settled: bool
    page_on_first_console: bool
    page_recovered: list[int]
    page_ids: list[str] | None
    page_offset: int
    #: What the DLQ held (ready) before the page was asked again, after the second boot.
    page_back: int
    left: Counter[str] = field(default_factory=Counter)


async def read_kills(node: ConsoleNode) -> ReadKills:
    running(node)
    queue = f"qwf.cs{uuid.uuid4().hex[:8]}"
    dlq, ids = await fill(node, queue, SCANNED)
    groups = ConsoleUnderTest.path(dlq, "groups")
    messages = ConsoleUnderTest.path(dlq, "messages")
    offset = SCANNED - 600
    deep = {"limit": 500, "offset": offset}
    try:
        with pytest.MonkeyPatch.context() as patch:
            attempts = count_connects(patch)
            async with contextlib.AsyncExitStack() as stack:
                c = await stack.enter_async_context(console_on(node, dlq))
                first = await timed(c.get(groups))
                assert first.status_code == 200, first.text
                assert sum(g["count"] for g in first.json()) == SCANNED

                # kill -9 mid-scan (a rescan reads all of it, holding what it read).
                scan = asyncio.ensure_future(
                    hit(c.client.get(groups, params={"rescan": "1"}, headers=c.bearer))
                )
                held = SCANNED - await watch_depth(node, dlq, lambda n: n <= SCANNED * 3 // 4, scan)
                await asyncio.to_thread(kill9, node)
                killed_at = time.monotonic()
                scan_hit = await scan
                scan_settled = await settled(c)
                first_attempts = len(attempts)

                # Down, then booting: every kind of request, ten times a second.
                booting = asyncio.ensure_future(restart(node))
                down: list[Hit] = []
                while not booting.done():
                    down += await asyncio.gather(
                        hit(c.get("/api/dlqs")),
                        hit(c.get(groups)),
                        hit(c.get(messages, params={"limit": 5})),
                        hit(c.get(ConsoleUnderTest.path(dlq, "messages", ids[7]))),
                        hit(c.get(ConsoleUnderTest.path(dlq, "export"))),
                    )
                    await asyncio.sleep(0.1)
                await booting
                down_seconds = time.monotonic() - killed_at
                await back(node, [dlq], SCANNED)

                # Back: the same console must answer again (after its back-off).
                recovered, answer = await until_answered(c, groups, {"rescan": "1"})
                recovered_groups = (
                    sum(g["count"] for g in answer.json()) if answer is not None else None
                )
                after_kill = attempts[first_attempts:]

                # kill -9 mid-page: the same console if it came back, else a fresh one (so that
                # this fault is observed whatever the last one did).
                on_first = answer is not None
                if not on_first:
                    c = await stack.enter_async_context(console_on(node, dlq))
                page = asyncio.ensure_future(
                    hit(c.client.get(messages, params=deep, headers=c.bearer))
                )
                await watch_depth(node, dlq, lambda n: n <= SCANNED // 2, page)
                await asyncio.to_thread(kill9, node)
                page_hit = await page
                page_settled = await settled(c)
                await restart(node)
                page_back = await back(node, [dlq], SCANNED)
                page_recovered, reread = await until_answered(c, messages, deep)
                page_ids = [r["message_id"] for r in reread.json()] if reread is not None else None
        left = (await holdings(node, dlq))[dlq]
    finally:
        running(node)
        await delete_queues([node.url], [dlq, queue])
    return ReadKills(
        ids=ids,
        scan=scan_hit,
        scan_settled=scan_settled,
        held_at_kill=held,
        down=down,
        down_seconds=down_seconds,
        attempts=[a - killed_at for a in after_kill],
        recovered=recovered,
        recovered_groups=recovered_groups,
        page=page_hit,
        page_settled=page_settled,
        page_on_first_console=on_first,
        page_recovered=page_recovered,
        page_ids=page_ids,
        page_offset=offset,
        page_back=page_back,
        left=left,
    )


@pytest.fixture(scope="module")
def reads(console_node: ConsoleNode) -> ReadKills:
    """Run the read-kill scenario once for the module's tests; print what happened."""
    seen = asyncio.run(read_kills(console_node))
    print(
        f"\nconsole reads, node kill -9 [{SIZE.name}]: {SCANNED} dead letters; scan killed with "
        f"{seen.held_at_kill} held: {seen.scan}; {len(seen.down)} requests in "
        f"{seen.down_seconds:.1f} s down/booting: {Counter(h.status for h in seen.down)}; "
        f"connect attempts at {[round(a, 2) for a in seen.attempts]} s; after the boot "
        f"{seen.recovered}; page: {seen.page}, then {seen.page_recovered}"
    )
    return seen


def test_reads_hit_by_kill9_end_at_once_with_one_line_and_give_the_dlq_back(
    reads: ReadKills,
) -> None:
    """The scan and the page read the kill hit both answer (within the bound, with one line, no
    traceback), and neither pass keeps holding the DLQ afterwards."""
    reads.scan.check_one_line()
    reads.page.check_one_line()
    assert reads.scan.status >= 500 and reads.page.status >= 500, (reads.scan, reads.page)
    assert reads.scan_settled and reads.page_settled


def test_reads_hit_by_kill9_answer_503(reads: ReadKills) -> None:
    """The scan and the page read the kill hit answer 503 (the broker is unavailable), not 500."""
    assert (reads.scan.status, reads.page.status) == (503, 503), (reads.scan, reads.page)


def test_a_down_node_is_asked_no_more_often_than_the_back_off(reads: ReadKills) -> None:
    """While the node is down and boots, requests of every kind (ten a second) answer within the
    bound, never hang, and lead to at most one connect attempt per back-off (1 s, doubling)."""
    assert len(reads.down) >= 20, len(reads.down)
    for answer in reads.down:
        answer.check_one_line()
    check_back_off(reads.attempts)
    span = reads.attempts[-1] if reads.attempts else 0.0
    assert len(reads.attempts) <= allowed_attempts(span), reads.attempts


def test_requests_while_the_node_is_down_answer_503(reads: ReadKills) -> None:
    """Every request while the node is down answers 503 (200 once it listens again), never 500."""
    statuses = Counter(h.status for h in reads.down)
    assert set(statuses) <= {503, 200} and statuses[503], statuses


def test_the_console_answers_again_once_the_node_is_back(reads: ReadKills) -> None:
    """After each boot the same console (no restart) answers again: 503s at most while its
    back-off runs, then the scan counts every dead letter and the deep page is a full page."""
    assert reads.recovered[-1] == 200 and set(reads.recovered[:-1]) <= {503}, reads.recovered
    assert reads.recovered_groups == SCANNED
    assert reads.page_on_first_console
    assert reads.page_recovered[-1] == 200, reads.page_recovered
    # Not which 500 messages: a kill mid-read leaves a quorum DLQ in another order (RabbitMQ 3.x
    # requeues what a dead channel held as it likes; docs/dlq.md, "Order").
    assert reads.page_ids is not None and len(reads.page_ids) == 500, (
        f"{len(reads.page_ids or [])} records; the DLQ showed {reads.page_back} ready before"
    )
    assert len(set(reads.page_ids)) == 500 and set(reads.page_ids) <= set(reads.ids)


def test_kill9_during_reads_loses_no_dead_letter(reads: ReadKills) -> None:
    """After two kills mid-read and two boots, the DLQ holds every dead letter, each once."""
    assert reads.left == Counter(reads.ids), (
        f"{len(set(reads.ids) - set(reads.left))} lost, "
        f"{sum(n - 1 for n in reads.left.values())} duplicated"
    )


# 2. kill -9 during a console replay job, as fast as confirms allow and at a rate.


@dataclass
class ReplayKill:
    """What happened when the node was killed under a console replay."""

    rate: float | None
    count: int
    ids: list[str]
    in_target_at_kill: int
    job: dict[str, Any]
    job_seconds: float
    running: int
    #: Where every id was once the node was back (read and given back).
    dlq: Counter[str]
    target: Counter[str]
    #: Statuses of the overview after the boot, until it answered 200 (or anything but 503).
    recovered: list[int]
    #: The second replay through the same console, and where every id ended after it.
    second: dict[str, Any] | None = None
    final_dlq: Counter[str] | None = None
    final_target: Counter[str] | None = None


async def replay_kill(node: ConsoleNode, rate: float | None) -> ReplayKill:
    running(node)
    count = PACED if rate else REPLAYED
    queue = f"qwf.cr{uuid.uuid4().hex[:8]}"
    dlq, ids = await fill(node, queue, count)
    try:
        async with console_on(node, dlq) as c:
            started = await timed(c.post(c.path(dlq, "replay"), {"rate": rate}))
            assert started.status_code == 202, started.text
            job_id = started.json()["job"]
            job = c.console.job(job_id)
            assert job.task is not None
            watched = await watch_depth(node, queue, lambda n: n >= count // 5, job.task)
            await asyncio.to_thread(kill9, node)
            killed_at = time.monotonic()
            await asyncio.wait({job.task}, timeout=REQUEST_BOUND)
            job_seconds = time.monotonic() - killed_at
            answer = await timed(c.get(f"/api/jobs/{quoted(job_id)}"))
            assert answer.status_code == 200, answer.text
            ended = answer.json()
            still = len(c.console.jobs.running())
            await restart(node)
            await back(node, [dlq, queue], count)
            where = await peek(node, dlq, queue)
            recovered, overview = await until_answered(c, "/api/dlqs")
            seen = ReplayKill(
                rate=rate,
                count=count,
                ids=ids,
                in_target_at_kill=watched,
                job=ended,
                job_seconds=job_seconds,
                running=still,
                dlq=where[dlq],
                target=where[queue],
                recovered=recovered,
            )
            if overview is not None:
                again = await timed(c.post(c.path(dlq, "replay"), {}))
                assert again.status_code == 202, again.text
                seen.second = await c.wait_job(again.json()["job"], timeout=60)
                final = await holdings(node, dlq, queue)
                seen.final_dlq, seen.final_target = final[dlq], final[queue]
    finally:
        running(node)
        await delete_queues([node.url], [dlq, queue])
    return seen


@pytest.fixture(scope="module", params=[None, RATE], ids=["unpaced", "paced"])
def replays(request: pytest.FixtureRequest, console_node: ConsoleNode) -> ReplayKill:
    """Run the replay-kill scenario once per rate for the module's tests; print what happened."""
    seen = asyncio.run(replay_kill(console_node, request.param))
    print(
        f"\nconsole replay, node kill -9 [{SIZE.name}, rate {seen.rate}]: {seen.count} dead "
        f"letters, killed with {seen.in_target_at_kill} in the target; job {seen.job['state']} "
        f"{seen.job_seconds:.2f} s later, replayed {seen.job['replayed']}: {seen.job['error']!r}; "
        f"then {seen.dlq.total()} in the DLQ + {seen.target.total()} in the target "
        f"({len(set(seen.dlq) & set(seen.target))} in both); after the boot {seen.recovered}"
    )
    return seen


def test_a_replay_job_hit_by_kill9_ends_failed_with_a_sentence(replays: ReplayKill) -> None:
    """The job ends ``failed`` within the bound, with one sentence, and no job stays running."""
    assert replays.job["state"] == "failed", replays.job
    assert replays.job_seconds <= REQUEST_BOUND
    error = replays.job["error"]
    assert error and "\n" not in error and len(error) < 500, error
    assert "Traceback" not in error and "guest:guest" not in error, error
    assert replays.running == 0


def test_a_replay_job_hit_by_kill9_loses_nothing(replays: ReplayKill) -> None:
    """Once the node is back, every id is in the DLQ or the target, none twice in one queue, and
    at most the in-flight bound (window + ack batch) in both."""
    both = accounted(replays.ids, replays.dlq, replays.target)
    assert both <= DUPLICATE_BOUND, both
    assert replays.target.total() >= replays.in_target_at_kill


def test_after_the_node_is_back_the_same_console_replays_the_rest(replays: ReplayKill) -> None:
    """Once the node is back, the same console answers (no restart) and a second replay moves
    the rest: the DLQ is empty and the target holds every id, at most the bound twice."""
    assert replays.recovered[-1] == 200 and set(replays.recovered[:-1]) <= {503}
    assert replays.second is not None and replays.second["state"] == "done", replays.second
    assert replays.second["replayed"] == replays.dlq.total()
    assert replays.final_dlq is not None and replays.final_target is not None
    assert not replays.final_dlq, replays.final_dlq
    assert set(replays.final_target) == set(replays.ids)
    duplicates = replays.final_target.total() - len(replays.ids)
    assert duplicates <= DUPLICATE_BOUND, duplicates


# 3. The ``qworker console`` process killed with SIGKILL mid-replay.


@dataclass
class ConsoleProcess:
    """A ``qworker console`` subprocess and an HTTP client on it."""

    proc: subprocess.Popen[bytes]
    client: httpx.AsyncClient

    async def job(self, job_id: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            answer = await timed(self.client.get(f"/api/jobs/{quoted(job_id)}"))
            assert answer.status_code == 200, answer.text
            job: dict[str, Any] = answer.json()
            if job["state"] in ("done", "failed"):
                return job
            assert time.monotonic() < deadline, job
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def console_process(node: ConsoleNode, dlq: str, log: Path) -> AsyncIterator[ConsoleProcess]:
    """``qworker console --queue DLQ`` on the node and its management API, on a free port, with
    a token; SIGKILLed at the end if it still runs."""
    env = {**os.environ, "QWORKER_CONSOLE_TOKEN": CONSOLE_TOKEN}
    for name in ("QWORKER_URL", "QWORKER_MANAGEMENT_URL"):
        env.pop(name, None)
    command = [sys.executable, "-m", "qworker", "console", "--queue", dlq, "--url", node.url]
    command += ["--management-url", node.management_url, "--port", "0"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + 30
        while not (found := re.search(rb"on http://127\.0\.0\.1:(\d+)/", log.read_bytes())):
            assert proc.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, "the console did not start in 30 s"
            await asyncio.sleep(0.05)
        base = f"http://127.0.0.1:{int(found.group(1))}"
        headers = {"authorization": f"Bearer {CONSOLE_TOKEN}"}
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as client:
            while True:  # the line is written just before the server starts
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get("/api/openapi.json")).status_code == 200:
                        break
                assert proc.poll() is None, log.read_text(errors="replace")
                assert time.monotonic() < deadline, "the console did not answer in 30 s"
                await asyncio.sleep(0.05)
            yield ConsoleProcess(proc, client)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


async def test_console_process_killed_mid_replay_loses_nothing(
    node: ConsoleNode, tmp_path: Path
) -> None:
    """``qworker console`` SIGKILLed while its replay (at a rate) runs: every id is in the DLQ or
    the target (at most the in-flight bound in both); a new console process lists the DLQ,
    replays the rest to the end, and stops with exit code 0 on SIGTERM."""
    queue = f"qwf.cp{uuid.uuid4().hex[:8]}"
    dlq, ids = await fill(node, queue, PACED)
    replay_url = f"/api/dlqs/{quoted(dlq)}/replay"
    try:
        async with console_process(node, dlq, tmp_path / "first.log") as first:
            started = await timed(first.client.post(replay_url, json={"rate": RATE}))
            assert started.status_code == 202, started.text
            job_id = started.json()["job"]
            ended: asyncio.Future[Any] = asyncio.ensure_future(asyncio.to_thread(first.proc.wait))
            watched = await watch_depth(node, queue, lambda n: n >= PACED // 5, ended)
            first.proc.send_signal(signal.SIGKILL)
            assert await asyncio.wait_for(ended, 30) == -signal.SIGKILL

        # What the dead console held comes back to the DLQ: every id in the DLQ or the target.
        where = await peek(node, dlq, queue)
        both = accounted(ids, where[dlq], where[queue])

        async with console_process(node, dlq, tmp_path / "second.log") as second:
            listed = await timed(second.client.get("/api/dlqs"))
            assert listed.status_code == 200, listed.text
            (row,) = [r for r in listed.json() if r["queue"] == dlq]
            assert row["messages"] == where[dlq].total() and row["problem"] is None, row
            old = await timed(second.client.get(f"/api/jobs/{quoted(job_id)}"))
            assert old.status_code == 404, old.text  # jobs lived in the dead process's memory
            again = await timed(second.client.post(replay_url, json={}))
            assert again.status_code == 202, again.text
            finished = await second.job(again.json()["job"])
            assert finished["state"] == "done", finished
            assert finished["replayed"] == where[dlq].total(), finished
            second.proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(second.proc.wait, 30)
            assert code == 0, (tmp_path / "second.log").read_text(errors="replace")

        left = await holdings(node, dlq, queue)
    finally:
        await delete_queues([node.url], [dlq, queue])
    print(
        f"\nconsole process SIGKILL mid-replay [{SIZE.name}, rate {RATE}]: {PACED} dead letters, "
        f"killed with {watched} in the target; then {where[dlq].total()} in the DLQ + "
        f"{where[queue].total()} in the target ({both} in both); after a new console's replay "
        f"{left[queue].total()} in the target"
    )
    assert both <= DUPLICATE_BOUND, both
    assert not left[dlq], left[dlq]
    assert set(left[queue]) == set(ids)
    assert left[queue].total() == len(ids) + both


# 4. The broker closes the console's connection between two requests.


def message_ids(answer: httpx.Response) -> list[str]:
    return [record["message_id"] for record in answer.json()]


async def test_connection_closed_by_the_broker_between_two_requests(
    node: ConsoleNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``rabbitmqctl close_connection`` of the console's connection ("qworker-console") between
    two requests, twice: each time the next request connects again (one attempt, no back-off)
    and answers 200 with the same page; every kind of read works after it; nothing moved."""
    attempts = count_connects(monkeypatch)
    queue = f"qwf.cc{uuid.uuid4().hex[:8]}"
    dlq, ids = await fill(node, queue, 300)
    messages = ConsoleUnderTest.path(dlq, "messages")
    try:
        async with console_on(node, dlq) as c:
            before = await timed(c.get(messages, params={"limit": 20}))
            assert before.status_code == 200, before.text
            assert len(attempts) == 1
            for round_ in range(2):
                closed = await asyncio.to_thread(close_connections, node.name, "qworker-console")
                assert closed == 1, f"round {round_}: closed {closed} connections"
                after = await timed(c.get(messages, params={"limit": 20}))
                assert after.status_code == 200, after.text
                assert message_ids(after) == message_ids(before)
                assert len(attempts) == 2 + round_, attempts
            for url in ("/api/dlqs", c.path(dlq, "groups"), c.path(dlq, "messages", ids[3])):
                answer = await timed(c.get(url))
                assert answer.status_code == 200, (url, answer.text)
            assert len(attempts) == 3
        left = await holdings(node, dlq)
    finally:
        await delete_queues([node.url], [dlq, queue])
    assert left[dlq] == Counter(ids)
