"""Redaction of secrets in text that leaves the process (headers, logs, terminal).

Pure functions. Redaction is best effort by pattern: credentials in URLs,
``Bearer``/``Basic`` tokens, and values of keys that look secret
(password, secret, token, authorization, api_key, ...).
"""

from __future__ import annotations

import re

MASK = "***"

_URL_CREDENTIALS = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@]*:)[^\s@/]*@")
_AUTH_SCHEME = re.compile(r"(?i)\b(?P<scheme>bearer|basic|digest)\s+[A-Za-z0-9._~+/=-]{4,}")
# An unquoted ``Authorization: <scheme> <credentials>``, whatever the scheme (Token, AWS4-...).
_AUTH_HEADER = re.compile(
    r"(?i)(?P<head>\b(?:proxy-)?authorization[\"']?\s*[:=]\s*)[A-Za-z][\w-]*\s+[^\s\"',;]+"
)
_SECRET_KEY = (
    r"[\w-]*(?:passw(?:or)?d|pwd|secret|token|api[_-]?key|apikey|authorization"
    r"|credentials?|private[_-]?key|access[_-]?key)[\w-]*"
)
_KEY_VALUE = re.compile(
    r"(?i)(?P<key>[\"']?\b" + _SECRET_KEY + r"[\"']?)(?P<sep>\s*[:=]\s*)"
    r"(?P<value>\"[^\"]*\"|'[^']*'|[^\s,;&\"'}\])]+)"
)


def _mask_value(match: re.Match[str]) -> str:
    value = match.group("value")
    if value == MASK or value.strip("\"'") == MASK:
        return match.group(0)
    quote = value[0] if value[:1] in ("'", '"') else ""
    return f"{match.group('key')}{match.group('sep')}{quote}{MASK}{quote}"


# Every pattern above needs one of these words (lower case); text without any of them is
# returned as it is, which spares the regular expressions on the common path.
_TRIGGERS = (
    "://",
    "bearer",
    "basic",
    "digest",
    "authoriz",
    "passw",
    "pwd",
    "secret",
    "token",
    "api",
    "credential",
    "private",
    "access",
)


def redact(text: str) -> str:
    """Return ``text`` with secrets replaced by ``***``."""
    # Only for ASCII: the case-insensitive patterns also match non-ASCII letters that fold
    # to ASCII ones (long s U+017F as s, dotless i U+0131 as i), which ``str.lower`` keeps.
    if text.isascii() and not any(trigger in text.lower() for trigger in _TRIGGERS):
        return text
    text = _URL_CREDENTIALS.sub(rf"\g<head>{MASK}@", text)
    text = _AUTH_HEADER.sub(rf"\g<head>{MASK}", text)
    text = _AUTH_SCHEME.sub(rf"\g<scheme> {MASK}", text)
    return _KEY_VALUE.sub(_mask_value, text)


def mask_url(url: str) -> str:
    """``amqp://user:secret@host/vh`` -> ``amqp://user:***@host/vh``; query secrets masked too."""
    return redact(url)


# C0/C1 controls (ESC starts terminal escape sequences), and the invisible Unicode format
# characters (bidi overrides, zero-width, line/paragraph separators) that can disguise text.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_control(text: str, *, keep_newlines: bool = False) -> str:
    """Escape control characters (ANSI escape sequences included) and invisible format
    characters (bidi overrides) for a terminal; newlines too unless ``keep_newlines``."""
    escaped = _CONTROL.sub(_escaped, text)
    return escaped if keep_newlines else escaped.replace("\n", "\\n")
