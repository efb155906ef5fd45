"""How dead-letter data is shown: text escaped, times in UTC, links only for http(s),
bodies as JSON, text or hex, the failure history as a timeline. Pure functions, no I/O.

Dead letters are producer-controlled. The text helpers here return plain ``str`` (never
``Markup``), which the templates' autoescaping then escapes; on top of that they escape
control and invisible format characters (bidi overrides, zero-width) with
:func:`qworker.redact.escape_control`, so a name cannot disguise itself.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlsplit

from qworker import headers as h
from qworker.dlq import DeadLetter
from qworker.dlq.jsonl import jsonable
from qworker.dlq.records import parse_time
from qworker.redact import escape_control

#: Bytes of a body shown (pretty-printed, as text or as hex); the export has all of it.
BODY_SHOWN = 256 * 1024
HEX_SHOWN = 16 * 1024
#: Characters of a header value shown in the headers table.
HEADER_SHOWN = 16 * 1024


# Text: each returns a plain str, which autoescaping then escapes.


def shown(value: object) -> str:
    """One line of producer-controlled text: control and format characters escaped."""
    if value is None:
        return ""
    return escape_control(value if isinstance(value, str) else str(value))


def shown_block(value: object) -> str:
    """Multi-line producer-controlled text (tracebacks, bodies): newlines kept."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else str(value)
    return escape_control(text.replace("\r\n", "\n"), keep_newlines=True)


def segment(value: object) -> str:
    """``value`` as one percent-encoded URL path segment (a queue name, a message id)."""
    return quote(str(value).encode("utf-8", "surrogateescape"), safe="")


def when(value: datetime | None) -> str:
    """A time in UTC, ISO 8601 to the second (``2024-05-01T01:12:09Z``); ``-`` for none."""
    if value is None:
        return "-"
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def http_url(value: object) -> str | None:
    """``value`` when it is an absolute http(s) URL fit for a link; None for anything else
    (``javascript:``, ``data:``, relative links, control characters, over 2 KiB)."""
    if not isinstance(value, str) or len(value) > 2048 or escape_control(value) != value:
        return None
    if any(c.isspace() for c in value):
        return None
    try:
        parts = urlsplit(value)
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        return None
    return value


def timestamp(value: datetime | None) -> float:
    return value.timestamp() if value is not None else -math.inf


def ago(value: datetime | None) -> str:
    """How long before now, roughly (``3m``, ``2h05m``, ``4d``)."""
    if value is None:
        return ""
    seconds = max(0, int((datetime.now(UTC) - value).total_seconds()))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d"


def listed(dl: DeadLetter) -> dict[str, Any]:
    """One row of a group's message list."""
    return {
        "id": dl.message_id,
        "failed_at": dl.failed_at,
        "reason": dl.reason,
        "attempt": dl.attempt,
        "replay_count": dl.replay_count,
        "error": dl.summary_line(),
        "body": preview(dl.body),
    }


def preview(body: bytes, limit: int = 80) -> str:
    try:
        text = body[: limit * 4].decode("utf-8")
    except UnicodeDecodeError:
        return f"({len(body)} bytes, binary)"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def value_text(value: Any) -> str:
    """A property or header value as text: strings as they are, the rest as JSON."""
    plain = jsonable(value)
    if isinstance(plain, str):
        text = plain
    else:
        text = json.dumps(plain, ensure_ascii=False, indent=1, default=str)
    if len(text) > HEADER_SHOWN:
        text = text[:HEADER_SHOWN] + f"\u2026 ({len(text) - HEADER_SHOWN} more characters)"
    return text


@dataclass(frozen=True, slots=True)
class Moment:
    """One entry of a message's failure timeline; ``at`` is None when unreadable."""

    at: datetime | None
    kind: str  # "failure", "last" (dead-lettered), "replayed"
    title: str
    detail: str


#: Same instant: the attempt fails, then the message is dead-lettered, then replayed.
_KIND_ORDER = {"failure": 0, "last": 1, "replayed": 2}


