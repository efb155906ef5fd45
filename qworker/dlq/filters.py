"""Which dead letters a DLQ command acts on: the filters, parsed and matched. Pure functions."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from qworker.dlq.records import ERROR_CODE, KNOWN_REASONS, UNKNOWN, DeadLetter, parse_time
from qworker.errors import FilterError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_RELATIVE = re.compile(r"(?:\d{1,9}[smhdw])+")
_PART = re.compile(r"(\d+)([smhdw])")
#: ``--fingerprint``: a prefix of a 12-character fingerprint, at least this long.
FINGERPRINT_PREFIX = 6
_FINGERPRINT_PREFIX = re.compile(rf"[0-9a-f]{{{FINGERPRINT_PREFIX},12}}")


def parse_when(text: str, now: datetime) -> datetime:
    """``2h``, ``30m``, ``1d12h`` (that long before ``now``) or ISO 8601 (UTC unless it says).

    Raises :class:`FilterError` for anything else.
    """
    text = text.strip()
    if _RELATIVE.fullmatch(text):
        seconds = sum(int(n) * _UNITS[unit] for n, unit in _PART.findall(text))
        return now - timedelta(seconds=seconds)
    when = parse_time(text)
    if when is None:
        raise FilterError(
            f"cannot read time {text!r}: use ISO 8601 (2024-05-01T12:00:00Z) "
            "or a duration ago such as 30m, 2h, 1d"
        )
    return when


#: The filter conditions by name: ``Filter``'s fields, the keyword arguments of
#: :meth:`Filter.parse`, the CLI's options (``--error-type``) and the console's keys.
NAMES = (
    "fingerprint",
    "error_code",
    "error_type",
    "reason",
    "handler",
    "message_id",
    "grep",
    "since",
    "until",
)


@dataclass(frozen=True, slots=True)
class Filter:
    """Conditions a dead letter must all meet; an unset condition matches everything.

    - ``error_type``: the fully qualified class or its trailing part
      (``KeyError`` matches ``builtins.KeyError``).
    - ``reason``: exact, one of :data:`qworker.dlq.records.KNOWN_REASONS` or ``unknown``.
    - ``handler``: ``module:function`` or just the function's name.
    - ``message_id``: exact.
    - ``grep``: a case-sensitive substring of the body (read as UTF-8) or of the error message.
    - ``since``/``until``: the failure time (``x-qworker-last-failure-at``, else the
      ``x-death`` time, else the message timestamp) lies in ``[since, until]``;
      a message without any time never matches a time filter.
    - ``fingerprint``: a prefix (6 to 12 hex characters, any case) of the failure
      group's fingerprint (:attr:`DeadLetter.fingerprint`: ``x-qworker-fingerprint``,
      or computed the same way), as ``qworker dlq stats`` shows it.
    - ``error_code``: exact (``x-qworker-error-code``, case-sensitive).
    """

    error_type: str | None = None
    reason: str | None = None
    handler: str | None = None
    message_id: str | None = None
    grep: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    fingerprint: str | None = None
    error_code: str | None = None

    @classmethod
    def parse(
        cls,
        *,
        error_type: str | None = None,
        reason: str | None = None,
        handler: str | None = None,
        message_id: str | None = None,
        grep: str | None = None,
        since: str | None = None,
        until: str | None = None,
        fingerprint: str | None = None,
        error_code: str | None = None,
        now: datetime | None = None,
    ) -> Filter:
        """Build a filter from command-line text; raises :class:`FilterError` on a bad value."""
        now = now or datetime.now(UTC)
        for name, value in (
            ("--error-type", error_type),
            ("--handler", handler),
            ("--message-id", message_id),
            ("--grep", grep),
            ("--error-code", error_code),
        ):
            if value is not None and not value:
                raise FilterError(f"{name} needs a non-empty value")
        if reason is not None and reason not in (*KNOWN_REASONS, UNKNOWN):
            raise FilterError(
                f"unknown reason {reason!r}; one of: {', '.join((*KNOWN_REASONS, UNKNOWN))}"
            )
        if error_code is not None and not ERROR_CODE.fullmatch(error_code):
            raise FilterError(
                f"--error-code {error_code[:80]!r} cannot match: error codes are 1 to 64 "
                "letters, digits and _.:-"
            )
        start = parse_when(since, now) if since is not None else None
        end = parse_when(until, now) if until is not None else None
        if start is not None and end is not None and start > end:
            raise FilterError("--since is later than --until: nothing can match")
        return cls(
            error_type,
            reason,
            handler,
            message_id,
            grep,
            start,
            end,
            parse_fingerprint(fingerprint) if fingerprint is not None else None,
            error_code,
        )

    @property
    def empty(self) -> bool:
        """True when the filter selects every message."""
        return self == Filter()

    def matches(self, dl: DeadLetter) -> bool:
        """True when ``dl`` meets every condition that is set."""
        if self.reason is not None and dl.reason != self.reason:
            return False
        if self.message_id is not None and dl.message_id != self.message_id:
            return False
        if self.fingerprint is not None and not dl.fingerprint.startswith(self.fingerprint):
            return False
        if self.error_code is not None and dl.error_code != self.error_code:
            return False
        if self.error_type is not None and not _dotted_match(dl.error_type, self.error_type, "."):
            return False
        if self.handler is not None and not _dotted_match(dl.handler, self.handler, ":"):
            return False
        if (self.since is not None or self.until is not None) and not self._in_window(dl):
            return False
        return self.grep is None or (
            self.grep in dl.error_message or self.grep in dl.body.decode("utf-8", "replace")
        )

    def _in_window(self, dl: DeadLetter) -> bool:
        if dl.failed_at is None:
            return False
        if self.since is not None and dl.failed_at < self.since:
            return False
        return self.until is None or dl.failed_at <= self.until


def parse_fingerprint(text: str) -> str:
    """A ``--fingerprint`` value, lowercased: 6 to 12 hex characters.

    Raises :class:`FilterError` for anything else (a shorter prefix would select
    unrelated groups by chance).
    """
    prefix = text.strip().lower()
    if not _FINGERPRINT_PREFIX.fullmatch(prefix):
        raise FilterError(
            f"--fingerprint {text[:80]!r}: give at least {FINGERPRINT_PREFIX} (at most 12) "
            "hex characters of a fingerprint, as `qworker dlq stats` shows it"
        )
    return prefix


def _dotted_match(value: str | None, wanted: str, separator: str) -> bool:
    return value is not None and (value == wanted or value.endswith(separator + wanted))
