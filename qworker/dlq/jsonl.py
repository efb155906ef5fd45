"""The export format: one JSON object per dead letter, one per line. Pure functions.

A record holds ``queue`` (the DLQ it was read from), ``properties``, ``headers``,
``body`` with ``body_encoding`` (``utf-8`` text when the body is valid UTF-8,
else ``base64``), and, for people and ``jq``, the derived ``message_id``,
``reason``, ``error_type``, ``failed_at``, ``fingerprint`` (the failure group),
``error_code``, ``runbook`` and ``trace_id`` (ignored when a record is read back: they are
derived from the headers again, so exports written before they existed read the
same). Datetimes become ISO 8601 strings and binary header values base64 text,
so header types are not kept exactly; bodies and properties are.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

import pydantic

from qworker.dlq.records import DeadLetter, dead_letter
from qworker.errors import BadRecord
from qworker.wire import RawTimestamp

_INT64 = 2**63
_MAX_DEPTH = 16


#: Types JSON takes as they are: most header values (checked by exact type first, because
#: ``jsonable`` runs for every value of every exported header table, ~28 per dead letter,
#: and the ``Mapping`` check below is an ABC check).
_AS_IS = frozenset({str, int, float, bool, type(None)})


def jsonable(value: Any) -> Any:
    """A header or property value as JSON: datetimes ISO, bytes UTF-8 or base64, Decimal text,
    a timestamp past year 9999 (:class:`qworker.wire.RawTimestamp`) as its integer seconds."""
    kind = type(value)
    if kind in _AS_IS:
        return value
    if kind is dict:
        return {str(k): jsonable(v) for k, v in value.items()}
    if kind is list:
        return [jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, RawTimestamp):
        return value.raw
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return base64.b64encode(value).decode("ascii")
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def body_fields(body: bytes) -> dict[str, str]:
    """``body`` as text when it is UTF-8, else as base64, with its ``body_encoding``."""
    try:
        return {"body": body.decode("utf-8"), "body_encoding": "utf-8"}
    except UnicodeDecodeError:
        return {"body": base64.b64encode(body).decode("ascii"), "body_encoding": "base64"}


def to_record(dl: DeadLetter) -> dict[str, Any]:
    """The JSON object of one dead letter."""
    return {
        "queue": dl.queue,
        "message_id": dl.message_id,
        "reason": dl.reason,
        "error_type": dl.error_type,
        "failed_at": dl.failed_at.isoformat() if dl.failed_at else None,
        "fingerprint": dl.fingerprint,
        "error_code": dl.error_code,
        "runbook": dl.runbook,
        "trace_id": dl.trace_id,
        "properties": jsonable(dl.properties),
        "headers": jsonable(dl.headers),
        **body_fields(dl.body),
    }


def dumps(dl: DeadLetter) -> str:
    """One line of JSON (ASCII only, so control characters can never reach a terminal raw)."""
    return json.dumps(to_record(dl), ensure_ascii=True, separators=(",", ":"))


class _Properties(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    content_type: str | None = None
    content_encoding: str | None = None
    delivery_mode: int | None = pydantic.Field(default=None, ge=1, le=2)
    priority: int | None = pydantic.Field(default=None, ge=0, le=255)
    correlation_id: str | None = None
    reply_to: str | None = None
    expiration: str | None = None
    message_id: str | None = None
    timestamp: datetime | int | None = None
    """ISO 8601, or integer seconds for a timestamp no datetime can hold (past year 9999)."""
    type: str | None = None
    user_id: str | None = None
    app_id: str | None = None


class _Record(pydantic.BaseModel):
    queue: str = pydantic.Field(min_length=1)
    properties: _Properties = pydantic.Field(default_factory=_Properties)
    headers: dict[str, Any] = pydantic.Field(default_factory=dict)
    body: str
    body_encoding: Literal["utf-8", "base64"] = "utf-8"


def _header_problem(value: Any, depth: int = 0) -> str | None:
    """Why ``value`` cannot be sent as an AMQP header value; None when it can."""
    if depth > _MAX_DEPTH:
        return "headers nested too deeply"
    if isinstance(value, int) and not isinstance(value, bool) and not -_INT64 <= value < _INT64:
        return "header integer out of 64-bit range"
    if isinstance(value, float) and not math.isfinite(value):
        return "header number is not finite"
    if isinstance(value, dict):
        return next(
            (p for v in value.values() if (p := _header_problem(v, depth + 1)) is not None), None
        )
    if isinstance(value, list):
        return next((p for v in value if (p := _header_problem(v, depth + 1)) is not None), None)
    return None


def parse_line(line: str, where: str) -> DeadLetter:
    """Read one record; raises :class:`BadRecord` naming ``where`` (``file:line``)."""
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BadRecord(f"{where}: not JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(raw, dict):
        raise BadRecord(f"{where}: a record must be a JSON object, got {type(raw).__name__}")
    try:
        record = _Record.model_validate(raw)
    except pydantic.ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        field = ".".join(str(p) for p in first.get("loc", ())) or "record"
        raise BadRecord(f"{where}: {field}: {first.get('msg', 'invalid')}") from None
    problem = _header_problem(record.headers)
    if problem is not None:
        raise BadRecord(f"{where}: headers: {problem}")
    try:
        if record.body_encoding == "base64":
            body = base64.b64decode(record.body, validate=True)
        else:
            body = record.body.encode("utf-8")
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise BadRecord(f"{where}: body is not valid {record.body_encoding}: {exc}") from None
    properties = record.properties.model_dump(exclude_none=True)
    if isinstance(stamp := properties.get("timestamp"), int):
        try:
            properties["timestamp"] = RawTimestamp(stamp)
        except ValueError as exc:
            raise BadRecord(f"{where}: properties.timestamp: {exc}") from None
    return dead_letter(record.queue, body, properties, record.headers)


def read_records(
    lines: Iterable[str], name: str, check: Callable[[DeadLetter], str | None] | None = None
) -> Iterator[DeadLetter]:
    """Parse the records of file ``name`` lazily, skipping blank lines.

    ``check`` (e.g. :func:`qworker.dlq.send.unpublishable`) may name a problem
    with a parsed record; it is raised as :class:`BadRecord` ``file:line: problem``.
    """
    for number, line in enumerate(lines, 1):
        if line.strip():
            dl = parse_line(line.rstrip("\r\n"), f"{name}:{number}")
            problem = check(dl) if check is not None else None
            if problem is not None:
                raise BadRecord(f"{name}:{number}: {problem}")
            yield dl
