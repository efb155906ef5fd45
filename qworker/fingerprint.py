"""Failure fingerprints: one short id per kind of failure. Pure functions.

Two failures are of one kind when they share the error type, the error message with the
parts that vary from message to message normalised (see :func:`normalise`: timestamps,
uuids, emails, URLs, IP addresses, file paths, hex, generated ids with or without a kind
prefix, numbers; words are kept), and the top frame of the traceback (file and function,
without the line number, so that a redeploy does not split a group). The worker writes the
fingerprint of every failure to ``x-qworker-fingerprint``; ``qworker dlq`` groups by it and
filters with ``--fingerprint`` (a prefix of at least 6 characters).

The algorithm: ``sha1(error_type + NUL + normalise(message) + NUL + top_frame(traceback))``,
the first 12 hex characters. Messages and tracebacks are taken as written to the headers
(redacted and capped), so the worker and the DLQ tool compute the same id.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from pathlib import PurePath
from typing import Protocol


class _Digest(Protocol):
    def hexdigest(self) -> str: ...


def _sha1() -> Callable[..., _Digest]:
    """The interpreter's own SHA-1 (``_sha1``): hashlib's loads OpenSSL's digest tables,
    ~0.5 MiB of every worker's memory, for one 12-character id per failure kind. Same digest."""
    try:
        module = importlib.import_module("_sha1")
    except ImportError:  # pragma: no cover - an interpreter built without it
        module = importlib.import_module("hashlib")
    sha1: Callable[..., _Digest] = module.sha1
    return sha1


_SHA1 = _sha1()

#: Order matters: the longer, more specific shapes go first, so that e.g. a timestamp
#: is not cut into numbers and an email's domain is not taken for a path.
_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    # 2024-05-01T10:00:00.123Z, 2024-05-01 10:00:00+02:00, 2024-05-01
    (
        re.compile(
            r"\b\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?"
            r"(?:Z|[+-]\d{2}:?\d{2})?)?\b"
        ),
        "<ts>",
    ),
    (re.compile(r"\b\d{2}:\d{2}:\d{2}(?:[.,]\d+)?\b"), "<ts>"),
    (
        re.compile(
            r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b"
        ),
        "<uuid>",
    ),
    (re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b"), "<email>"),
    # URLs keep scheme and host shape out of the group key: their paths carry ids.
    (re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"<>]+"), "<url>"),
    # IPv6: the full eight groups, or any compressed form (with ``::``).
    (
        re.compile(
            r"(?<![\w:])(?:[0-9a-fA-F]{1,4}:){7}[0-9a-fA-F]{1,4}(?![\w:])"
            r"|(?<![\w:])(?:[0-9a-fA-F]{1,4}:){1,7}:(?:[0-9a-fA-F]{1,4}(?::[0-9a-fA-F]{1,4})*)?"
            r"(?![\w:])"
            r"|(?<![\w:])::(?:[0-9a-fA-F]{1,4}(?::[0-9a-fA-F]{1,4})*)?(?![\w:])"
        ),
        "<ip>",
    ),
    (re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}(?::\d{1,5})?\b"), "<ip>"),
    # File paths: a file with an extension, or any path with a line number
    # (/srv/app/handlers.py, C:\\app\\x.py:42, app/jobs.py:7, /opt/bin/run:12).
    # A bare /v1/charges (an endpoint, part of what failed) stays.
    (
        re.compile(
            r"(?<![\w/\\])(?:[A-Za-z]:)?(?:[/\\]|\.{1,2}[/\\]|[\w.~-]+[/\\])"
            r"(?:[\w.~-]+[/\\])*[\w~-]+"
            r"(?:\.[A-Za-z]\w{0,7}(?::\d+(?::\d+)?)?|:\d+(?::\d+)?)(?![\w/\\])"
        ),
        "<path>",
    ),
    (re.compile(r"\b0[xX][0-9a-fA-F]+\b"), "<hex>"),
    # Long hex strings with letters and digits (hashes, object ids).
    (re.compile(r"\b(?=[0-9a-fA-F]*\d)(?=[0-9a-fA-F]*[a-fA-F])[0-9a-fA-F]{8,}\b"), "<hex>"),
)
#: ``cus_NffrFeUfNV2Hib``, ``pi_3Mtw...``, ``ord_991``, ``req-8f3KzQ``: a short lowercase
#: prefix kept (it says what kind of id it is), the random part replaced.
_PREFIXED = re.compile(r"\b([a-z][a-z0-9]{0,11}[_-])([A-Za-z0-9]{2,})\b")
_TOKEN = re.compile(r"\b[A-Za-z0-9]+\b")
_WORD = re.compile(r"[A-Z]?[a-z]+(?:[A-Z][a-z]+)*|[A-Z]+|[A-Z]+[a-z]+(?:[A-Z][a-z]+)*")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_SPACE = re.compile(r"\s+")
_FRAME = re.compile(r'File "([^"\n]+)", line \d+, in ([^\s]+)')
PATTERN_LIMIT = 200
#: Shorter tokens of letters and digits (``sha256``, ``utf8``, ``ipv6``, ``OAuth2``) are
#: words: only their digits become ``<n>``.
ID_LENGTH = 8
#: Letters only: an irregular mix of cases this long is a random id, not a word.
LETTERS_ID_LENGTH = 14


