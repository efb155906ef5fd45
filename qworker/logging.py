"""structlog setup: console on a terminal, JSON lines otherwise, secrets redacted.

Per-message success events are logged at DEBUG, so that with the default INFO
level they cost one level comparison and nothing else.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, MutableMapping
from typing import Any, Literal

import structlog

from qworker.clock import iso_z
from qworker.redact import redact

LogFormat = Literal["json", "console"]


# Values qworker writes itself that cannot hold a secret, or that were redacted already
# (error messages pass through redaction when they are captured).
_ALREADY_SAFE = frozenset(
    # ``reason`` is not here: it also carries a broker's close text (channel.closed).
    # ``stack_trace`` and ``error_message`` were redacted when captured (qworker.failures);
    # ``fingerprint`` is hex and ``error_code`` a checked name.
    {
        "event",
        "level",
        "timestamp",
        "classification",
        "error_type",
        "error_message",
        "stack_trace",
        "fingerprint",
        "error_code",
        "trace_id",
        "span_id",
    }
)


def redact_values(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A structlog processor that masks secrets in every string value."""
    for key, value in event_dict.items():
        if isinstance(value, str) and key not in _ALREADY_SAFE:
            event_dict[key] = redact(value)
    return event_dict


#: Where :func:`add_trace_ids` reads the active span's ids; None until tracing is on in
#: this process (set by :func:`qworker.tracing.resolve`), so that without tracing the
#: processor is one global read and no OpenTelemetry call.
_trace_ids: Callable[[], tuple[str, str] | None] | None = None


def trace_ids_from(source: Callable[[], tuple[str, str] | None]) -> None:
    """Let :func:`add_trace_ids` read (trace id, span id) from ``source`` from now on.

    Args:
        source: Returns the active span's ids as hex, or None without an active span.
    """
    global _trace_ids
    _trace_ids = source


def add_trace_ids(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A structlog processor adding ``trace_id`` and ``span_id`` while a span is active
    (OpenTelemetry's hex forms, so that log lines and traces join)."""
    source = _trace_ids
    if source is not None and "trace_id" not in event_dict and (ids := source()) is not None:
        event_dict["trace_id"], event_dict["span_id"] = ids
    return event_dict


def add_timestamp(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """``timestamp`` as structlog's ``TimeStamper(fmt="iso", utc=True)`` writes it
    (``2026-11-29T10:00:00.123456Z``), at a fraction of its cost (see :mod:`qworker.clock`)."""
    event_dict["timestamp"] = iso_z()
    return event_dict


_encoders: dict[Callable[[Any], Any], json.JSONEncoder] = {}


def _dumps(obj: Any, *, default: Callable[[Any], Any]) -> str:
    """``json.dumps(obj, default=default)`` with the encoder kept: ``json.dumps`` builds a
    new ``JSONEncoder`` whenever it is given a keyword (structlog gives ``default``)."""
    encoder = _encoders.get(default)
    if encoder is None:
        encoder = _encoders[default] = json.JSONEncoder(default=default)
    return encoder.encode(obj)


def configure_logging(log_format: LogFormat | None = None, level: str = "INFO") -> None:
    """Configure structlog for a worker process (idempotent)."""
    if log_format is None:
        log_format = "console" if sys.stdout.isatty() else "json"
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_dumps)
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    )
    # aio-pika and aiormq log connection losses with tracebacks on the stdlib root logger;
    # the worker reports them itself (worker.connection_lost), once and without a traceback.
    for name in ("aiormq", "aio_pika"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            add_timestamp,
            structlog.processors.format_exc_info,
            add_trace_ids,
            redact_values,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        # One write per line (message and newline together), so that the lines of several
        # processes sharing stdout (the supervisor and its children) never interleave.
        logger_factory=structlog.WriteLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )
