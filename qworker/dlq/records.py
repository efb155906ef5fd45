"""A dead letter as the DLQ tool sees it, read safely from a delivery. Pure functions, no I/O.

Everything here treats the message as untrusted: headers may be missing,
forged, of the wrong type or huge, and every reader falls back to a safe value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from qworker import classify, failures
from qworker import headers as h
from qworker.fingerprint import fingerprint, normalise, top_frame
from qworker.redact import escape_control
from qworker.topology import DLQ_SUFFIX

#: Reasons qworker writes, then the ``x-death`` reasons RabbitMQ writes.
QWORKER_REASONS: tuple[str, ...] = tuple(r.value for r in classify.QWORKER_REASONS)
BROKER_REASONS: tuple[str, ...] = tuple(r.value for r in classify.BROKER_REASONS)
KNOWN_REASONS = (*QWORKER_REASONS, *BROKER_REASONS)
UNKNOWN = "unknown"
#: Delivery metadata a quorum queue adds; not part of the message, dropped on replay.
DELIVERY_COUNT = "x-delivery-count"
_MAX_QUEUE_BYTES = 255
#: ``x-qworker-fingerprint`` as the worker writes it: 12 lowercase hex characters.
_FINGERPRINT = re.compile(r"[0-9a-f]{12}")
#: ``x-qworker-error-code`` as :func:`qworker.failures.error_code` accepts it.
ERROR_CODE = re.compile(rf"[A-Za-z0-9_.:-]{{1,{failures.CODE_LIMIT}}}")
#: ``x-qworker-runbook``: a link, capped like the worker caps it.
RUNBOOK_LIMIT = 4 * h.NAME_LIMIT

#: The AMQP basic properties kept by the tool, as (name, type) in wire order.
PROPERTY_TYPES: dict[str, type] = {
    "content_type": str,
    "content_encoding": str,
    "delivery_mode": int,
    "priority": int,
    "correlation_id": str,
    "reply_to": str,
    "expiration": str,
    "message_id": str,
    "timestamp": datetime,
    "type": str,
    "user_id": str,
    "app_id": str,
}


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One message of a DLQ with the facts the tool filters, groups and shows by.

    ``properties`` holds the AMQP properties that are set (see :data:`PROPERTY_TYPES`),
    ``headers`` the headers exactly as delivered. ``from_broker`` is true for a
    message RabbitMQ dead-lettered itself (``x-death`` only, no qworker failure
    headers); its ``reason`` then comes from ``x-death``.

    ``fingerprint`` is the failure group (12 hex characters): the worker's
    ``x-qworker-fingerprint`` when it is well formed, else computed from the failure
    headers with the worker's algorithm (:func:`qworker.fingerprint.of_failure`), so
    that older dead letters land in the same groups; for a broker dead letter it is
    computed from the broker's reason (see :func:`kind`). ``error_code``
    (``x-qworker-error-code``, only when it looks like a code) and ``runbook``
    (``x-qworker-runbook``) are read from qworker failure copies only: on a broker
    dead letter such headers can only come from the producer, and are ignored here.
    So is ``trace_id`` (``x-qworker-trace-id``, 32 hex: the trace of the attempt that
    dead-lettered it, when the worker traced it; see :mod:`qworker.tracing`).
    Every text is producer-controllable: print it through
    :func:`qworker.redact.escape_control`.
    """

    queue: str
    body: bytes
    properties: Mapping[str, Any]
    headers: Mapping[str, Any]
    message_id: str | None
    reason: str
    error_type: str | None
    error_message: str
    traceback: str
    handler: str | None
    attempt: int
    failed_at: datetime | None
    replay_count: int
    from_broker: bool
    death_queue: str | None
    fingerprint: str
    error_code: str | None
    runbook: str | None
    trace_id: str | None = None

    def summary_line(self) -> str:
        """The first line of the error message (or of the broker's reason), terminal-safe."""
        if self.from_broker:
            where = f" in {self.death_queue}" if self.death_queue else ""
            text = f"dead-lettered by RabbitMQ ({self.reason}{where})"
        else:
            text = self.error_message.split("\n", 1)[0]
        return escape_control(text)