def _is_id(token: str) -> bool:
    """A token of letters and digits that looks generated rather than written."""
    if token.isdigit():
        return False  # a number: ``<n>``
    if any(c.isdigit() for c in token):
        return len(token) >= ID_LENGTH and any(c.isalpha() for c in token)
    return len(token) >= LETTERS_ID_LENGTH and _WORD.fullmatch(token) is None


def _prefixed(match: re.Match[str]) -> str:
    prefix, rest = match.group(1), match.group(2)
    if rest.isdigit():
        return f"{prefix}<n>"
    if any(c.isdigit() for c in rest) or _WORD.fullmatch(rest) is None:
        return f"{prefix}<id>"
    return match.group(0)  # ``not_found``, ``is-valid``: words joined


def _token(match: re.Match[str]) -> str:
    token = match.group(0)
    return "<id>" if _is_id(token) else token


def normalise(message: str) -> str:
    """The error message with its varying parts replaced by placeholders.

    ``customer cus_NffrFeUfNV2Hib not found`` -> ``customer cus_<id> not found``;
    timestamps ``<ts>``, uuids ``<uuid>``, emails ``<email>``, URLs ``<url>``, IP
    addresses ``<ip>``, file paths (with line numbers) ``<path>``, hex ``<hex>``,
    generated ids ``<id>`` (a kind prefix such as ``cus_`` is kept), numbers
    ``<n>``. Words stay, so different errors stay apart. Whitespace is collapsed
    and the result capped at :data:`PATTERN_LIMIT` characters.
    """
    text = message[: PATTERN_LIMIT * 8]  # enough for the capped result; bounds regex work
    for pattern, placeholder in _RULES:
        text = pattern.sub(placeholder, text)
    text = _PREFIXED.sub(_prefixed, text)
    text = _TOKEN.sub(_token, text)
    text = _NUMBER.sub("<n>", text)
    return _SPACE.sub(" ", text).strip()[:PATTERN_LIMIT]


def top_frame(traceback: str) -> str:
    """``file.py:function`` of the innermost frame of the last traceback; empty when none."""
    frames = _FRAME.findall(traceback)
    if not frames:
        return ""
    path, function = frames[-1]
    return f"{PurePath(path).name}:{function}"


def fingerprint(error_type: str, pattern: str, frame: str) -> str:
    """A short stable id of a failure kind."""
    digest = _SHA1(f"{error_type}\0{pattern}\0{frame}".encode(), usedforsecurity=False)
    return digest.hexdigest()[:12]


def of_failure(error_type: str, message: str, traceback: str) -> str:
    """The fingerprint of one failure, from its (redacted, capped) type, message, traceback."""
    return fingerprint(error_type, normalise(message), top_frame(traceback))
