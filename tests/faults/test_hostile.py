"""Hostile input (hypothesis): the worker stays up, its memory stays bounded, and every message
ends processed or dead-lettered with a reason.

Raw messages go with aio-pika to a subprocess worker on a throwaway private node (a forged
``x-death`` once broke the shared node's dead-lettering, see ``test_forged_headers.py``; here it
could only break that node) that consumes four queues
(JSON ``dict``, a pydantic model, ``str`` and ``bytes`` payloads). Some ask their handler to fail
(header ``fail``) so that the failure paths see hostile headers too. Example count:
``SIZE.hostile_examples`` (100 at CI size, 1000 at full size).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import psutil
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings

from tests.faults.fault_app import worker_env
from tests.faults.hostile import SUFFIXES, Hostile, LoopThread, hostile_messages
from tests.faults.nodes import RabbitNode, ctl
from tests.faults.scenario import delete_queues
from tests.faults.size import SIZE
from tests.faults.stream import DlqDrain, Ledger
from tests.support.workers import WorkerPool

pytestmark = [pytest.mark.faults, pytest.mark.rabbitmq, pytest.mark.timeout(SIZE.timeout)]

#: RSS growth allowed between the end of the warm-up and the end of the run.
RSS_GROWTH_LIMIT = 200 * 1024 * 1024


class Target:
    """The worker under test, an aio-pika publisher and the DLQ drains, on one loop thread."""

    def __init__(self, broker_url: str, tmp: Path) -> None:
        self.url = broker_url
        self.queue = f"qwf.h{uuid.uuid4().hex[:10]}"
        self.queues = [f"{self.queue}.{s}" for s in SUFFIXES]
        (tmp / "ledger").mkdir()
        (tmp / "logs").mkdir()
        env = worker_env([broker_url], f"qwf-w-{self.queue}", self.queue, tmp / "ledger", tmp)
        self.pool = WorkerPool(
            "tests.faults.fault_app:hostile_app",
            env,
            tmp / "logs",
            1,
            ["--concurrency", "8", "--prefetch", "16", "--log-format", "json"],
        )
        self.ledger = Ledger(tmp / "ledger")
        self.loop = LoopThread()
        self.published: dict[str, Hostile] = {}
        self.refused: Counter[str] = Counter()
        self.drains: list[DlqDrain] = []
        self.tasks: list[asyncio.Future[None]] = []

    def start(self) -> None:
        self.pool.start()
        self.connection = self.loop.run(aio_pika.connect(self.url))
        self.channel = self.loop.run(self._channel())
        for q in self.queues:
            self.drains.append(self.loop.run(self._drain(q)))

    async def _channel(self) -> aio_pika.abc.AbstractChannel:
        return await self.connection.channel(publisher_confirms=True)

    async def _reopen(self) -> None:
        """A refused publish may close the channel, or (broker-side errors) the connection."""
        if self.connection.is_closed or self.channel.is_closed:
            with contextlib.suppress(Exception):
                await self.connection.close()
            self.connection = await aio_pika.connect(self.url)
            self.channel = await self._channel()

    async def _drain(self, queue: str) -> DlqDrain:
        drain = DlqDrain([self.url], f"{queue}.dlq")
        self.tasks.append(asyncio.ensure_future(drain.run()))
        return drain

    @property
    def process(self) -> psutil.Process:
        proc = self.pool.workers[0].proc
        assert proc is not None
        return psutil.Process(proc.pid)

    def alive(self) -> bool:
        return self.pool.workers[0].alive()

    def publish(self, m: Hostile) -> None:
        message_id = uuid.uuid4().hex
        try:
            message = aio_pika.Message(
                m.body,
                headers=m.headers,
                content_type=m.content_type,
                content_encoding=m.content_encoding,
                expiration=m.expiration / 1000 if m.expiration is not None else None,
                priority=m.priority,
                correlation_id=m.correlation_id,
                message_id=message_id,
            )
            self.loop.run(
                self.channel.default_exchange.publish(
                    message, routing_key=f"{self.queue}.{m.suffix}", timeout=30
                )
            )
        except Exception as exc:
            # The client library or the broker refused it: it never reached the worker.
            self.refused[type(exc).__name__] += 1
            self.loop.run(self._reopen())
            return
        self.published[message_id] = m

    def dead(self) -> dict[str, set[str]]:
        reasons: dict[str, set[str]] = {}
        for drain in self.drains:
            for r in drain.records:
                reasons.setdefault(r.message_id, set()).add(r.reason)
        return reasons

    def missing(self) -> set[str]:
        self.ledger.refresh()
        return set(self.published) - self.ledger.processed - set(self.dead())

    def wait_accounted(self, timeout: float) -> set[str]:
        deadline = time.monotonic() + timeout
        while (missing := self.missing()) and time.monotonic() < deadline:
            time.sleep(0.25)
        return missing

    def close(self) -> None:
        self.pool.close()
        for drain in self.drains:
            self.loop.loop.call_soon_threadsafe(drain.stop)
        with_queues = [*self.queues, *(f"{q}.dlq" for q in self.queues)]
        with_queues += [f"{q}.retry.50ms" for q in self.queues]
        try:
            self.loop.run(delete_queues([self.url], with_queues))
            self.loop.run(self.connection.close(), timeout=10)
        except Exception:
            pass
        self.loop.close()


@pytest.fixture
def target(scratch_node: RabbitNode, tmp_path: Path) -> Iterator[Target]:
    """A hostile-input worker (subprocess) with its queues, removed after the test."""
    t = Target(scratch_node.url, tmp_path)
    try:
        t.start()
        yield t
    finally:
        t.close()


def _warm_up(target: Target) -> None:
    """Heavy but legal traffic first, so that the RSS baseline includes normal buffers."""
    big = b'{"id": "w", "mode": "ok"}' + b" " * 2_500_000
    for i in range(30):
        suffix = SUFFIXES[i % len(SUFFIXES)]
        body = big if i % 3 == 0 else b'{"id": "w", "mode": "ok"}'
        target.publish(Hostile(suffix, body, "application/json", None, {}, None, None, None))
    assert not target.wait_accounted(60), "warm-up messages not handled"


def test_hostile_messages_never_crash_the_worker_nor_get_lost(
    target: Target, scratch_node: RabbitNode
) -> None:
    """Random bodies (binary, up to 3 MB, deeply nested JSON, invalid UTF-8), content types and
    encodings, and headers of every AMQP type and size (forged ``x-qworker-*`` included): the
    worker process stays alive and keeps consuming, its RSS does not grow past a generous bound,
    and every published message is processed or dead-lettered with a reason."""
    _warm_up(target)
    rss_warm = target.process.memory_info().rss

    @settings(
        max_examples=SIZE.hostile_examples,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(hostile_messages)
    @example(Hostile("json", b"[" * 100_000 + b"]" * 100_000, None, None, {}, None, None, None))
    @example(Hostile("model", b"\xff\xfe" * 1000, "application/json", None, {}, None, None, None))
    @example(Hostile("text", b"\xed\xa0\x80", "text/plain", None, {}, None, None, None))
    @example(Hostile("bytes", b"\x00" * 3_000_000, None, "gzip", {}, None, None, None))
    @example(
        Hostile(
            "json", b"{}", "application/json", None, {"x-qworker-attempt": 2**62}, None, None, None
        )
    )
    @example(
        Hostile(
            "json",
            b"{}",
            None,
            None,
            {"x-qworker-history": "x" * 60_000, "fail": "transient"},
            None,
            None,
            None,
        )
    )
    @example(
        Hostile(
            "model",
            b"{}",
            None,
            None,
            {"x-death": [{"reason": 5}], "fail": "permanent"},
            0,
            None,
            None,
        )
    )
    def publish_one(message: Hostile) -> None:
        target.publish(message)
        assert target.alive(), f"worker died after {message.describe()}"

    publish_one()
    missing = target.wait_accounted(120)
    assert target.alive(), target.pool.workers[0].output()

    dead = target.dead()
    outcomes = Counter(
        "processed" if mid in target.ledger.processed else "/".join(sorted(dead.get(mid, {"?"})))
        for mid in target.published
    )
    rss_end = target.process.memory_info().rss
    print(
        f"\nhostile: published {len(target.published)}, refused by client/broker "
        f"{dict(target.refused)}, outcomes {dict(outcomes)}, RSS warm {rss_warm >> 20} MiB, "
        f"end {rss_end >> 20} MiB"
    )
    assert not missing, [target.published[m].describe() for m in sorted(missing)[:5]]
    assert all(reason != "none" for reasons in dead.values() for reason in reasons), dead
    assert rss_end - rss_warm < RSS_GROWTH_LIMIT, (rss_warm, rss_end)
    assert target.pool.events()["message.internal_error"] == 0
    dlx = ctl(scratch_node.name, "eval", "whereis(rabbit_fifo_dlx_sup).").strip()
    assert dlx != "undefined", "the broker's dead-letter supervisor died"

    # Still consuming: one ordinary message per queue is handled.
    before = set(target.published)
    for suffix in SUFFIXES:
        ok = b'{"id": "after", "mode": "ok"}'
        target.publish(Hostile(suffix, ok, "application/json", None, {}, None, None, None))
    fresh = set(target.published) - before
    assert len(fresh) == len(SUFFIXES)
    deadline = time.monotonic() + 30
    while not fresh <= target.ledger.processed and time.monotonic() < deadline:
        time.sleep(0.2)
        target.ledger.refresh()
    assert fresh <= target.ledger.processed
