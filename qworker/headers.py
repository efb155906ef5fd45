"""The ``x-qworker-*`` headers: names, reading them safely, writing them capped.

Pure functions. Headers arrive from producers and are untrusted: every reader
here accepts any value of any type and falls back to a safe default, and every
writer drops foreign ``x-qworker-*`` keys so that a forged header can neither
grow a message without bound nor survive into a dead letter as if it were ours.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from qworker.failures import (
    HISTORY_MESSAGE_LIMIT,
    MESSAGE_LIMIT,
    TRACEBACK_LIMIT,
    ErrorInfo,
    Failure,
    now_iso,
    truncate,
)

PREFIX = "x-qworker-"
ATTEMPT = "x-qworker-attempt"
FIRST_FAILURE_AT = "x-qworker-first-failure-at"
LAST_FAILURE_AT = "x-qworker-last-failure-at"
ERROR_TYPE = "x-qworker-error-type"
ERROR_MESSAGE = "x-qworker-error-message"
ERROR_TRACEBACK = "x-qworker-error-traceback"
CLASSIFICATION = "x-qworker-classification"
REASON = "x-qworker-reason"
QUEUE = "x-qworker-queue"
HANDLER = "x-qworker-handler"
ORIGINAL_EXCHANGE = "x-qworker-original-exchange"
ORIGINAL_ROUTING_KEY = "x-qworker-original-routing-key"
WORKER = "x-qworker-worker"
HISTORY = "x-qworker-history"
REPLAY_COUNT = "x-qworker-replay-count"
REPLAYED_AT = "x-qworker-replayed-at"
REPLAY_ID = "x-qworker-replay-id"
RUNBOOK = "x-qworker-runbook"
DROPPED_HEADERS = "x-qworker-dropped-headers"
#: Deliveries of this message that ended without an outcome (the worker died running it).
CRASHES = "x-qworker-crashes"
FINGERPRINT = "x-qworker-fingerprint"
ERROR_CODE = "x-qworker-error-code"
#: The broker's dead-letter history (``x-death``), merged by (queue, reason), readable for
#: people and inert for the broker (see ``BROKER_HEADERS``).
DEATHS = "x-qworker-deaths"
#: The trace id (32 lowercase hex) of the attempt that wrote the copy, when it was traced.
TRACE_ID = "x-qworker-trace-id"
#: The span of the attempt that wrote the copy, in W3C ``traceparent`` form
#: (``00-<trace id>-<span id>-<flags>``): the next attempt's span links to it, and so does a
#: replay's. Kept through quarantine and replay (see :mod:`qworker.tracing`).
PREVIOUS_SPAN = "x-qworker-previous-span"
#: W3C trace context, written by a traced publish (user headers: copies keep them as they are).
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
#: A ``traceparent`` at most this long (55 characters in version 00) is never dropped to fit
#: a copy into the frame: it is what keeps a failure in its trace.
_TRACEPARENT_KEPT = 64

#: Failure headers that replay resets.
FAILURE_HEADERS = frozenset(
    {
        ATTEMPT,
        FIRST_FAILURE_AT,
        LAST_FAILURE_AT,
        ERROR_TYPE,
        ERROR_MESSAGE,
        ERROR_TRACEBACK,
        CLASSIFICATION,
        REASON,
        WORKER,
        HISTORY,
        FINGERPRINT,
        ERROR_CODE,
        RUNBOOK,
        CRASHES,
        TRACE_ID,
    }
)

#: Every header qworker writes.
NAMES = FAILURE_HEADERS | {
    DEATHS,
    DROPPED_HEADERS,
    QUEUE,
    HANDLER,
    ORIGINAL_EXCHANGE,
    ORIGINAL_ROUTING_KEY,
    REPLAY_COUNT,
    REPLAYED_AT,
    REPLAY_ID,
    PREVIOUS_SPAN,
}

HISTORY_LENGTH = 10
NAME_LIMIT = 255
TOTAL_LIMIT = 64 * 1024
#: Forged attempt counts are clamped to this; far above any sane max_attempts.
ATTEMPT_LIMIT = 1_000_000
_MAX_DEPTH = 32


# Readers: any input, safe output.


def read_int(headers: Mapping[str, Any] | None, name: str) -> int:
    """A non-negative int header, clamped to ``ATTEMPT_LIMIT``; 0 when absent or garbage."""
    value = (headers or {}).get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        return 0
    return min(max(value, 0), ATTEMPT_LIMIT)


def read_attempt(headers: Mapping[str, Any] | None) -> int:
    """Failed attempts so far (``x-qworker-attempt``), sanitised."""
    return read_int(headers, ATTEMPT)


def read_str(headers: Mapping[str, Any] | None, name: str, limit: int = NAME_LIMIT) -> str | None:
    """A string header (bytes decoded leniently), capped; None when absent or not text."""
    value = (headers or {}).get(name)
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    return truncate(value, limit)


def read_time(headers: Mapping[str, Any] | None, name: str) -> str | None:
    """An ISO 8601 UTC timestamp header as written; None when absent, garbage or not UTC."""
    value = read_str(headers, name, 64)
    try:
        parsed = datetime.fromisoformat(value) if value else None
    except ValueError:
        return None
    if parsed is None or parsed.utcoffset() != timedelta(0):
        return None
    return value


_HEX_TRACE_ID = re.compile(r"[0-9a-f]{32}")
_SPAN_REF = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def read_trace_id(headers: Mapping[str, Any] | None) -> str | None:
    """``x-qworker-trace-id`` when it is a W3C trace id (32 lowercase hex, not all zero)."""
    value = read_str(headers, TRACE_ID, 64)
    if value is None or not _HEX_TRACE_ID.fullmatch(value) or not int(value, 16):
        return None
    return value


def read_span_ref(headers: Mapping[str, Any] | None, name: str) -> tuple[int, int, int] | None:
    """A span written in ``traceparent`` form (version 00) as (trace id, span id, flags);
    None when absent, malformed, of another version, or with an all-zero id."""
    value = read_str(headers, name, 64)
    found = _SPAN_REF.fullmatch(value) if value is not None else None
    if found is None:
        return None
    trace_id, span_id, flags = (int(part, 16) for part in found.groups())
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, flags


def span_ref(trace_id: int, span_id: int, flags: int) -> str:
    """A span in ``traceparent`` form, as :func:`read_span_ref` reads it."""
    return f"00-{trace_id:032x}-{span_id:016x}-{flags:02x}"


def read_history(headers: Mapping[str, Any] | None) -> list[Failure]:
    """The failure history, keeping only well-formed entries (at most the last 10)."""
    raw = (headers or {}).get(HISTORY)
    if not isinstance(raw, list | tuple):
        return []
    history: list[Failure] = []
    for entry in list(raw)[-HISTORY_LENGTH:]:
        if not isinstance(entry, Mapping):
            continue
        history.append(
            Failure(
                attempt=read_int(entry, "attempt"),
                at=read_time(entry, "at") or "",
                error_type=read_str(entry, "error_type") or "",
                error_message=read_str(entry, "error_message", HISTORY_MESSAGE_LIMIT) or "",
            )
        )
    return history


def foreign_removed(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of ``headers`` for a copy of the message: user headers kept as they were.

    Dropped: every ``x-qworker-*`` key (rewritten from sanitised values by the caller),
    the broker's death headers (kept readable in ``x-qworker-deaths``, see
    :func:`read_deaths`), and the broker's delivery counters (``x-delivery-count``, 4.3's
    ``x-acquired-count``), which describe the original's deliveries, not the copy's.

    Values are kept as decoded: :mod:`qworker.wire` decodes every field to a value that
    remembers its AMQP type, so the copy carries the same types and bytes.
    """
    return {
        k: v
        for k, v in (headers or {}).items()
        if not k.startswith(PREFIX) and k not in BROKER_HEADERS
    }


