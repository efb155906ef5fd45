"""The DLQ gauges: ``qworker_dlq_messages`` and ``qworker_dlq_oldest_age_seconds`` follow the
DLQ's depth and its head's failure time within a poll, in one process and under a supervisor
(which alone polls: the gauge is not summed over its children), and polling removes nothing."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aio_pika
import pytest

from tests.ops.alerting import age_of, alert_worker, head_failed_at, publish_failure
from tests.support.broker import eventually, eventually_depth
from tests.support.workers import WorkerProcess

pytestmark = pytest.mark.rabbitmq

POLL = 0.5


async def check_gauges_follow_the_dlq(
    worker: WorkerProcess, queue: str, amqp: aio_pika.abc.AbstractConnection
) -> None:
    dlq = f"{queue}.dlq"
    await eventually(
        lambda: (
            worker.metric("qworker_dlq_messages", queue=queue) == 0
            and 'qworker_dlq_messages{queue="' + queue + '"}' in worker.get("/metrics")[1].decode()
        ),
        10,
        message=worker.output,
    )
    for n in range(3):
        await publish_failure(amqp, queue, f"f{n}")
        await asyncio.sleep(0.3)  # distinct failure times: the head is the oldest
    await eventually_depth(amqp, dlq, 3)
    await eventually(
        lambda: worker.metric("qworker_dlq_messages", queue=queue) == 3, 5, message=worker.output
    )
    head = await head_failed_at(amqp, dlq)
    await asyncio.sleep(2.0)  # the age grows between polls (computed when scraped)
    for _ in range(3):
        expected = age_of(head)
        age = worker.metric("qworker_dlq_oldest_age_seconds", queue=queue)
        assert abs(age - expected) <= POLL + 0.5, (age, expected)
        assert age >= 2.0
        await asyncio.sleep(POLL)
    # polling removed nothing and kept the order: the same head, the same depth. A poll in
    # progress holds the head for a moment (neither ready nor first for another reader), so
    # look until a look falls between two polls.
    await eventually_depth(amqp, dlq, 3)
    heads = []
    for _ in range(20):
        heads.append(await head_failed_at(amqp, dlq))
        if heads[-1] == head:
            break
        await asyncio.sleep(0.05)
    assert heads[-1] == head, heads
    # a message more: the depth follows; the oldest stays the oldest
    await publish_failure(amqp, queue, "f3")
    await eventually(
        lambda: worker.metric("qworker_dlq_messages", queue=queue) == 4, 5, message=worker.output
    )
    assert abs(worker.metric("qworker_dlq_oldest_age_seconds", queue=queue) - age_of(head)) < 1.5
    # emptied: 0 and 0
    channel = await amqp.channel()
    await (await channel.get_queue(dlq, ensure=False)).purge()
    await channel.close()
    await eventually(
        lambda: (
            worker.metric("qworker_dlq_messages", queue=queue) == 0
            and worker.metric("qworker_dlq_oldest_age_seconds", queue=queue) == 0
        ),
        5,
        message=worker.output,
    )


async def test_single_process_dlq_gauges_follow_depth_and_oldest_failure(
    broker_url: str,
    queue_name: str,
    tmp_path: Path,
    cleanup: list[str],
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    worker = alert_worker(broker_url, queue_name, tmp_path, cleanup)
    try:
        worker.start("--metrics-port", "0", "--dlq-poll", str(POLL))
        await check_gauges_follow_the_dlq(worker, queue_name, amqp)
        assert worker.terminate(30) == 0
    finally:
        worker.kill()


async def test_supervisor_polls_once_and_the_gauge_is_not_summed(
    broker_url: str,
    queue_name: str,
    tmp_path: Path,
    cleanup: list[str],
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    """--processes 2: the supervisor polls (its children never do), so the gauges equal the
    DLQ's depth and age, not twice them."""
    worker = alert_worker(broker_url, queue_name, tmp_path, cleanup)
    try:
        worker.launch("--processes", "2", "--metrics-port", "0", "--dlq-poll", str(POLL))
        worker.wait_log("supervisor.ready", timeout=60)
        await check_gauges_follow_the_dlq(worker, queue_name, amqp)
        assert worker.terminate(45) == 0
    finally:
        worker.kill()


