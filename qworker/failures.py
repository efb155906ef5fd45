"""Error capture: what a failure was (type, message, traceback), redacted and capped.

Pure functions. :class:`ErrorInfo` is the failure of the last attempt, written to
the ``x-qworker-error-*`` headers and to logs; :class:`Failure` is one entry of the
failure history. Every text passes :func:`qworker.redact.redact` and is cut to a
byte limit (:func:`truncate`), so that a failure can neither leak a secret nor grow
a message without bound.
"""

from __future__ import annotations

import linecache
import re
import traceback
from dataclasses import dataclass
from types import FrameType
from typing import Any

from qworker import fingerprint as fingerprints
from qworker.clock import iso_milliseconds
from qworker.redact import redact

MESSAGE_LIMIT = 2 * 1024
TRACEBACK_LIMIT = 16 * 1024
HISTORY_MESSAGE_LIMIT = 512
_TRUNCATED = "...[truncated]"


def now_iso() -> str:
    """The current UTC time as ISO 8601 with milliseconds."""
    return iso_milliseconds()


def truncate(text: str, limit: int, *, keep_tail: bool = False) -> str:
    """Cut ``text`` to at most ``limit`` UTF-8 bytes, marking the cut."""
    if len(text) <= limit and text.isascii():
        return text  # the common case, and what encoding and decoding it would give
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return data.decode("utf-8")  # lone surrogates became "?": AMQP needs valid UTF-8
    room = max(0, limit - len(_TRUNCATED))
    if keep_tail:
        return _TRUNCATED + data[-room:].decode("utf-8", "ignore")
    return data[:room].decode("utf-8", "ignore") + _TRUNCATED


def error_type_name(exc: BaseException) -> str:
    """The fully qualified class name, e.g. ``builtins.KeyError``."""
    cls = type(exc)
    return f"{cls.__module__}.{cls.__qualname__}"


def _message(exc: BaseException) -> str:
    """``str(exc)``, or a placeholder when the exception's ``__str__`` itself fails."""
    try:
        return str(exc)
    except Exception:
        return f"<str() of {error_type_name(exc)} failed>"


_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"
_FRAMES_KEPT = (10, 30)  # first and last frames of a very deep traceback


def _chain(exc: BaseException) -> list[tuple[BaseException, str]]:
    """``exc`` and its chained causes, newest first, each with the text linking it to the
    next one printed (the interpreter's rules: ``__cause__``, else an unsuppressed
    ``__context__``; a cycle ends the chain)."""
    chain: list[tuple[BaseException, str]] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    link = ""
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append((current, link))
        if current.__cause__ is not None:
            current, link = current.__cause__, _CAUSE
        elif current.__context__ is not None and not current.__suppress_context__:
            current, link = current.__context__, _CONTEXT
        else:
            current = None
    return chain


def release_frames(exc: BaseException) -> None:
    """Drop the tracebacks of ``exc`` and its chained causes, once captured as text.

    A traceback keeps every frame between the raise and the catch alive, and with them the
    handler's locals: its payload, its context, whatever it had loaded. A failure waiting for
    its copy's confirm held all of it (about 1.5 KiB per failure in flight in the peer
    benchmark's handler; ``bench/results/2026-11-30-frames.md``). Once :class:`ErrorInfo`
    has captured the failure (redacted, capped), that text is its one record: the headers,
    the log line and the trace span all use it. Releasing also stops an exception instance
    raised again and again (a module-level constant) from growing its traceback each time.
    """
    for error, _ in _chain(exc):
        # The C method, not ``error.__traceback__ = None``: that goes through the class's
        # ``__setattr__``, which a frozen dataclass exception makes raise.
        BaseException.with_traceback(error, None)


def format_traceback(exc: BaseException) -> str:
    """The traceback of ``exc`` with its chained causes, laid out like the interpreter's.

    Unlike :func:`traceback.format_exception` on Python 3.11+, no ``^^^^`` lines:
    computing them parses every frame's source line, which made formatting the
    most expensive step of a failure. Very deep tracebacks keep their first and
    last frames.
    """
    parts: list[str] = []
    for error, link in reversed(_chain(exc)):
        parts.extend(_format_one(error))
        parts.append(link)
    return "".join(parts)


