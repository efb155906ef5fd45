"""The audit trail: every action that changes a DLQ, appended to a stream in the broker.

One JSON record per action (``replay``, ``edit``, ``purge``, ``export --remove``, and
alerts that fired) goes to the durable stream queue ``qworker.audit`` (RabbitMQ stream,
declared on first use), published with confirms. Nothing else stores state: the broker is
the database. Streams keep what they hold whoever reads it, so any number of readers
(``qworker dlq history``, a console) can read the whole trail without removing anything.

Records are append-only facts; :func:`read` yields them oldest first. The stream is
writable by any user with write permission on it, so a record read back is checked field by
field (:meth:`AuditRecord.from_json`) and anything that is not a well-formed record is
skipped.

Writing the record comes after the action's own guarantees (a replay acks only after its
confirms): when the record cannot be appended, the action's result stands and
:class:`AuditFailed` is raised carrying that result, so no front end can lose the
operator's work or silently miss the record.
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

from qworker.errors import QworkerError
from qworker.publish import ConfirmedPublisher
from qworker.redact import redact

#: The stream every qworker front end appends to.
STREAM = "qworker.audit"
#: How long the broker keeps audit records (a stream's ``x-max-age``).
MAX_AGE = "365D"
#: At most this many message ids are listed in one record (the counts stay exact).
MESSAGE_IDS_LIMIT = 1000
#: At most this many fingerprints are listed in one record.
FINGERPRINTS_LIMIT = 1000
#: Text fields of a record read back are cut to this many characters.
TEXT_LIMIT = 2048
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
        outcome: ``ok``, ``canary-failed: ...``, ``partial``, ``error: ...``; for an alert,
            the rule.
        id: This record's id.
        options: How the action ran (replay: ``limit``, ``rate``, ``canary``, ``canary_wait``,
            ``to``; edit: ``to``; export: ``output``), by the CLI's option names with
            underscores.
        first_failures: For each fingerprint concerned, the earliest
            ``x-qworker-first-failure-at`` among the messages acted on (ISO 8601): what
            MTTD and MTTR are measured from (:mod:`qworker.dlq.mttr`).
        source: Where the messages came from when not a DLQ (``replay --from-file``: the file).
        came_back: Replay ids found on the dead letters acted on (they came back to the DLQ
            after that replay), each with the earliest failure time seen (ISO 8601).
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
    options: dict[str, Any] = field(default_factory=dict)
    first_failures: dict[str, str] = field(default_factory=dict)
    source: str | None = None
    came_back: dict[str, str] = field(default_factory=dict)

    @property
    def when(self) -> datetime | None:
        """``at`` as an aware datetime (None if unreadable)."""
        return _parse_time(self.at)

    def to_json(self) -> bytes:
        """The record as one JSON object (message ids capped, texts redacted)."""
        data = asdict(self)
        data["message_ids"] = [str(m) for m in self.message_ids[:MESSAGE_IDS_LIMIT]]
        data["fingerprints"] = [str(f) for f in self.fingerprints[:FINGERPRINTS_LIMIT]]
        data["outcome"] = redact(self.outcome)
        return json.dumps(data, separators=(",", ":"), default=str).encode("utf-8")

    @classmethod
    def from_json(cls, body: bytes) -> AuditRecord | None:
        """A record read back; None for anything that is not one.

        The stream is writable by any user with write permission: a record is never
        trusted further than its shape. Every field must have its type (strings,
        string lists, counts that are integers, a readable ``at``); texts are cut to
        :data:`TEXT_LIMIT`, lists to their limits; unknown fields are ignored.
        """
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None
        if not isinstance(data, Mapping):
            return None
        try:
            return cls._checked(data)
        except (TypeError, ValueError):
            return None

    @classmethod
    def _checked(cls, data: Mapping[str, Any]) -> AuditRecord | None:
        action = _text(data.get("action"))
        at = _text(data.get("at"))
        if not action or at is None or _parse_time(at) is None:
            return None
        record_id = _text(data.get("id"))
        counts = _mapping(data.get("counts"))
        if any(isinstance(v, bool) or not isinstance(v, int) for v in counts.values()):
            return None
        first_failures = _times(data.get("first_failures"))
        return cls(
            action=action,
            dlq=_optional_text(data.get("dlq")),
            actor=_text(data.get("actor")) or "unknown",
            at=at,
            filter=_scalars(data.get("filter")),
            counts={_cut(k): v for k, v in counts.items()},
            message_ids=_texts(data.get("message_ids"), MESSAGE_IDS_LIMIT),
            replay_id=_optional_text(data.get("replay_id")),
            fingerprints=_texts(data.get("fingerprints"), FINGERPRINTS_LIMIT),
            outcome=_text(data.get("outcome")) or "",
            id=record_id or uuid.uuid4().hex,
            options=_scalars(data.get("options")),
            first_failures=first_failures,
            source=_optional_text(data.get("source")),
            came_back=_times(data.get("came_back")),
        )


def _cut(value: str) -> str:
    return value[:TEXT_LIMIT]


def _text(value: Any) -> str | None:
    return _cut(value) if isinstance(value, str) else None


def _optional_text(value: Any) -> str | None:
    if value is None:
        return None
    text = _text(value)
    if text is None:
        raise TypeError("not a string")
    return text


def _mapping(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError("not an object")
    return dict(value)


def _scalars(value: Any) -> dict[str, Any]:
    """An object of strings, numbers, booleans and nulls (anything nested is dropped)."""
    return {
        _cut(k): (_cut(v) if isinstance(v, str) else v)
        for k, v in _mapping(value).items()
        if v is None or isinstance(v, str | int | float | bool)
    }


def _times(value: Any) -> dict[str, str]:
    """An object of readable ISO 8601 times (other entries are dropped), capped."""
    items = list(_mapping(value).items())[:FINGERPRINTS_LIMIT]
    return {_cut(k): v for k, v in items if isinstance(v, str) and _parse_time(v) is not None}


def _texts(value: Any, limit: int) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError("not a list of strings")
    return [_cut(v) for v in value[:limit]]


def _parse_time(value: str) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(value[:64])
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


class AuditFailed(QworkerError):
    """The action was done, but its record could not be appended to the trail.

    ``result`` is what the action returned (its result stands: nothing is undone),
    ``record`` the record that is missing from the trail.
    """

    def __init__(self, record: AuditRecord, cause: BaseException, result: Any) -> None:
        text = " ".join(f"{type(cause).__name__}: {cause}".split())[:300]
        super().__init__(
            f"{record.action} done, but its audit record was not written to {STREAM} ({text})"
        )
        self.record = record
        self.result = result


async def append_quietly(connection: AbstractConnection, record: AuditRecord) -> bool:
    """Append the record of an action that failed midway, when the action's own error is
    what the caller raises; False if the record could not be appended either."""
    try:
        await append(connection, record)
    except Exception:
        return False
    return True


async def record_action(connection: AbstractConnection, record: AuditRecord, result: Any) -> None:
    """Append ``record`` after its action; raise :class:`AuditFailed` (carrying ``result``)
    when the broker does not take it."""
    try:
        await append(connection, record)
    except Exception as exc:
        raise AuditFailed(record, exc, result) from exc


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
    # A reader may lack the configure permission a declare needs: then the stream must exist.
    with contextlib.suppress(aiormq.exceptions.AMQPError):
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
