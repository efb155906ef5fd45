"""Test helpers that talk to the real broker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage


async def depth(connection: AbstractConnection, queue: str) -> int:
    """Ready messages in ``queue`` (passive declare)."""
    channel = await connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)
    finally:
        await channel.close()


async def take(
    connection: AbstractConnection, queue: str, count: int, timeout: float = 10.0
) -> list[AbstractIncomingMessage]:
    """Consume and ack ``count`` messages from ``queue`` (fails if they do not come in time)."""
    channel = await connection.channel()
    got: list[AbstractIncomingMessage] = []
    try:
        q = await channel.declare_queue(queue, passive=True)
        deadline = time.monotonic() + timeout
        while len(got) < count:
            message = await q.get(fail=False)
            if message is None:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{queue}: got {len(got)} of {count} messages")
                await asyncio.sleep(0.05)
                continue
            await message.ack()
            got.append(message)
    finally:
        await channel.close()
    return got


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float = 10.0, interval: float = 0.05
) -> None:
    """Wait until ``check()`` is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


async def publish_raw(
    connection: AbstractConnection, queue: str, message: aio_pika.Message
) -> None:
    """Publish ``message`` as a foreign producer would (confirm awaited)."""
    channel = await connection.channel()
    try:
        await channel.default_exchange.publish(message, routing_key=queue)
    finally:
        await channel.close()
