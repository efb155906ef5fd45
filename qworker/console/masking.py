"""What the console shows of a dead letter's headers: secret-looking values masked.

Headers are producer-controlled and sometimes carry credentials (``authorization``,
``x-api-key``, a session cookie) or text with a URL password in it. The console is
shared by a team, so everything it shows or lets people download passes through
:func:`masked_record`: the value of a header whose *name* looks secret (the same
rule as :func:`qworker.redact.redact` applies to ``key=value`` text) becomes ``***``,
at any depth of nested tables, and every other text value is redacted by pattern.
Bodies are not masked: a body is the message itself, which an operator must see
to fix and edit (protect the console with a token). Replays read the broker's own
copy, never what the console showed, so masking never changes what is replayed.
For a faithful backup to replay from a file, ``qworker dlq export`` writes
headers as they are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from qworker.dlq.records import DeadLetter
from qworker.redact import redact

MASK = "***"
#: Tables nested deeper than this are shown as the mask (a hostile header cannot
#: make masking recurse without end).
MAX_DEPTH = 16
_PROBE = "qworker-probe-value"


def secret_name(name: str) -> bool:
    """True when a header named ``name`` would carry a secret (``authorization``, ``x-api-key``)."""
    return redact(f"{name}={_PROBE}") != f"{name}={_PROBE}"


def masked_value(value: Any, depth: int = 0) -> Any:
    """``value`` for display: text redacted by pattern, tables and lists masked inside."""
    if depth > MAX_DEPTH:
        return MASK
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return masked_headers(value, depth + 1)
    if isinstance(value, list | tuple):
        return [masked_value(item, depth + 1) for item in value]
    return value


def masked_headers(headers: Mapping[str, Any], depth: int = 0) -> dict[str, Any]:
    """A copy of ``headers`` with secret-named values masked and other text redacted."""
    return {
        str(name): MASK if secret_name(str(name)) else masked_value(value, depth)
        for name, value in headers.items()
    }


def masked_record(record: dict[str, Any]) -> dict[str, Any]:
    """A record of the export format (:func:`qworker.dlq.jsonl.to_record`) for display."""
    shown = dict(record)
    if isinstance(record.get("headers"), Mapping):
        shown["headers"] = masked_headers(record["headers"])
    if isinstance(record.get("properties"), Mapping):
        properties = dict(record["properties"])
        if isinstance(properties.get("headers"), Mapping):
            properties["headers"] = masked_headers(properties["headers"])
        shown["properties"] = properties
    return shown


def masked_letter(dl: DeadLetter) -> DeadLetter:
    """``dl`` for the pages: headers and properties masked, error texts redacted (a
    forged dead letter's error headers were never redacted by a worker). The body stays."""
    return dataclasses.replace(
        dl,
        headers=masked_headers(dl.headers),
        properties=masked_headers(dl.properties),
        error_message=redact(dl.error_message),
        traceback=redact(dl.traceback),
    )