def _format_one(exc: BaseException) -> list[str]:
    lines: list[str] = []
    if exc.__traceback__ is not None:
        # Read frames directly: StackSummary.extract stats every source file (checkcache).
        frames = list(traceback.walk_tb(exc.__traceback__))
        head, tail = _FRAMES_KEPT
        omitted = len(frames) - head - tail
        shown: list[tuple[FrameType, int] | None] = list(frames)
        if omitted > 0:
            shown = [*frames[:head], None, *frames[-tail:]]
        lines.append("Traceback (most recent call last):\n")
        for entry in shown:
            if entry is None:
                lines.append(f"  ... {omitted} frames omitted ...\n")
                continue
            frame, lineno = entry
            code = frame.f_code
            lines.append(f'  File "{code.co_filename}", line {lineno}, in {code.co_name}\n')
            source = linecache.getline(code.co_filename, lineno, frame.f_globals).strip()
            if source:
                lines.append(f"    {source}\n")
    try:
        lines.extend(traceback.format_exception_only(type(exc), exc))
    except Exception:  # an exception whose __str__ raises
        lines.append(f"{error_type_name(exc)}: <unprintable>\n")
    return lines


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """A failure, redacted and capped, ready to be written to headers and logs."""

    error_type: str
    message: str
    traceback: str
    code: str | None = None
    """The exception's string ``code`` attribute (``Permanent(..., code=...)``), sanitised."""
    fingerprint: str = ""
    """The failure kind (:mod:`qworker.fingerprint`); empty when not computed."""

    @classmethod
    def from_exception(cls, exc: BaseException) -> ErrorInfo:
        """Capture ``exc`` with its chained causes, its error code and its fingerprint.

        A failure site seen lately (see :func:`_site`) is not captured again: formatting,
        redaction and the fingerprint would give the same result.
        """
        code = error_code(exc)
        site = _site(exc, code)
        if site is not None and (known := _SITES.get(site)) is not None:
            return known
        error_type = error_type_name(exc)
        message = truncate(redact(_message(exc)), MESSAGE_LIMIT)
        tb = truncate(redact(format_traceback(exc)), TRACEBACK_LIMIT, keep_tail=True)
        info = cls(
            error_type=error_type,
            message=message,
            traceback=tb,
            code=code,
            fingerprint=fingerprints.of_failure(error_type, message, tb),
        )
        if site is not None:
            if len(_SITES) >= SITES_KEPT:
                _SITES.pop(next(iter(_SITES)), None)  # the oldest
            _SITES[site] = info
        return info


#: Failure sites remembered by :meth:`ErrorInfo.from_exception`, oldest first. A burst of
#: one failure (a dependency down, a bad deploy) is one site: it is formatted, redacted and
#: fingerprinted once. Few entries: each holds up to ~18 KiB of text.
SITES_KEPT = 64
_SITES: dict[tuple[Any, ...], ErrorInfo] = {}
#: Longer messages are not remembered (the key would hold them) but captured every time.
_SITE_MESSAGE_LIMIT = 4 * 1024


def _site(exc: BaseException, code: str | None) -> tuple[Any, ...] | None:
    """What :meth:`ErrorInfo.from_exception` makes of ``exc`` depends on, as a key; None
    when it is not worth remembering or cannot be keyed.

    Per exception of the chain: its type, ``str()``, notes and link, and the code object and
    line of every frame. The code object fixes the frame's file and function, and with the
    line, the source line from :mod:`linecache` (whose cache is never refreshed here, as
    in :func:`format_traceback`). Syntax errors are left out: their text carries more
    attributes than these.
    """
    key: list[Any] = [code]
    for error, link in _chain(exc):
        if isinstance(error, SyntaxError):
            return None
        message = _message(error)
        notes = getattr(error, "__notes__", None)
        if len(message) > _SITE_MESSAGE_LIMIT or not (notes is None or _plain_notes(notes)):
            return None
        frames = tuple(
            (frame.f_code, line) for frame, line in traceback.walk_tb(error.__traceback__)
        )
        key.append((type(error), message, tuple(notes or ()), link, frames))
    return tuple(key)


def _plain_notes(notes: Any) -> bool:
    return (
        isinstance(notes, list)
        and len(notes) <= 8
        and all(type(n) is str and len(n) <= _SITE_MESSAGE_LIMIT for n in notes)
    )


#: Error codes are names: letters, digits and ``_.:-``, at most this long.
CODE_LIMIT = 64
_CODE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def error_code(exc: BaseException) -> str | None:
    """``exc.code`` when it is a string that looks like a name; None otherwise.

    Anything else (an int, a long text, spaces) is not a code: a library's ``code``
    attribute may hold a status number or a message, which would split groups or leak text.
    """
    code = getattr(exc, "code", None)
    if isinstance(code, str) and _CODE.fullmatch(code):
        return code
    return None


@dataclass(frozen=True, slots=True)
class Failure:
    """One entry of ``x-qworker-history``."""

    attempt: int
    at: str
    error_type: str
    error_message: str

    @classmethod
    def from_exception(cls, attempt: int, exc: BaseException) -> Failure:
        """A history entry for ``exc`` (no traceback), redacted and capped."""
        message = truncate(redact(_message(exc)), HISTORY_MESSAGE_LIMIT)
        return cls(attempt, now_iso(), error_type_name(exc), message)

    def to_header(self) -> dict[str, Any]:
        return {
            "attempt": self.attempt,
            "at": self.at,
            "error_type": self.error_type,
            "error_message": self.error_message,
        }