#: Headers the broker writes and acts on. Copies must not carry them as such: RabbitMQ
#: 3.10-3.13 treats a dead-lettering whose ``x-death`` already names the target queue as
#: a cycle (``rabbit_dead_letter:detect_cycles``, any reason but ``rejected``) and, with
#: at-least-once dead-lettering, keeps the message in the source's dead-letter buffer for
#: ever: a replayed ``delivery_limit`` dead letter that fails once would never come back
#: from its retry tier. 3.10's at-least-once dead-letter worker also crashes on a
#: malformed ``x-death``. RabbitMQ 4.x ignores a client's ``x-death`` and rewrites it.
BROKER_HEADERS = frozenset(
    {
        "x-death",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-first-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
        "x-last-death-exchange",
        "x-delivery-count",
        "x-acquired-count",
    }
)
DEATHS_LENGTH = 10
_DEATH_FIELDS: dict[str, type | tuple[type, ...]] = {
    "count": int,
    "reason": str,
    "queue": str,
    "exchange": str,
    "routing-keys": list,
    "time": datetime,
    "original-expiration": str,
}


def _sane_death(entry: Any) -> bool:
    """True when one death entry has the shape RabbitMQ writes."""
    if not isinstance(entry, Mapping):
        return False
    for field, kind in _DEATH_FIELDS.items():
        if field in entry and (
            not isinstance(entry[field], kind) or isinstance(entry[field], bool)
        ):
            return False
    keys = entry.get("routing-keys", [])
    return all(isinstance(key, str) for key in keys)


