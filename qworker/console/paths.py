"""Queue names and message ids in URL paths, where they may contain ``/``.

RabbitMQ queue names and message ids may hold any character, ``/`` included
(``orders/eu.dlq``, ``invoice/2024/17``). A client sends such a segment as ``%2F``,
but ASGI servers hand routes the *decoded* path, where it is indistinguishable
from a separator. So :class:`RawPath` routes on the path as it was sent, and the
``segment`` convertor decodes each parameter once, after routing. Register both
with :func:`install` (routes then write ``{dlq:segment}``).
"""

from __future__ import annotations

import urllib.parse

from starlette.convertors import Convertor, register_url_convertor
from starlette.types import ASGIApp, Receive, Scope, Send


class SegmentConvertor(Convertor[str]):
    """One path segment as sent (``%2F`` stays inside it), decoded once."""

    regex = "[^/]+"

    def convert(self, value: str) -> str:
        # surrogateescape: an id that is not UTF-8 (the wire codec reads such bytes so)
        # comes back as the same string, instead of U+FFFD that matches nothing.
        return urllib.parse.unquote(value, errors="surrogateescape")

    def to_string(self, value: str) -> str:
        return urllib.parse.quote(value.encode("utf-8", "surrogateescape"), safe="")


class RawPath:
    """ASGI middleware: route on the raw (still percent-encoded) path.

    Args:
        app: The application to pass requests to.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = scope.get("raw_path")
        if scope["type"] == "http" and isinstance(raw, bytes):
            scope = {**scope, "path": raw.decode("latin-1")}
        await self.app(scope, receive, send)


def install() -> None:
    """Register the ``segment`` convertor (idempotent)."""
    register_url_convertor("segment", SegmentConvertor())
