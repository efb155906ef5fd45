"""``qworker_mttd_seconds`` and ``qworker_mttr_seconds`` on the real broker: a Watcher with
metrics attached tails the shared audit stream and observes each group of its own DLQ once
(the MTTD when it becomes known, the MTTR once the come-back window passed without the replay
coming back); what was known before it started is not observed; a reconnection resumes after
the last record read. Records are our own (uuid DLQ names): other tests write to the same
stream."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from aio_pika.abc import AbstractConnection

from qworker import App
from qworker.dlq import audit
from qworker.metrics import Metrics
from qworker.watch import Watcher
from tests.support.broker import eventually

pytestmark = pytest.mark.rabbitmq

POLL = 0.3
WINDOW = timedelta(seconds=3)


def value(metrics: Metrics, name: str, queue: str) -> float | None:
    text = metrics.render().decode()
    found = re.search(rf'^{name}\{{queue="{re.escape(queue)}"\}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else None


def iso(when: datetime) -> str:
    return when.isoformat(timespec="milliseconds")


def alert(dlq: str, fingerprint: str, when: datetime) -> audit.AuditRecord:
    return audit.AuditRecord(
        "alert", dlq=dlq, fingerprints=[fingerprint], outcome="new fingerprint", at=iso(when)
    )


def replay(
    dlq: str, fingerprint: str, replay_id: str, first: datetime, when: datetime | None = None
) -> audit.AuditRecord:
    return audit.AuditRecord(
        "replay",
        dlq=dlq,
        at=iso(when or datetime.now(UTC)),
        replay_id=replay_id,
        fingerprints=[fingerprint],
        first_failures={fingerprint: iso(first)},
        counts={"replayed": 2, "skipped": 0, "failed": 0},
    )


def app_for(broker_url: str, queue: str) -> App:
    app = App(broker_url, name=f"mttr-{uuid.uuid4().hex[:6]}")

    @app.handler(queue)
    async def handle(body: dict[str, object]) -> None:
        return None

    return app


async def test_watcher_observes_one_mttd_and_one_mttr_each_once(
    broker_url: str, queue_name: str, amqp: AbstractConnection
) -> None:
    dlq = f"{queue_name}.dlq"
    now = datetime.now(UTC)
    # Known before the watcher starts: detected and resolved already, never observed.
    await audit.append(amqp, alert(dlq, "before", now - timedelta(minutes=50)))
    await audit.append(
        amqp, replay(dlq, "before", "r-b0", now - timedelta(hours=1), now - timedelta(minutes=40))
    )
    app = app_for(broker_url, queue_name)
    metrics = Metrics().attach(app)
    watcher = Watcher(app, interval=POLL, window=WINDOW)
    assert watcher.tracker is not None
    task = asyncio.create_task(watcher.run())
    try:
        await eventually(lambda: watcher.caught_up, 90, message="the trail was not read")
        assert watcher.tracker is not None and len(watcher.tracker) == 2  # ours only
        assert value(metrics, "qworker_mttd_seconds_count", queue_name) == 0
        assert value(metrics, "qworker_mttr_seconds_count", queue_name) == 0

        # A group alerted 10 minutes after its first failure, replayed 15 minutes after it.
        first = datetime.now(UTC) - timedelta(minutes=15)
        await audit.append(amqp, alert(dlq, "fp-a", first + timedelta(minutes=10)))
        await audit.append(amqp, replay(dlq, "fp-a", "r-a", first))
        await eventually(lambda: value(metrics, "qworker_mttd_seconds_count", queue_name) == 1, 10)
        assert value(metrics, "qworker_mttd_seconds_sum", queue_name) == pytest.approx(600, abs=1)
        text = metrics.render().decode()
        assert f'qworker_mttd_seconds_bucket{{le="900.0",queue="{queue_name}"}} 1.0' in text
        assert f'qworker_mttd_seconds_bucket{{le="300.0",queue="{queue_name}"}} 0.0' in text
        replayed = time.monotonic()
        assert value(metrics, "qworker_mttr_seconds_count", queue_name) == 0  # within the window

        # A second group whose replay comes back within the window: never resolved.
        await audit.append(amqp, alert(dlq, "fp-b", datetime.now(UTC)))
        await audit.append(amqp, replay(dlq, "fp-b", "r-b", first))
        back = audit.AuditRecord(
            "purge",
            dlq=dlq,
            fingerprints=["fp-b"],
            first_failures={"fp-b": iso(first)},
            came_back={"r-b": iso(datetime.now(UTC))},
            counts={"purged": 2},
        )
        await audit.append(amqp, back)

        await eventually(lambda: value(metrics, "qworker_mttr_seconds_count", queue_name) == 1, 15)
        assert time.monotonic() - replayed >= WINDOW.total_seconds() - 1.0
        mttr = value(metrics, "qworker_mttr_seconds_sum", queue_name)
        assert mttr == pytest.approx(900, abs=10)  # first failure to the replay of fp-a
        assert value(metrics, "qworker_mttd_seconds_count", queue_name) == 2  # fp-a, fp-b

        # A dropped connection: the tail resumes after the last record read.
        await watcher.close()
        await audit.append(amqp, alert(dlq, "fp-c", datetime.now(UTC)))
        await audit.append(amqp, replay(dlq, "fp-c", "r-c", datetime.now(UTC)))
        await eventually(lambda: value(metrics, "qworker_mttd_seconds_count", queue_name) == 3, 15)
        await eventually(lambda: value(metrics, "qworker_mttr_seconds_count", queue_name) == 2, 15)
        # Polls go on: nothing is observed twice, fp-b never resolves.
        await asyncio.sleep(WINDOW.total_seconds() + 4 * POLL)
        assert value(metrics, "qworker_mttd_seconds_count", queue_name) == 3
        assert value(metrics, "qworker_mttr_seconds_count", queue_name) == 2
        assert value(metrics, "qworker_mttr_seconds_sum", queue_name) == pytest.approx(mttr, abs=3)
        assert len(watcher.tracker) == 9  # before 2, fp-a 2, fp-b 3, fp-c 2: ours only
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_without_metrics_the_trail_is_not_tailed(broker_url: str, queue_name: str) -> None:
    app = app_for(broker_url, queue_name)
    watcher = Watcher(app, interval=POLL, export=True)  # polls for a reader of `latest`
    assert watcher.polls and watcher.tracker is None
    try:
        await watcher.poll()
        await watcher.poll()
        assert watcher._tail is None and not watcher.caught_up
    finally:
        await watcher.close()