def timeline(headers: Mapping[str, Any], dl: DeadLetter) -> list[Moment]:
    """The failure history (``x-qworker-history``), the last replay and the dead-lettering,
    oldest first (entries without a readable time first). The broker's own history is
    apart (:func:`deaths`): it records whole seconds, too coarse to interleave."""
    moments: list[Moment] = []
    for failure in h.read_history(headers):
        moments.append(
            Moment(
                parse_time(failure.at),
                "failure",
                f"attempt {failure.attempt} failed: {failure.error_type or '-'}",
                failure.error_message,
            )
        )
    if replayed := h.read_time(headers, h.REPLAYED_AT):
        count = h.read_int(headers, h.REPLAY_COUNT)
        replay_id = h.read_str(headers, h.REPLAY_ID) or ""
        moments.append(
            Moment(
                parse_time(replayed),
                "replayed",
                f"replayed (replay number {count})",
                f"replay id {replay_id}" if replay_id else "",
            )
        )
    if dl.failed_at is not None and not dl.from_broker:
        moments.append(
            Moment(
                dl.failed_at,
                "last",
                f"dead-lettered: {dl.reason}",
                f"{dl.error_type or '-'} after {dl.attempt} attempt(s)",
            )
        )
    return sorted(
        moments,
        key=lambda m: (m.at is not None, timestamp(m.at), _KIND_ORDER.get(m.kind, 9)),
    )


@dataclass(frozen=True, slots=True)
class Death:
    """One entry of the broker's dead-letter history of a message."""

    queue: str
    reason: str
    count: int
    last: datetime | None
    exchange: str


def deaths(headers: Mapping[str, Any]) -> list[Death]:
    """The broker's history (``x-qworker-deaths`` merged with ``x-death``), newest first."""
    found = []
    for entry in h.read_deaths(headers):
        count = entry.get("count", 1)
        exchange = entry.get("exchange", "")
        found.append(
            Death(
                str(entry.get("queue", "")),
                str(entry.get("reason", "")),
                count if isinstance(count, int) else 1,
                parse_time(entry.get("time")),
                exchange if isinstance(exchange, str) else "",
            )
        )
    return found


def when_precise(value: datetime | None) -> str:
    """A time in UTC, ISO 8601 with milliseconds when it has them; ``-`` for none."""
    if value is None:
        return "-"
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    value = value.astimezone(UTC)
    if value.microsecond:
        return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class BodyView:
    """A body as shown: pretty JSON, UTF-8 text, or a hex dump; and whether it can be edited."""

    kind: str  # "json", "text", "binary"
    size: int
    text: str  # pretty JSON or the text; for a binary body its lenient UTF-8 reading
    hex: str
    editable: str | None  # the body as text for the edit box; None when it is not UTF-8
    cut: bool


def body_view(body: bytes, content_type: object = None) -> BodyView:
    """How a body is shown: JSON pretty-printed, else UTF-8 text, else hex (with a text column)."""
    head = body[:BODY_SHOWN]
    cut = len(body) > BODY_SHOWN
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return BodyView(
            "binary",
            len(body),
            head.decode("utf-8", "replace"),
            hexdump(body[:HEX_SHOWN]),
            None,
            len(body) > HEX_SHOWN,
        )
    try:
        parsed = json.loads(text) if text.strip() else None
    except (ValueError, RecursionError):
        parsed = None
    if parsed is not None and not cut:
        pretty = json.dumps(parsed, ensure_ascii=False, indent=2)
        return BodyView("json", len(body), pretty, "", text, False)
    return BodyView("text", len(body), text[:BODY_SHOWN], "", text, cut)


def hexdump(data: bytes) -> str:
    """``00000000  7b 22 6e ...  |{"n...|``, 16 bytes a line."""
    lines = []
    for start in range(0, len(data), 16):
        chunk = data[start : start + 16]
        hexes = " ".join(f"{b:02x}" for b in chunk)
        text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in chunk)
        lines.append(f"{start:08x}  {hexes:<47}  |{text}|")
    return "\n".join(lines)