async def test_polling_off_exports_no_dlq_gauges(
    broker_url: str,
    queue_name: str,
    tmp_path: Path,
    cleanup: list[str],
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    """--dlq-poll 0: no poller, no DLQ series (and no extra connection)."""
    worker = alert_worker(broker_url, queue_name, tmp_path, cleanup)
    try:
        worker.start("--metrics-port", "0", "--dlq-poll", "0")
        await publish_failure(amqp, queue_name, "x")
        await eventually_depth(amqp, f"{queue_name}.dlq", 1)
        started = time.monotonic()
        while time.monotonic() - started < 1.0:
            body = worker.get("/metrics")[1].decode()
            assert "qworker_dlq_messages{" not in body
            await asyncio.sleep(0.25)
    finally:
        worker.kill()


async def take_head(amqp: aio_pika.abc.AbstractConnection, dlq: str) -> None:
    channel = await amqp.channel()
    queue = await channel.get_queue(dlq, ensure=False)
    message = await queue.get(no_ack=False, timeout=5)
    assert message is not None
    await message.ack()
    await channel.close()


async def head_delivery_count(amqp: aio_pika.abc.AbstractConnection, dlq: str) -> int:
    """The head's x-delivery-count, as a peek sees it before giving it back (this peek adds
    one delivery itself on RabbitMQ before 4.3)."""
    channel = await amqp.channel()
    queue = await channel.get_queue(dlq, ensure=False)
    message = await queue.get(no_ack=False, timeout=5)
    assert message is not None
    count = int((message.headers or {}).get("x-delivery-count", 0) or 0)
    await message.nack(requeue=True)
    await channel.close()
    return count


async def test_a_dlq_known_to_be_safe_is_peeked_every_poll(
    broker_url: str,
    queue_name: str,
    tmp_path: Path,
    cleanup: list[str],
    amqp: aio_pika.abc.AbstractConnection,
    management_url: str,
) -> None:
    """The management API says the DLQ's limit is qworker's billion: the head is read every
    poll, so a head removed while another message arrives (same depth) moves the age."""
    worker = alert_worker(broker_url, queue_name, tmp_path, cleanup)
    worker.env["QWORKER_MANAGEMENT_URL"] = management_url
    dlq = f"{queue_name}.dlq"
    try:
        worker.start("--metrics-port", "0", "--dlq-poll", str(POLL))
        await publish_failure(amqp, queue_name, "old")
        await eventually_depth(amqp, dlq, 1)
        await asyncio.sleep(3)
        await eventually(
            lambda: worker.metric("qworker_dlq_oldest_age_seconds", queue=queue_name) >= 2.5,
            5,
            message=worker.output,
        )
        await take_head(amqp, dlq)
        await publish_failure(amqp, queue_name, "new")
        await eventually_depth(amqp, dlq, 1)
        await eventually(
            lambda: worker.metric("qworker_dlq_oldest_age_seconds", queue=queue_name) < 1.5,
            5,
            message=worker.output,
        )
    finally:
        worker.kill()


async def test_without_a_known_limit_the_head_is_not_peeked_every_poll(
    broker_url: str,
    queue_name: str,
    tmp_path: Path,
    cleanup: list[str],
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    """No management API: a quorum DLQ's delivery limit is unknown (a policy could lower it),
    so the head is peeked only when it may have changed; its failure time is kept between.
    Ten polls cost the head at most one delivery, and the age still grows."""
    worker = alert_worker(broker_url, queue_name, tmp_path, cleanup)
    worker.env["QWORKER_MANAGEMENT_URL"] = "http://guest:guest@127.0.0.1:1/"
    dlq = f"{queue_name}.dlq"
    try:
        worker.start("--metrics-port", "0", "--dlq-poll", "0.2")
        await publish_failure(amqp, queue_name, "a")
        await eventually_depth(amqp, dlq, 1)
        await eventually(
            lambda: worker.metric("qworker_dlq_messages", queue=queue_name) == 1,
            5,
            message=worker.output,
        )
        head = await head_failed_at(amqp, dlq)  # our own peek: +1
        await asyncio.sleep(2.0)  # ten polls
        assert await head_delivery_count(amqp, dlq) <= 2  # the poller's first peek and ours
        age = worker.metric("qworker_dlq_oldest_age_seconds", queue=queue_name)
        assert abs(age - age_of(head)) < 1.0
    finally:
        worker.kill()
