"""Helpers of the alert and DLQ-poller tests: the alert app as a subprocess, its notifications,
the DLQ's head, the audit records of a queue."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractConnection

from qworker.dlq import audit
from qworker.dlq.records import dead_letter
from qworker.topology import queue_specs
from tests.ops import alert_app
from tests.support.broker import publish_raw
from tests.support.cli import subprocess_env
from tests.support.workers import WorkerProcess

APP_SPEC = "tests.ops.alert_app:app"


def alert_worker(
    broker_url: str, queue: str, tmp_path: Path, cleanup: list[str], alerts: str = ""
) -> WorkerProcess:
    """The alert app on ``queue`` with rules ``alerts`` (not started); its queues cleaned up."""
    env = subprocess_env(
        {
            "QWORKER_APP_URL": broker_url,
            "QWORKER_APP_QUEUE": queue,
            "QWORKER_ALERTS": alerts,
            "QWORKER_ALERT_FILE": str(tmp_path / "alerts.jsonl"),
            "QWORKER_APP_PIDS": str(tmp_path / "pids.txt"),
        }
    )
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    cleanup.extend(spec.name for spec in queue_specs(queue, "quorum", 10, alert_app.RETRY.tiers()))
    cleanup.append(f"{queue}.quarantine")
    return WorkerProcess(APP_SPEC, env, tmp_path)


def notifications(worker: WorkerProcess) -> list[dict[str, Any]]:
    """The alerts notified so far (one dict per notification)."""
    path = Path(worker.env["QWORKER_ALERT_FILE"])
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def handler_pids(worker: WorkerProcess) -> set[int]:
    path = Path(worker.env["QWORKER_APP_PIDS"])
    return {int(p) for p in path.read_text().split()} if path.exists() else set()


async def publish_failure(
    connection: AbstractConnection, queue: str, ident: str, error: str = "bad message"
) -> None:
    """A message the alert app dead-letters at once (Permanent(error))."""
    body = json.dumps({"id": ident, "mode": "permanent", "error": error}).encode()
    message = aio_pika.Message(body, content_type="application/json", message_id=ident)
    await publish_raw(connection, queue, message)


async def head_failed_at(connection: AbstractConnection, dlq: str) -> datetime:
    """The failure time of the DLQ's head, read with a get given back (a classic-safe peek)."""
    channel = await connection.channel()
    try:
        queue = await channel.get_queue(dlq, ensure=False)
        message = await queue.get(no_ack=False, fail=True, timeout=5)
        assert message is not None
        try:
            properties = {"timestamp": message.timestamp, "message_id": message.message_id}
            failed = dead_letter(dlq, b"", properties, dict(message.headers or {})).failed_at
        finally:
            await message.nack(requeue=True)
        assert failed is not None
        return failed
    finally:
        await channel.close()


async def alert_records(
    connection: AbstractConnection, queue: str, since: datetime | None = None
) -> list[audit.AuditRecord]:
    """The ``alert`` records of the audit trail about ``queue``'s DLQ (appended ``since``)."""
    return [
        r
        async for r in audit.read(connection, since=since)
        if r.action == "alert" and r.dlq == f"{queue}.dlq"
    ]


def age_of(failed_at: datetime) -> float:
    return (datetime.now(UTC) - failed_at).total_seconds()
