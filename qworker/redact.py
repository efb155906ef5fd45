"""Redaction of secrets in text that leaves the process (headers, logs, terminal).

Pure functions. Redaction is best effort by pattern; it errs towards masking a
little too much rather than too little. The rules, in the order they apply:

URL userinfo
    ``scheme://user:password@host``: the password runs from the first colon to the
    *last* ``@`` before whitespace, a quote or ``<>``, so it may hold ``/``, ``?``,
    ``#``, ``:`` or ``@`` (``redis://default:p@ss@host``, ``amqp://admin:s3cr/et@host``).
    An ``@`` further on in the path or query is taken for part of the password: that
    masks too much (``http://u:p@host/?to=a@b`` -> ``http://u:***@b``), never too
    little. ``scheme://host:8080/path?mail=a@b.c`` is left alone: digits after the
    colon followed by ``/?#`` or the end are a port, as URL parsers read them, so a
    password made only of digits and then ``/?#`` is not recognised. A userinfo *without* a colon
    (``https://TOKEN@host``) is masked when it looks like a token: 20 characters or
    more with both a letter and a digit, or one of the known token prefixes below.
    Plain ``user@example.com`` (no scheme) is never touched.
``Authorization`` / ``Proxy-Authorization`` headers
    ``Authorization: <scheme> <credentials>`` whatever the scheme, with the
    ``, name=value`` parameters that follow (AWS4 ``SignedHeaders``, ``Signature``).
``Cookie`` / ``Set-Cookie`` headers
    An unquoted header value holding ``=`` is masked to the end of its line.
``Bearer`` / ``Basic`` / ``Digest`` followed by a credential
    Not when the next word is a plain lower-case or capitalised word
    ("Bearer token required", "Basic authentication failed").
Bare tokens, wherever they appear
    GitHub (``ghp_ gho_ ghu_ ghs_ ghr_ github_pat_``), GitLab (``glpat-``), Slack
    (``xoxb- xoxp- xoxa- xoxo- xoxs- xoxr-``), Stripe secret and restricted keys
    and webhook secrets (``sk_live_ sk_test_ rk_live_ rk_test_ whsec_``), OpenAI-style
    ``sk-`` keys, AWS access key ids (``AKIA``/``ASIA`` + 16), Google API keys
    (``AIza`` + 35), JSON Web Tokens (``eyJ...`` . ``...`` . ``...``).
PEM private keys
    ``-----BEGIN ... PRIVATE KEY-----`` through its ``-----END ...-----`` line (or to
    the first character that cannot be in a key body, when the text was cut).
Query parameters
    ``key``, ``sig``, ``signature``, ``X-Amz-Signature``, ``X-Goog-Signature`` and
    ``auth`` after ``?``, ``&`` or ``;``. Other parameters named like secrets
    (``access_token``, ``X-Amz-Credential``, ``X-Amz-Security-Token``,
    ``client_secret``) fall under the key rule below. ``code`` (an OAuth
    authorization code: single use, short lived) and ordinary parameters
    (``page=2``) are kept.
pydantic ``ValidationError`` blocks
    When the location line (``password``, ``creds.api_key``) above an indented
    ``... [type=..., input_value=..., input_type=...]`` line names a secret key,
    the ``input_value`` is masked, as are copies of it in that line's message
    (a validator that echoes the value). A truncated dict or list ``input_value``
    (``{'a': 1, 'pass...rd': 'x'}``) keeps its head and loses its tail: the cut can
    separate a value from its key.
Values of secret-looking keys
    ``key=value``, ``key: value``, ``key => value``, with the key bare, quoted or
    JSON-escaped (``\\"password\\": \\"x\\"``). The value is a quoted string (spaces
    and escaped quotes included), a flat ``{...}``, ``[...]`` or ``(...)``, or else a
    run up to whitespace or ``,;&"'}])``. A key is secret-looking when it contains
    one of: ``password passwd pwd passphrase passcode secret token api_key apikey
    authorization auth credential(s) private_key access_key session sessid cookie
    card_number cvv cvc`` (``auth`` only as a word of its own, not ``author``).
    Keys ending in a word that names *about* the secret rather than the secret stay
    readable: ``..._count _type _len _length _size _ttl _expiry _expires _expires_at
    _expires_in _lifetime _url _uri _endpoint _file _path _name _limit _timeout``,
    and token counters (``max_tokens``, ``prompt_tokens``, ...). Deliberately not
    secret-looking: a bare ``key`` (``routing_key``, ``sort_key``), ``pin``,
    ``signature`` outside a query string, ``code``.

The no-trigger shortcut: every rule needs one of the words of ``_TRIGGERS`` (lower
case) in the text, so ASCII text without any of them is returned as it is, sparing
the regular expressions on the common path.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

MASK = "***"

# Only quoting characters and whitespace end a URL password; the host after the last
# "@" cannot hold another "@".
_HOST = r"(?=[^\s@/?#\"'<>,;()]*(?:[\s/?#\"'<>,;()]|$))"
_URL_PASSWORD = re.compile(
    r"://(?<=[A-Za-z0-9+.-]://)(?P<user>[^\s:/@\[\]\"'<>]*):"
    r"(?!\d*(?:[/?#\s\"'<>]|$))[^\s\"'<>]*@" + _HOST
)
_URL_TOKEN_USER = re.compile(
    r"://(?<=[A-Za-z0-9+.-]://)(?=[^\s:/@]*[0-9])(?=[^\s:/@]*[A-Za-z])"
    r"[A-Za-z0-9._~%+=-]{20,}@" + _HOST
)
# An unquoted ``Authorization: <scheme> <credentials>``, whatever the scheme (Token, AWS4-...).
_AUTH_HEADER = re.compile(
    r"(?i)(?P<head>\b(?:proxy-)?authorization[\"']?\s*[:=]\s*)[A-Za-z][\w-]*\s+[^\s\"',;]+"
    r"(?:,\s*[A-Za-z]+=[^\s\"',;]+)*"
)
_COOKIE_HEADER = re.compile(
    r"(?i)(?P<head>\b(?:set-)?cookie[ \t]*:[ \t]*)(?=[^\r\n\"'\\]*=)[^\r\n\"'\\]+"
)
_AUTH_SCHEME = re.compile(
    r"(?i)\b(?P<scheme>bearer|basic|digest)\s+(?-i:(?![A-Z]?[a-z]{1,15}\b))[A-Za-z0-9._~+/=-]{4,}"
)
_BARE_TOKEN = re.compile(
    r"(?<![A-Za-z0-9_-])(?:"
    r"gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}|glpat-[A-Za-z0-9_-]{20,}"
    r"|xox[abposr]-[A-Za-z0-9-]{10,}|[sr]k_(?:live|test)_[A-Za-z0-9]{10,}"
    r"|whsec_[A-Za-z0-9+/=]{10,}|sk-[A-Za-z0-9_-]{20,}|(?:AKIA|ASIA)[0-9A-Z]{16}"
    r"|AIza[0-9A-Za-z_-]{35}|eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"
    r")"
)
_PEM_BODY = r"[A-Za-z0-9+/=\s\\:,.-]"
_PEM = re.compile(
    r"-----BEGIN (?P<kind>[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?)-----(?P<body>" + _PEM_BODY + r"*?)"
    r"(?:(?P<end>-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----)|(?=[^A-Za-z0-9+/=\s\\:,.-])|$)"
)
_QUERY_SECRET = re.compile(
    r"(?i)(?P<head>[?&;](?:key|sig|signature|x-amz-signature|x-goog-signature|auth)=)"
    r"(?P<value>[^&#\s\"'<>]+)"
)
_SECRET_WORD = (  # factored by first letter: the case-insensitive branches are tried per character
    r"p(?:ass(?:w(?:or)?d|phrase|code)|wd|rivate[_-]?key)|s(?:ecret|ess(?:ion|id))|token"
    r"|a(?:pi[_-]?key|pikey|uthori[sz]ation|ccess[_-]?key)|(?<![a-z])auth(?![a-z])"
    r"|c(?:redentials?|ookie|ard[_-]?(?:number|num|no)|v[vc])"
)
_SECRET_WORD_TRIGGERS = (
    "pass",
    "pwd",
    "private",
    "secret",
    "sess",
    "token",
    "api",
    "auth",
    "access",
    "credential",
    "cookie",
    "card",
    "cvv",
    "cvc",
)
# Keys that name something about a secret, not the secret: fixed-width look-behinds at
# the end of the key (case-insensitive like the rest).
_NOT_SECRET_SUFFIXES = (
    "count",
    "type",
    "len",
    "length",
    "size",
    "ttl",
    "expiry",
    "expires",
    "expires_at",
    "expires_in",
    "lifetime",
    "url",
    "uri",
    "endpoint",
    "file",
    "path",
    "name",
    "limit",
    "timeout",
    "max_tokens",
    "num_tokens",
    "total_tokens",
    "input_tokens",
    "output_tokens",
    "prompt_tokens",
    "completion_tokens",
)
_SECRET_KEY = (
    r"(?:"
    + _SECRET_WORD
    + r")[\w-]*"
    + "".join(f"(?<!{re.escape(s)})" for s in _NOT_SECRET_SUFFIXES)
)
_SECRET_KEY_IN_LOC = re.compile(r"(?i)(?:" + _SECRET_KEY + r")(?![\w-])")
_KEY_VALUE = re.compile(
    r"(?i)(?P<key>" + _SECRET_KEY + r"(?:\\*[\"'])?)(?P<sep>[ \t]*(?:=>|[:=])[ \t]*)"
    r"(?P<value>\\+\".*?\\+\"|\"(?:[^\"\\\n]|\\.)*\"|'(?:[^'\\\n]|\\.)*'"
    r"|\{[^{}\n]*\}|\[[^\[\]\n]*\]|\([^()\n]*\)"
    r"|[\"']?[^\s,;&\"'}\])<\\][^\s,;&\"'}\])]*)"
)
_PYDANTIC = re.compile(
    r"(?m)^(?P<loc>[^\n]*)\n(?P<head>[^\n]*\[type=[^\n,\]]+, input_value=)"
    r"(?P<value>[^\n]*)(?P<tail>, input_type=[^\n\]]*\])"
)
_PYDANTIC_TRUNCATED = re.compile(
    r"(?P<head>input_value=[{\[(][^\n]*?\.\.\.)(?P<tail>[^\n]*?)(?=, input_type=)"
)


def _is_mask(value: str) -> bool:
    """Already masked (by an earlier rule, or an earlier pass)."""
    return value.lstrip("\"'\\{[(").startswith(MASK)


def _quoted_mask(value: str) -> str:
    """``MASK`` in the quotes (plain or backslash-escaped) that ``value`` opens with."""
    quote = re.match(r"\\*[\"']", value)
    if quote is None:
        return MASK
    return f"{quote.group()}{MASK}{quote.group()}" if len(value) > 1 else MASK


def _mask_value(match: re.Match[str]) -> str:
    value = match.group("value")
    if _is_mask(value):
        return match.group(0)
    return f"{match.group('key')}{match.group('sep')}{_quoted_mask(value)}"


def _mask_pem(match: re.Match[str]) -> str:
    if not re.sub(r"\s|\\[nr]", "", match.group("body")):
        return match.group(0)
    return f"-----BEGIN {match.group('kind')}-----{MASK}{match.group('end') or ''}"


def _mask_pydantic(match: re.Match[str]) -> str:
    value = match.group("value")
    if _is_mask(value) or not _SECRET_KEY_IN_LOC.search(match.group("loc")):
        return match.group(0)
    head = match.group("head")
    raw = value[1:-1] if value[:1] in "'\"" and len(value) > 1 else value
    if len(raw) >= 3:  # a validator's message may repeat the value
        head = head.replace(raw, MASK)
    return f"{match.group('loc')}\n{head}{_quoted_mask(value)}{match.group('tail')}"


def _mask_truncated(match: re.Match[str]) -> str:
    if match.group("tail") == MASK:
        return match.group(0)
    return f"{match.group('head')}{MASK}"


def _sub(pattern: re.Pattern[str], replacement: str | Callable[[re.Match[str]], str]) -> _Rule:
    return lambda text: pattern.sub(replacement, text)


_Rule = Callable[[str], str]

# Each rule with the words (lower case) it cannot match without; ASCII text is run only
# through the rules whose words it holds, and text holding none of them is returned as it
# is. tests/unit/test_redaction_corpus.py checks that this never changes a result.
_RULES: tuple[tuple[tuple[str, ...], _Rule], ...] = (
    (("://",), _sub(_URL_PASSWORD, rf"://\g<user>:{MASK}@")),
    (("://",), _sub(_URL_TOKEN_USER, f"://{MASK}@")),
    (("auth",), _sub(_AUTH_HEADER, rf"\g<head>{MASK}")),
    (("cookie",), _sub(_COOKIE_HEADER, rf"\g<head>{MASK}")),
    (("bearer", "basic", "digest"), _sub(_AUTH_SCHEME, rf"\g<scheme> {MASK}")),
    (
        (
            "ghp_",
            "gho_",
            "ghu_",
            "ghs_",
            "ghr_",
            "github_pat_",
            "glpat-",
            "xox",
            "k_live_",
            "k_test_",
            "whsec_",
            "sk-",
            "akia",
            "asia",
            "aiza",
            "eyj",
        ),
        _sub(_BARE_TOKEN, MASK),
    ),
    (("private",), _sub(_PEM, _mask_pem)),
    (("key=", "sig", "auth"), _sub(_QUERY_SECRET, rf"\g<head>{MASK}")),
    (_SECRET_WORD_TRIGGERS, _sub(_PYDANTIC, _mask_pydantic)),
    (("input_value=",), _sub(_PYDANTIC_TRUNCATED, _mask_truncated)),
    (_SECRET_WORD_TRIGGERS, _sub(_KEY_VALUE, _mask_value)),
)
_TRIGGERS = tuple(dict.fromkeys(word for words, _ in _RULES for word in words))


def _apply_rules(text: str) -> str:
    """Every rule, without the no-trigger shortcut."""
    for _, rule in _RULES:
        text = rule(text)
    return text


def redact(text: str) -> str:
    """Return ``text`` with secrets replaced by ``***``."""
    if len(text) <= _REMEMBERED_LENGTH:
        if not text.strip(_INERT_EITHER_CASE):
            # A message id, a hex id, a number: nothing to redact (see _INERT), and not
            # remembered, since each one is new (a worker logs a fresh message id per
            # failure, which would fill the cache with texts never asked for again).
            return text
        return _redact_remembered(text)
    return _redact(text)


def _redact(text: str) -> str:
    # Only for ASCII: the case-insensitive patterns also match non-ASCII letters that fold
    # to ASCII ones (long s U+017F as s, dotless i U+0131 as i), which ``str.lower`` keeps.
    if not text.isascii():
        return _apply_rules(text)
    lowered = text.lower()
    if not lowered.strip(_INERT):  # ids, hex, numbers: no trigger can be made of these
        return text
    hits = {word for word in _TRIGGERS if word in lowered}
    if not hits:
        return text
    for words, rule in _RULES:
        if not hits.isdisjoint(words):
            text = rule(text)
    return text


#: Characters that no trigger is made of alone: a text of only these (a uuid, a hex id, a
#: number, a version) holds no trigger. Checked at import (and by a unit test).
_INERT = "0123456789abcdef-.:+ "
#: The ASCII characters whose lower case is in :data:`_INERT`.
_INERT_EITHER_CASE = _INERT + "ABCDEF"
assert all(set(word) - set(_INERT) for word in _TRIGGERS), "a trigger is made of _INERT alone"
#: Short texts are remembered: a worker logs the same queue, handler, target and severity
#: with every failure. Values are the redacted texts, so at most ~1,024 x 256 characters.
_REMEMBERED_LENGTH = 256
_redact_remembered = functools.lru_cache(maxsize=1024)(_redact)


def mask_url(url: str) -> str:
    """``amqp://user:secret@host/vh`` -> ``amqp://user:***@host/vh``; query secrets masked too."""
    return redact(url)


# C0/C1 controls (ESC starts terminal escape sequences), and the invisible Unicode format
# characters (bidi overrides, zero-width, line/paragraph separators) that can disguise text.
# Also lone surrogates: a non-UTF-8 byte decoded with ``surrogateescape`` (U+DC80-U+DCFF, e.g.
# a binary message id) is shown as the byte it stands for; printing it raw fails or emits it.
_CONTROL = re.compile(
    r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ud800-\udfff]"
)


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_control(text: str, *, keep_newlines: bool = False) -> str:
    """Escape control characters (ANSI escape sequences included) and invisible format
    characters (bidi overrides) for a terminal; newlines too unless ``keep_newlines``."""
    escaped = _CONTROL.sub(_escaped, text)
    return escaped if keep_newlines else escaped.replace("\n", "\\n")
