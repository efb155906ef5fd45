"""A tiny HTTP server for ``/metrics``, ``/healthz`` and ``/readyz`` (asyncio, no dependency).

Only the request line is parsed (headers are read and ignored, bodies never); a
request must arrive within ``request_timeout`` seconds and fit in 8 KiB a line and
32 KiB in all, or the connection is closed. Every response closes the connection.
It binds 127.0.0.1 by default: metrics and health are for the node's own agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from qworker.worker import Worker

DEFAULT_HOST = "127.0.0.1"
MAX_LINE = 8 * 1024
MAX_HEAD = 32 * 1024
MAX_CONNECTIONS = 32


@dataclass(frozen=True, slots=True)
class Response:
    """What a route answers."""

    status: int
    body: bytes
    content_type: str = "application/json"

    @classmethod
    def check(cls, ok: bool, facts: Mapping[str, Any]) -> Response:
        """200 with ``facts`` as JSON when ``ok``, else 503."""
        body = json.dumps({"ok": ok, **facts}, separators=(",", ":")).encode()
        return cls(200 if ok else 503, body)


Endpoint = Callable[[], Awaitable[Response]]


class HttpServer:
    """Serves GET (and HEAD) of a fixed set of paths; anything else is 404 or 405."""

    def __init__(
        self,
        routes: Mapping[str, Endpoint],
        host: str = DEFAULT_HOST,
        port: int = 0,
        *,
        request_timeout: float = 5.0,
    ) -> None:
        self.routes = dict(routes)
        self.host = host
        self.requested_port = port
        self.request_timeout = request_timeout
        self._server: asyncio.Server | None = None
        self._open = 0
        self._log = structlog.get_logger("qworker")

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("server not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Bind and start serving (raises ``OSError`` when the address is taken)."""
        self._server = await asyncio.start_server(
            self._handle, self.host, self.requested_port, limit=MAX_LINE
        )
        self._log.info("http.serving", host=self.host, port=self.port, paths=sorted(self.routes))

    async def close(self) -> None:
        """Stop listening (requests being answered are not waited for)."""
        if self._server is not None:
            self._server.close()
            self._server = None

    async def __aenter__(self) -> HttpServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        try:
            if self._open > MAX_CONNECTIONS:
                return
            async with asyncio.timeout(self.request_timeout):
                response, head_only = await self._answer(reader)
                writer.write(_encode(response, head_only))
                await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass  # slow, vanished or truncated client: just close
        finally:
            self._open -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[Response, bool]:
        try:
            request_line = await reader.readline()
            size = len(request_line)
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                size += len(line)
                if size > MAX_HEAD:
                    return _plain(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE), False
        except ValueError:  # a line longer than MAX_LINE
            return _plain(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE), False
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return _plain(HTTPStatus.BAD_REQUEST), False
        method, target = parts[0], parts[1]
        route = self.routes.get(target.split(b"?", 1)[0].decode("latin-1"))
        if route is None:
            return _plain(HTTPStatus.NOT_FOUND), False
        if method not in (b"GET", b"HEAD"):
            return _plain(HTTPStatus.METHOD_NOT_ALLOWED), False
        try:
            return await route(), method == b"HEAD"
        except Exception:
            self._log.exception("http.route_failed", path=target[:200].decode("latin-1"))
            return _plain(HTTPStatus.INTERNAL_SERVER_ERROR), False


def _plain(status: HTTPStatus) -> Response:
    return Response(status.value, f"{status.phrase}\n".encode(), "text/plain; charset=utf-8")


def _encode(response: Response, head_only: bool) -> bytes:
    try:
        phrase = HTTPStatus(response.status).phrase
    except ValueError:
        phrase = ""
    head = (
        f"HTTP/1.1 {response.status} {phrase}\r\n"
        f"Content-Type: {response.content_type}\r\n"
        f"Content-Length: {len(response.body)}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    ).encode("latin-1")
    return head if head_only else head + response.body


def worker_routes(
    worker: Worker, render_metrics: Callable[[], bytes] | None
) -> dict[str, Endpoint]:
    """Routes of a single worker process.

    ``/healthz`` (liveness): 200 whenever the worker's event loop answers. A lost broker
    or an open circuit breaker is not a reason to restart the process: a restart fixes
    neither, and it would reset the breaker.
    ``/readyz`` (readiness): 200 while :meth:`Worker.health` says ready: connected, every
    queue consumed or deliberately paused by an open breaker (not while connecting or
    draining).
    """

    async def healthz() -> Response:
        return Response.check(True, worker.health())

    async def readyz() -> Response:
        facts = worker.health()
        return Response.check(bool(facts["ready"]), facts)

    routes: dict[str, Endpoint] = {"/healthz": healthz, "/readyz": readyz}
    if render_metrics is not None:
        routes["/metrics"] = metrics_route(render_metrics)
    return routes


def metrics_route(render: Callable[[], bytes]) -> Endpoint:
    """``/metrics`` in the Prometheus text format, rendered off the event loop."""
    from qworker.metrics import CONTENT_TYPE

    async def metrics() -> Response:
        return Response(200, await asyncio.to_thread(render), CONTENT_TYPE)

    return metrics
