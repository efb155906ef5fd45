"""Helpers that talk to the real broker, and ``eventually``, the one polling loop."""

from __future__ import annotations

import asyncio
import inspect
import json
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

T = TypeVar("T")


async def eventually(
    check: Callable[[], T | Awaitable[T]],
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str | Callable[[], str] = "condition not met in time",
) -> T:
    """Wait until ``check()`` (plain or async) returns a true value, and return that value.

    Fails after ``timeout`` seconds with ``message`` (a callable is called then, to describe
    the state at the end, e.g. a worker's log).
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(message() if callable(message) else message)
        await asyncio.sleep(interval)


def answers(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on ``host:port`` (within a second)."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


async def depth(connection: AbstractConnection, queue: str) -> int:
    """Ready messages in ``queue`` (passive declare; fails if the queue does not exist)."""
    channel = await connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)
    finally:
        if not channel.is_closed:
            await channel.close()


async def eventually_depth(
    connection: AbstractConnection, queue: str, expected: int, timeout: float = 10.0
) -> None:
    """Wait until ``queue`` holds ``expected`` ready messages."""
    current = -1

    async def reached() -> bool:
        nonlocal current
        current = await depth(connection, queue)
        return current == expected

    await eventually(
        reached, timeout, message=lambda: f"{queue}: {current} messages, expected {expected}"
    )


async def take(
    connection: AbstractConnection, queue: str, count: int, timeout: float = 10.0
) -> list[AbstractIncomingMessage]:
    """Consume and ack ``count`` messages from ``queue`` (fails if they do not come in time)."""
    channel = await connection.channel()
    got: list[AbstractIncomingMessage] = []
    try:
        q = await channel.declare_queue(queue, passive=True)

        async def all_taken() -> bool:
            while len(got) < count and (message := await q.get(fail=False)) is not None:
                await message.ack()
                got.append(message)
            return len(got) >= count

        await eventually(
            all_taken, timeout, message=lambda: f"{queue}: got {len(got)} of {count} messages"
        )
    finally:
        await channel.close()
    return got


async def publish_raw(
    connection: AbstractConnection, queue: str, message: aio_pika.Message
) -> None:
    """Publish ``message`` as a foreign producer would (confirm awaited)."""
    channel = await connection.channel()
    try:
        await channel.default_exchange.publish(message, routing_key=queue)
    finally:
        await channel.close()


async def publish_job(
    connection: AbstractConnection, queue: str, ident: str, mode: str = "ok", **extra: Any
) -> None:
    """Publish one JSON message for the ledger app (``tests/apps/ledger_app.py``)."""
    body = json.dumps({"id": ident, "mode": mode, **extra}).encode()
    message = aio_pika.Message(body, content_type="application/json", message_id=ident)
    await publish_raw(connection, queue, message)
