"""The UTC wall clock as ISO 8601 text, the date and time formatted once per second.

Every failure writes two timestamps (its ``x-qworker-*-failure-at`` headers and its log
line); ``datetime.now(UTC).isoformat()`` costs more than the rest of either. The clock is
read as :meth:`datetime.datetime.now` reads it (nanoseconds, floored to microseconds), so
the text is the same as theirs.
"""

from __future__ import annotations

import time

#: (second, its ``YYYY-MM-DDTHH:MM:SS``), read and replaced as one tuple: handlers running in
#: threads log too, and a second read apart from its prefix could be a second off.
_formatted: tuple[int, str] = (-1, "")


def utc_now() -> tuple[str, int]:
    """Now in UTC: ``YYYY-MM-DDTHH:MM:SS`` and the microseconds."""
    global _formatted
    second, nanoseconds = divmod(time.time_ns(), 1_000_000_000)
    formatted_second, prefix = _formatted
    if second != formatted_second:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _formatted = (second, prefix)
    return prefix, nanoseconds // 1000


def iso_milliseconds() -> str:
    """``datetime.now(UTC).isoformat(timespec="milliseconds")``: ``...T10:00:00.123+00:00``."""
    prefix, microseconds = utc_now()
    return f"{prefix}.{microseconds // 1000:03d}+00:00"


def iso_z() -> str:
    """``datetime.now(UTC).isoformat()`` with ``Z`` for ``+00:00``, as structlog's
    ``TimeStamper(fmt="iso", utc=True)`` writes it (no fraction when it is zero)."""
    prefix, microseconds = utc_now()
    return f"{prefix}.{microseconds:06d}Z" if microseconds else f"{prefix}Z"
