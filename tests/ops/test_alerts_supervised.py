"""Alert rules per app, not per process: under ``--processes 2`` the children forward their
outcomes to the supervisor, which evaluates the rules once for all; ``dlq_depth`` rules fire
once per crossing; every alert leaves an ``alert`` record in the audit trail; a fingerprint
alerted before a restart is not alerted again."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aio_pika
import pytest

from tests.ops.alerting import (
    alert_records,
    alert_worker,
    handler_pids,
    notifications,
    publish_failure,
)
from tests.support.broker import eventually, eventually_depth

pytestmark = pytest.mark.rabbitmq


async def test_rules_count_outcomes_across_two_processes(
    broker_url: str,
    queue_name: str,
    tmp_path: Path,
    cleanup: list[str],
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    """Eight dead letters of two kinds, spread over two children: the count rule (5 within 60 s)
    fires once, the new_fingerprint rule once per kind, all in the supervisor; each alert has
    its audit record. After a restart, a known kind alerts no more, a new one does."""
    since = datetime.now(UTC) - timedelta(seconds=5)
    worker = alert_worker(
        broker_url, queue_name, tmp_path, cleanup, alerts="dead_lettered:5:60,new_fingerprint"
    )
    try:
        worker.launch("--processes", "2", "--concurrency", "1", "--dlq-poll", "0")
        worker.wait_log("supervisor.ready", timeout=60)
        supervisor_pid = worker.proc.pid if worker.proc else 0
        children = set(worker.children())
        for n in range(8):
            await publish_failure(amqp, queue_name, f"m{n}", "alpha failure" if n % 2 else "beta")
        await eventually_depth(amqp, f"{queue_name}.dlq", 8, timeout=20)
        assert handler_pids(worker) == children  # both children dead-lettered some

        def fired() -> Counter[str]:
            return Counter(n["rule"] for n in notifications(worker))

        await eventually(
            lambda: fired() == {"5 dead_lettered within 60s": 1, "new fingerprint": 2},
            10,
            message=lambda: f"{notifications(worker)}\n{worker.output()}",
        )
        await asyncio.sleep(1.0)  # nothing more comes
        assert fired() == {"5 dead_lettered within 60s": 1, "new fingerprint": 2}
        assert {n["pid"] for n in notifications(worker)} == {supervisor_pid}
        kinds = [n["fingerprints"] for n in notifications(worker) if n["rule"] == "new fingerprint"]
        assert all(len(k) == 1 for k in kinds) and len({k[0] for k in kinds}) == 2

        records = await eventually(
            lambda: _records(amqp, queue_name, since, 3), 10, message="audit records missing"
        )
        by_rule = Counter(r.outcome for r in records)
        assert by_rule == {"5 dead_lettered within 60s": 1, "new fingerprint": 2}
        audited = {fp for r in records if r.outcome == "new fingerprint" for fp in r.fingerprints}
        assert audited == {k[0] for k in kinds}
        assert worker.terminate(45) == 0, worker.output()

        # Restarted: the known kinds are seeded from the audit trail; a third kind is new.
        worker.launch("--processes", "2", "--dlq-poll", "0")
        worker.wait_log("supervisor.ready", timeout=60)
        worker.wait_log('"alert.seeded"', timeout=20)
        await publish_failure(amqp, queue_name, "again", "alpha failure")
        await publish_failure(amqp, queue_name, "third", "gamma trouble")
        await eventually_depth(amqp, f"{queue_name}.dlq", 10, timeout=20)
        await eventually(
            lambda: fired()["new fingerprint"] == 3, 10, message=lambda: str(notifications(worker))
        )
        await asyncio.sleep(1.0)
        assert fired()["new fingerprint"] == 3
    finally:
        worker.kill()


async def _records(
    amqp: aio_pika.abc.AbstractConnection, queue: str, since: datetime, count: int
) -> list[object] | None:
    records = await alert_records(amqp, queue, since)
    return records if len(records) >= count else None  # type: ignore[return-value]


async def test_dlq_depth_alert_fires_once_per_crossing(
    broker_url: str,
    queue_name: str,
    tmp_path: Path,
    cleanup: list[str],
    amqp: aio_pika.abc.AbstractConnection,
) -> None:
    """above=2 under a supervisor: the third dead letter fires one alert; more messages stay
    quiet; the audit trail holds the alert with the DLQ's name."""
    since = datetime.now(UTC) - timedelta(seconds=5)
    worker = alert_worker(broker_url, queue_name, tmp_path, cleanup, alerts="dlq_depth:2")
    try:
        worker.launch("--processes", "2", "--dlq-poll", "0.3")
        worker.wait_log("supervisor.ready", timeout=60)
        for n in range(2):
            await publish_failure(amqp, queue_name, f"d{n}")
        await eventually_depth(amqp, f"{queue_name}.dlq", 2)
        await asyncio.sleep(1.0)  # polls at depth 2: not above
        assert notifications(worker) == []
        for n in range(2, 6):
            await publish_failure(amqp, queue_name, f"d{n}")
        await eventually_depth(amqp, f"{queue_name}.dlq", 6)
        await eventually(lambda: notifications(worker), 5, message=worker.output)
        await asyncio.sleep(1.5)  # five polls above the threshold
        [alert] = notifications(worker)
        assert alert["rule"].startswith(f"dlq depth above 2: {queue_name}.dlq holds ")
        assert alert["queue"] == queue_name and alert["value"] > 2
        records = await eventually(
            lambda: _records(amqp, queue_name, since, 1), 10, message="no audit record"
        )
        assert [r.outcome for r in records] == [alert["rule"]]  # type: ignore[attr-defined]
    finally:
        worker.kill()
