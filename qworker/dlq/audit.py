"""The audit trail: every action that changes a DLQ, appended to a stream in the broker.

One JSON record per action (``replay``, ``edit``, ``purge``, ``export --remove``, and
alerts that fired) goes to the durable stream queue ``qworker.audit`` (RabbitMQ stream,
declared on first use), published with confirms. Nothing else stores state: the broker is
the database. Streams keep what they hold whoever reads it, so any number of readers
(``qworker dlq history``, a console) can read the whole trail without removing anything.

Records are append-only facts; :func:`read` yields them oldest first.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import socket
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractConnection

from qworker.publish import ConfirmedPublisher
from qworker.redact import redact

#: The stream every qworker front end appends to.
STREAM = "qworker.audit"
#: How long the broker keeps audit records (a stream's ``x-max-age``).
MAX_AGE = "365D"
#: At most this many message ids are listed in one record (the counts stay exact).
MESSAGE_IDS_LIMIT = 1000
#: Reading stops when no record arrived for this long after the last one.
IDLE_SECONDS = 1.0


def actor() -> str:
    """Who acts from this process: ``user@host``."""
    try:
        user = getpass.getuser()
    except Exception:  # no user name in this environment (a container without passwd)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def new_id() -> str:
    """A fresh id for a replay (written to ``x-qworker-replay-id`` on its copies)."""
    return uuid.uuid4().hex[:16]


@dataclass(slots=True)
class AuditRecord:
    """One action on a DLQ, or an alert that fired.

    Args:
        action: ``replay``, ``edit``, ``purge``, ``export-remove`` or ``alert``.
        dlq: The DLQ acted on (for an alert: the queue of its outcomes, if one).
        actor: Who acted: ``user@host`` for the CLI, a token name for a web front end.
        at: When (ISO 8601 UTC); now by default.
        filter: The filter that selected the messages, by the CLI's option names.
        counts: What happened, e.g. ``{"replayed": 12, "skipped": 1, "failed": 0}``.
        message_ids: The messages concerned (at most ``MESSAGE_IDS_LIMIT``).
        replay_id: The id written to the replayed copies (``x-qworker-replay-id``).
        fingerprints: The failure groups concerned.
        outcome: ``ok``, ``canary-failed``, ``partial``, ``error: ...``; for an alert, the rule.
        id: This record's id.
    """

    action: str
    dlq: str | None = None
    actor: str = field(default_factory=actor)
    at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="milliseconds"))
    filter: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    message_ids: list[str] = field(default_factory=list)
    replay_id: str | None = None
    fingerprints: list[str] = field(default_factory=list)
    outcome: str = "ok"
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def to_json(self) -> bytes:
        """The record as one JSON object (message ids capped, texts redacted)."""
        data = asdict(self)
        data["message_ids"] = [str(m) for m in self.message_ids[:MESSAGE_IDS_LIMIT]]
        data["outcome"] = redact(self.outcome)
        return json.dumps(data, separators=(",", ":"), default=str).encode("utf-8")

    @classmethod
    def from_json(cls, body: bytes) -> AuditRecord | None:
        """A record read back; None for anything that is not one (the stream is writable
        by any user with write permission: never trust it further than its shape)."""
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(data, Mapping) or not isinstance(data.get("action"), str):
            return None
        known = {f: data[f] for f in cls.__dataclass_fields__ if f in data}
        try:
            return cls(**known)
        except TypeError:
            return None


async def declare(connection: AbstractConnection) -> None:
    """Declare the audit stream (idempotent)."""
    channel = await connection.channel(publisher_confirms=False)
    try:
        await channel.declare_queue(
            STREAM, durable=True, arguments={"x-queue-type": "stream", "x-max-age": MAX_AGE}
        )
    finally:
        with contextlib.suppress(Exception):
            await channel.close()


async def append(connection: AbstractConnection, record: AuditRecord) -> None:
    """Append ``record`` to the trail and wait for the broker's confirm.

    Raises :class:`qworker.errors.PublishFailed` when the broker does not take it.
    """
    await declare(connection)
    channel = await connection.channel(publisher_confirms=True)
    try:
        message = aio_pika.Message(
            record.to_json(),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=record.id,
            type=record.action,
        )
        await ConfirmedPublisher(channel).publish(message, STREAM)
    finally:
        with contextlib.suppress(Exception):
            await channel.close()


async def read(
    connection: AbstractConnection, *, since: datetime | None = None
) -> AsyncIterator[AuditRecord]:
    """The records of the trail, oldest first (from ``since`` when given), up to now.

    A stream is read by consuming it from an offset (``first`` or a timestamp); nothing is
    removed. Reading stops once no record arrived for ``IDLE_SECONDS``.
    """
    await declare(connection)
    channel = await connection.channel(publisher_confirms=False)
    try:
        await channel.set_qos(prefetch_count=500)
        queue = await channel.get_queue(STREAM, ensure=False)
        offset: Any = since if since is not None else "first"
        received: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
        tag = await queue.consume(received.put, arguments={"x-stream-offset": offset})
        try:
            while True:
                try:
                    message = await asyncio.wait_for(received.get(), IDLE_SECONDS)
                except TimeoutError:
                    return
                await message.ack()
                record = AuditRecord.from_json(message.body)
                if record is not None:
                    yield record
        finally:
            with contextlib.suppress(aiormq.exceptions.AMQPError, ConnectionError, RuntimeError):
                await queue.cancel(tag)
    finally:
        with contextlib.suppress(Exception):
            await channel.close()