def read_deaths(headers: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The dead-letter history of a delivery: ``x-qworker-deaths`` merged with the broker's
    current ``x-death``, one entry per (queue, reason) with summed counts, newest first,
    well-formed entries only, at most ``DEATHS_LENGTH``."""
    headers = headers or {}
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for source in (headers.get("x-death"), headers.get(DEATHS)):
        if not isinstance(source, list | tuple):
            continue
        for entry in source:
            if not _sane_death(entry) or not isinstance(entry.get("queue"), str):
                continue
            key = (truncate(entry["queue"], NAME_LIMIT), str(entry.get("reason", ""))[:32])
            count = entry.get("count", 1) if isinstance(entry.get("count"), int) else 1
            if key in merged:
                merged[key]["count"] = min(merged[key]["count"] + count, ATTEMPT_LIMIT)
                continue
            kept = {"queue": key[0], "reason": key[1], "count": min(count, ATTEMPT_LIMIT)}
            for field in ("time", "exchange"):
                if field in entry:
                    value = entry[field]
                    kept[field] = truncate(value, NAME_LIMIT) if isinstance(value, str) else value
            merged[key] = kept
    return list(merged.values())[:DEATHS_LENGTH]


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a delivery came from and who handles it."""

    queue: str
    handler: str
    exchange: str
    routing_key: str
    worker: str


def failure_headers(
    incoming: Mapping[str, Any] | None,
    *,
    error: ErrorInfo,
    attempt: int,
    classification: str,
    origin: Origin,
    reason: str | None = None,
    at: str | None = None,
    runbook: str | None = None,
    trace: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The headers of the copy published after failed attempt number ``attempt``.

    User headers are kept (a W3C ``traceparent`` among them: every attempt stays in the
    producer's trace); all ``x-qworker-*`` headers are rewritten from sanitised values,
    and together stay under ``TOTAL_LIMIT`` bytes.

    Args:
        incoming: The delivery's headers, as received (untrusted).
        error: The failure, captured (redacted, capped).
        attempt: The number of the failed attempt.
        classification: ``transient`` or ``permanent``.
        origin: Where the delivery came from and who handled it.
        reason: The dead-letter reason (dead letters only).
        at: The failure time (ISO 8601); now when None.
        runbook: The failure's runbook link, if any.
        trace: ``x-qworker-trace-id`` and ``x-qworker-previous-span`` of the traced attempt
            (from :meth:`qworker.tracing.ConsumerSpan.copy_headers`); None when not traced.
    """
    at = at or now_iso()
    history = read_history(incoming)
    error_type = truncate(error.error_type, NAME_LIMIT)
    history.append(Failure(attempt, at, error_type, truncate(error.message, HISTORY_MESSAGE_LIMIT)))
    ours: dict[str, Any] = {
        ATTEMPT: attempt,
        FIRST_FAILURE_AT: read_time(incoming, FIRST_FAILURE_AT) or at,
        LAST_FAILURE_AT: at,
        ERROR_TYPE: error_type,
        ERROR_MESSAGE: truncate(error.message, MESSAGE_LIMIT),
        ERROR_TRACEBACK: truncate(error.traceback, TRACEBACK_LIMIT, keep_tail=True),
        CLASSIFICATION: classification,
        QUEUE: truncate(origin.queue, NAME_LIMIT),
        HANDLER: truncate(origin.handler, NAME_LIMIT),
        ORIGINAL_EXCHANGE: _kept(incoming, ORIGINAL_EXCHANGE, origin.exchange),
        ORIGINAL_ROUTING_KEY: _kept(incoming, ORIGINAL_ROUTING_KEY, origin.routing_key),
        WORKER: truncate(origin.worker, NAME_LIMIT),
        HISTORY: [f.to_header() for f in history[-HISTORY_LENGTH:]],
    }
    if reason is not None:
        ours[REASON] = reason
    if error.fingerprint:
        ours[FINGERPRINT] = error.fingerprint
    if error.code is not None:
        ours[ERROR_CODE] = error.code
    if runbook is not None:
        ours[RUNBOOK] = truncate(runbook, NAME_LIMIT * 4)
    if deaths := read_deaths(incoming):
        ours[DEATHS] = deaths
    if trace:
        ours.update(trace)
    replays = read_int(incoming, REPLAY_COUNT)
    if replays:
        ours[REPLAY_COUNT] = replays
    if replays and (replayed_at := read_time(incoming, REPLAYED_AT)):
        ours[REPLAYED_AT] = replayed_at
    if replays and (replay_id := read_str(incoming, REPLAY_ID, 64)):
        ours[REPLAY_ID] = replay_id
    _fit(ours)
    return {**foreign_removed(incoming), **ours}


def replay_headers(
    incoming: Mapping[str, Any] | None, *, at: str | None = None, replay_id: str | None = None
) -> dict[str, Any]:
    """The headers of a replayed dead letter: failure context reset, replay counted.

    Origin headers (queue, handler, original exchange and routing key) are kept,
    sanitised, so that a later failure still records where the message began, and so is
    ``x-qworker-previous-span`` (well formed only), so that the replayed attempt's span
    links to the attempt that died. ``replay_id`` (the audit trail's id of the replay) is
    written to ``x-qworker-replay-id`` and kept through later failures, so that a replayed
    message that dies again is known.
    """
    kept: dict[str, Any] = {
        name: value
        for name in (QUEUE, HANDLER, ORIGINAL_EXCHANGE, ORIGINAL_ROUTING_KEY)
        if (value := read_str(incoming, name)) is not None
    }
    if deaths := read_deaths(incoming):
        kept[DEATHS] = deaths
    if (previous := read_span_ref(incoming, PREVIOUS_SPAN)) is not None:
        kept[PREVIOUS_SPAN] = span_ref(*previous)
    return {
        **foreign_removed(incoming),
        **kept,
        REPLAY_COUNT: read_int(incoming, REPLAY_COUNT) + 1,
        REPLAYED_AT: at or now_iso(),
        **({REPLAY_ID: truncate(replay_id, 64)} if replay_id else {}),
    }


def _kept(incoming: Mapping[str, Any] | None, name: str, fallback: str) -> str:
    value = read_str(incoming, name)
    return truncate(fallback, NAME_LIMIT) if value is None else value


def encoded_size(value: Any) -> int:
    """An upper estimate of a header value's size on the wire, in bytes."""
    kind = type(value)  # the exact types qworker writes first: this runs for every failure
    if kind is str:
        return (len(value) if value.isascii() else len(value.encode("utf-8", "replace"))) + 5
    if kind is int:
        return 9
    if kind is dict:
        return sum(len(k) + 1 + encoded_size(v) for k, v in value.items()) + 5
    if kind is list:
        return sum(encoded_size(v) for v in value) + 5
    if isinstance(value, str):
        return len(value.encode("utf-8", "replace")) + 5
    if isinstance(value, bytes | bytearray | memoryview):
        return len(value) + 5
    if isinstance(value, Mapping):
        return sum(len(k) + 1 + encoded_size(v) for k, v in value.items()) + 5
    if isinstance(value, list | tuple):
        return sum(encoded_size(v) for v in value) + 5
    return 9


def table_size(headers: Mapping[str, Any]) -> int:
    """An upper estimate of a header table's size on the wire: its entries' sizes summed."""
    size = 0
    for k, v in headers.items():  # most values are ASCII text: counted inline
        size += len(k) + 1 + (len(v) + 5 if type(v) is str and v.isascii() else encoded_size(v))
    return size


def _fit(ours: dict[str, Any]) -> None:
    """Shrink the traceback, then the history, until all our headers fit ``TOTAL_LIMIT``."""

    def total() -> int:
        return table_size(ours)

    excess = total() - TOTAL_LIMIT
    if excess <= 0:
        return  # the common case: one pass
    tb = ours[ERROR_TRACEBACK]
    room = max(256, len(tb.encode("utf-8", "replace")) - excess)
    ours[ERROR_TRACEBACK] = truncate(tb, room, keep_tail=True)
    while total() > TOTAL_LIMIT and ours[HISTORY]:
        ours[HISTORY] = ours[HISTORY][1:]


#: What gives way, in this order, when a copy does not fit the connection's frame size:
#: the largest user headers first (whole), then qworker's longest texts (cut).
_SHRINKABLE = (ERROR_TRACEBACK, HISTORY, ERROR_MESSAGE)


def fit_frame(
    headers: dict[str, Any], size: Callable[[dict[str, Any]], int], budget: int
) -> dict[str, Any]:
    """``headers`` made small enough that ``size(headers) <= budget`` (the frame limit).

    AMQP sends a message's properties in one frame, so a copy whose headers outgrow the
    negotiated ``frame_max`` makes the broker close the connection (``frame_too_large``)
    and the copy can never be published. User headers give way first, largest first, and
    are named with their sizes in ``x-qworker-dropped-headers`` (a ``traceparent`` of normal
    size is kept: it costs 55 bytes and keeps the copy in its trace); then qworker's
    traceback, history and error message are cut. ``size`` is the exact encoded size (costly); it is
    only called when the cheap estimate says the headers may not fit.
    """
    if table_size(headers) <= budget // 2:
        return headers
    if size(headers) <= budget:
        return headers
    fitted = dict(headers)
    dropped: list[str] = []
    users = sorted(
        (
            k
            for k in fitted
            if not k.startswith(PREFIX)
            and not (k == TRACEPARENT and encoded_size(fitted[k]) <= _TRACEPARENT_KEPT)
        ),
        key=lambda k: encoded_size(fitted[k]),
        reverse=True,
    )
    for name in users:
        dropped.append(f"{name} ({encoded_size(fitted.pop(name))} bytes)")
        fitted[DROPPED_HEADERS] = dropped[-HISTORY_LENGTH:]
        if size(fitted) <= budget:
            return fitted
    for name in _SHRINKABLE:
        while (value := fitted.get(name)) and size(fitted) > budget:
            if isinstance(value, list):
                shorter: Any = value[1:]
            else:
                shorter = truncate(str(value), len(str(value).encode("utf-8", "replace")) // 2)
            if shorter == value:  # down to the truncation mark: nothing more to gain here
                break
            fitted[name] = shorter
    return fitted


def quarantine_headers(incoming: Mapping[str, Any] | None, crashes: int) -> dict[str, Any]:
    """The headers of a delivery moved to quarantine after ``crashes`` deliveries without an
    outcome: everything as it came (qworker's own context included), the crash count set."""
    kept = {
        k: v
        for k, v in (incoming or {}).items()
        if k not in BROKER_HEADERS and (not k.startswith(PREFIX) or k in NAMES)
    }
    if deaths := read_deaths(incoming):
        kept[DEATHS] = deaths
    kept[CRASHES] = min(max(crashes, 0), ATTEMPT_LIMIT)
    return kept
