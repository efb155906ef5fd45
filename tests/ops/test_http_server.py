"""The tiny HTTP server: only GET/HEAD of known paths, bounded and timed-out requests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from qworker.health import HttpServer, Response


async def _ok() -> Response:
    return Response.check(True, {"n": 1})


async def _boom() -> Response:
    raise RuntimeError("route bug")


@pytest.fixture
async def server() -> AsyncIterator[HttpServer]:
    async with HttpServer({"/ok": _ok, "/boom": _boom}, port=0, request_timeout=0.3) as srv:
        yield srv


async def exchange(server: HttpServer, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(raw)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data


async def test_get_of_a_known_path_answers_its_json_and_closes(server: HttpServer) -> None:
    """GET /ok: status 200, JSON body with ok=true, Content-Length and Connection: close."""
    data = await exchange(server, b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Type: application/json" in head and b"Connection: close" in head
    assert body == b'{"ok":true,"n":1}'
    assert f"Content-Length: {len(body)}".encode() in head


async def test_head_sends_the_headers_only_and_a_query_string_is_ignored(
    server: HttpServer,
) -> None:
    """HEAD /ok?x=1: the same status and length as GET, no body."""
    data = await exchange(server, b"HEAD /ok?x=1 HTTP/1.0\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and data.endswith(b"\r\n\r\n")
    assert b"Content-Length: 17" in data


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /nope HTTP/1.1\r\n\r\n", b"404"),
        (b"POST /ok HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", b"405"),
        (b"hello\r\n\r\n", b"400"),
        (b"GET /ok SMTP/1.0\r\n\r\n", b"400"),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", b"431"),
        (b"GET /ok HTTP/1.1\r\nX-Pad: " + b"b" * 4000 + b"\r\n\r\n", b"200"),
        (b"GET /ok HTTP/1.1\r\n" + (b"X-Pad: " + b"b" * 4000 + b"\r\n") * 10 + b"\r\n", b"431"),
        (b"GET /boom HTTP/1.1\r\n\r\n", b"500"),
    ],
)
async def test_bad_requests_get_a_clear_status(
    server: HttpServer, raw: bytes, status: bytes
) -> None:
    """Unknown path 404, other methods 405, garbage 400, oversized line or head 431, a route
    that raises 500 (and the server keeps serving)."""
    data = await exchange(server, raw)
    assert data.split(b" ", 2)[1] == status
    again = await exchange(server, b"GET /ok HTTP/1.1\r\n\r\n")
    assert again.startswith(b"HTTP/1.1 200")


async def test_a_client_that_sends_nothing_is_disconnected_after_the_timeout(
    server: HttpServer,
) -> None:
    """A silent (or slowloris) client is closed after request_timeout, with no answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /ok HT")
    started = asyncio.get_running_loop().time()
    data = await asyncio.wait_for(reader.read(), 5)
    assert data == b""
    assert asyncio.get_running_loop().time() - started < 2
    writer.close()


async def test_it_binds_loopback_by_default() -> None:
    """Without a host, only 127.0.0.1 listens."""
    async with HttpServer({"/ok": _ok}) as srv:
        assert srv._server is not None
        assert {s.getsockname()[0] for s in srv._server.sockets} == {"127.0.0.1"}