def kind(dl: DeadLetter) -> tuple[str, str]:
    """What the failure of ``dl`` looks like: its normalised message and its top frame.

    For a broker dead letter, the normalised :meth:`DeadLetter.summary_line` and no frame.
    """
    if dl.from_broker:
        return normalise(dl.summary_line()), ""
    return normalise(dl.error_message), top_frame(dl.traceback)


def computed_fingerprint(dl: DeadLetter) -> str:
    """The fingerprint of ``dl`` computed from its headers, whatever its fingerprint header.

    The worker's algorithm (:func:`qworker.fingerprint.of_failure` on the error type,
    message and traceback as written to the headers); a dead letter without an error
    type counts as type ``-``.
    """
    pattern, frame = kind(dl)
    return fingerprint(dl.error_type or "-", pattern, frame)


def parse_time(value: Any) -> datetime | None:
    """A timezone-aware datetime from a datetime or an ISO 8601 string; None for anything else."""
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("utf-8", "replace")
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value[:64])
        except ValueError:
            return None
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _latest_death(headers: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The most recent ``x-death`` entry (RabbitMQ keeps it first), if well formed."""
    deaths = headers.get("x-death")
    if isinstance(deaths, list | tuple) and deaths and isinstance(deaths[0], Mapping):
        return deaths[0]
    return None


def _reason(headers: Mapping[str, Any], death: Mapping[str, Any] | None) -> str:
    reason = h.read_str(headers, h.REASON, 64)
    if reason in KNOWN_REASONS:
        return reason
    if death is not None and (broker := h.read_str(death, "reason", 64)) in BROKER_REASONS:
        return broker
    return UNKNOWN


def dead_letter(
    queue: str, body: bytes, properties: Mapping[str, Any], headers: Mapping[str, Any] | None
) -> DeadLetter:
    """Read a delivery of ``queue`` (properties without headers, then the headers)."""
    headers = headers or {}
    death = _latest_death(headers)
    error_type = h.read_str(headers, h.ERROR_TYPE)
    from_broker = error_type is None and h.REASON not in headers and death is not None
    failed_at = parse_time(headers.get(h.LAST_FAILURE_AT))
    if failed_at is None and death is not None:
        failed_at = parse_time(death.get("time"))
    if failed_at is None:
        failed_at = parse_time(properties.get("timestamp"))
    message_id = properties.get("message_id")
    written = None if from_broker else h.read_str(headers, h.FINGERPRINT, 64)
    code = None if from_broker else h.read_str(headers, h.ERROR_CODE, 64)
    dl = DeadLetter(
        queue=queue,
        body=body,
        properties=properties,
        headers=headers,
        message_id=message_id if isinstance(message_id, str) else None,
        reason=_reason(headers, death),
        error_type=error_type,
        error_message=h.read_str(headers, h.ERROR_MESSAGE, failures.MESSAGE_LIMIT) or "",
        traceback=h.read_str(headers, h.ERROR_TRACEBACK, failures.TRACEBACK_LIMIT) or "",
        handler=h.read_str(headers, h.HANDLER),
        attempt=h.read_attempt(headers),
        failed_at=failed_at,
        replay_count=h.read_int(headers, h.REPLAY_COUNT),
        from_broker=from_broker,
        death_queue=h.read_str(death, "queue") if death is not None else None,
        fingerprint=written if written is not None and _FINGERPRINT.fullmatch(written) else "",
        error_code=code if code is not None and ERROR_CODE.fullmatch(code) else None,
        runbook=None if from_broker else h.read_str(headers, h.RUNBOOK, RUNBOOK_LIMIT) or None,
        trace_id=None if from_broker else h.read_trace_id(headers),
    )
    if not dl.fingerprint:  # an older dead letter, a broker one, or a garbled header
        dl = replace(dl, fingerprint=computed_fingerprint(dl))
    return dl


def properties_of(raw: Any) -> dict[str, Any]:
    """The set properties of an AMQP ``Basic.Properties`` (pamqp calls ``type`` message_type)."""
    found: dict[str, Any] = {}
    for name in PROPERTY_TYPES:
        value = getattr(raw, "message_type" if name == "type" else name, None)
        if value is not None:
            found[name] = value
    return found


# Where a replay may go.


def queue_name_problem(name: str, dlq: str | None) -> str | None:
    """Why ``name`` cannot be a replay target (of ``dlq``); None when it is a plain queue name."""
    if not name:
        return "empty queue name"
    if len(name.encode("utf-8", "replace")) > _MAX_QUEUE_BYTES:
        return "queue name longer than 255 bytes"
    if name.startswith("amq."):
        return f"{name!r} is a reserved amq.* name"
    if escape_control(name) != name:
        return "queue name contains control characters"
    if name == dlq:
        return f"{name!r} is the DLQ itself"
    return None


@dataclass(frozen=True, slots=True)
class Destination:
    """Where a dead letter would be replayed to, or why it cannot be."""

    queue: str | None
    problem: str | None = None


def origin(dl: DeadLetter) -> Destination:
    """The queue a dead letter came from, decided by the DLQ's name before any header.

    For a DLQ named ``Q.dlq`` the origin is ``Q``: qworker and the broker's
    safety net only ever dead-letter ``Q``'s messages there. An ``x-qworker-queue``
    header naming anything else (or not a string) is forged or foreign, and the
    message is not routed by it. Only for a DLQ not named ``*.dlq`` is the header
    the origin, and then only if it is a plain queue name. The caller still has
    to check that the queue exists.
    """
    raw = dl.headers.get(h.QUEUE)
    named = h.read_str(dl.headers, h.QUEUE)
    if dl.queue.endswith(DLQ_SUFFIX) and len(dl.queue) > len(DLQ_SUFFIX):
        base = dl.queue[: -len(DLQ_SUFFIX)]
        if raw is None or named == base:
            return Destination(base)
        shown = escape_control(named[:60]) if named is not None else f"a {type(raw).__name__}"
        return Destination(
            None, f"x-qworker-queue is {shown!r}, not {base!r} (the queue of this DLQ)"
        )
    if named is None:
        return Destination(
            None, f"no origin: no x-qworker-queue header and {dl.queue!r} is not *.dlq"
        )
    problem = queue_name_problem(named, dl.queue)
    if problem is not None:
        return Destination(None, f"x-qworker-queue: {escape_control(problem[:120])}")
    return Destination(named)


def replay_properties(dl: DeadLetter, body: bytes | None = None) -> tuple[bytes, dict[str, Any]]:
    """The body and the properties (headers included) of the replayed copy of ``dl``.

    Failure headers are reset and the replay counted (:func:`qworker.headers.replay_headers`);
    ``message_id`` and ``correlation_id`` are kept. Dropped: ``expiration`` (a
    replayed message must not silently expire), ``user_id`` (the broker refuses
    a publish whose user_id is not the connection's user) and the quorum
    queue's ``x-delivery-count``. A message without a delivery mode is sent
    persistent. Binary header strings are sent as byte arrays (same octets).
    """
    incoming = {k: v for k, v in dl.headers.items() if k != DELIVERY_COUNT}
    properties = {k: v for k, v in dl.properties.items() if k not in ("expiration", "user_id")}
    properties.setdefault("delivery_mode", 2)
    properties["headers"] = h.replay_headers(incoming)
    return (dl.body if body is None else body), properties


def same_message(a: DeadLetter, b: DeadLetter) -> bool:
    """True when ``a`` and ``b`` are the same dead letter (id, body and failure time)."""
    return (
        a.message_id == b.message_id
        and a.body == b.body
        and a.failed_at == b.failed_at
        and a.replay_count == b.replay_count
    )
