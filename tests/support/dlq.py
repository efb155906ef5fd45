"""Dead letters made with qworker's own header writer, and the DLQ CLI run in-process.

Verification reads (``drain``) are destructive and independent of the DLQ tool,
so that the tool is never checked with itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from click.testing import CliRunner, Result

from qworker import failures
from qworker import headers as h
from qworker.cli import cli
from qworker.topology import QueueType, declare, queue_specs
from tests.support.broker import depth


def failure(
    queue: str,
    *,
    error_type: str = "builtins.KeyError",
    message: str = "customer 42 not found",
    handler: str = "billing.handlers:charge",
    reason: str = "permanent_error",
    at: str | None = None,
    attempt: int = 3,
    incoming: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The headers qworker writes on a dead letter of ``queue``."""
    traceback = (
        "Traceback (most recent call last):\n"
        '  File "/srv/billing/handlers.py", line 12, in charge\n'
        f"    raise {error_type.rsplit('.', 1)[-1]}(...)\n"
        f"{error_type}: {message}\n"
    )
    return h.failure_headers(
        incoming,
        error=failures.ErrorInfo(error_type, message, traceback),
        attempt=attempt,
        classification="permanent",
        origin=h.Origin(queue, handler, "", queue, "host:1"),
        reason=reason,
        at=at,
    )


async def make_dlq(
    connection: AbstractConnection,
    queue: str,
    queue_type: QueueType = "quorum",
    delivery_limit: int = 10,
) -> list[str]:
    """Declare ``queue`` and ``queue.dlq`` as qworker does; returns their names for cleanup."""
    specs = queue_specs(queue, queue_type, delivery_limit, [])
    await declare(connection, specs)
    return [spec.name for spec in specs]


@dataclass(frozen=True)
class Letter:
    """A message to publish raw into a queue."""

    body: bytes
    headers: dict[str, Any]
    message_id: str | None
    content_type: str | None = "application/json"


async def publish(
    connection: AbstractConnection, queue: str, letters: Sequence[Letter], window: int = 200
) -> None:
    """Publish ``letters`` to ``queue`` with confirms, ``window`` outstanding at once."""
    channel = await connection.channel(publisher_confirms=True)
    try:
        for start in range(0, len(letters), window):
            await asyncio.gather(
                *(
                    channel.default_exchange.publish(
                        aio_pika.Message(
                            letter.body,
                            headers=letter.headers,
                            message_id=letter.message_id,
                            content_type=letter.content_type,
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        ),
                        queue,
                    )
                    for letter in letters[start : start + window]
                )
            )
    finally:
        await channel.close()


def letters(queue: str, count: int, prefix: str = "m", **failure_kw: Any) -> list[Letter]:
    """``count`` dead letters of ``queue`` with ids ``m0``, ``m1``, ..."""
    return [
        Letter(f'{{"n": {i}}}'.encode(), failure(queue, **failure_kw), f"{prefix}{i}")
        for i in range(count)
    ]


@dataclass(frozen=True)
class Taken:
    """A message removed from a queue by :func:`drain`."""

    message_id: str | None
    body: bytes
    headers: dict[str, Any]


async def drain(connection: AbstractConnection, queue: str, settle: bool = False) -> list[Taken]:
    """Remove and return every message of ``queue`` (for final checks).

    With ``settle``, first wait until the ready count holds still, so that the
    messages the broker is still returning from a killed client are included.
    """
    expected = await depth(connection, queue)
    while settle:
        await asyncio.sleep(0.3)
        settle = expected != (expected := await depth(connection, queue))
    taken: list[Taken] = []
    if expected == 0:
        return taken
    complete = asyncio.Event()

    async def take(message: AbstractIncomingMessage) -> None:
        taken.append(Taken(message.message_id, message.body, dict(message.headers or {})))
        if len(taken) >= expected:
            complete.set()

    channel = await connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        tag = await declared.consume(take, no_ack=True)
        await asyncio.wait_for(complete.wait(), 30)
        await declared.cancel(tag)
    finally:
        await channel.close()
    return taken


async def broker_dead_letters(
    connection: AbstractConnection, queue: str, ids: Sequence[str]
) -> None:
    """Let RabbitMQ itself dead-letter ``ids`` from ``queue`` (declared with delivery limit 1).

    Each message is returned with ``basic.nack`` until the quorum queue's
    delivery limit moves it to ``queue.dlq`` with ``x-death`` reason ``delivery_limit``.
    """
    await publish(connection, queue, [Letter(b'{"poison": true}', {}, i) for i in ids])
    dlq = f"{queue}.dlq"
    target = await depth(connection, dlq) + len(ids)
    channel = await connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        for _ in range(100):
            if await depth(connection, dlq) >= target:
                return
            message = await declared.get(fail=False, no_ack=False)
            if message is None:
                await asyncio.sleep(0.05)
            else:
                await message.nack(requeue=True)
    finally:
        await channel.close()
    raise AssertionError("the broker did not dead-letter the messages")


async def invoke(*args: str, env: Mapping[str, str] | None = None) -> Result:
    """Run ``qworker ARGS`` in-process (in a thread: the command runs its own event loop)."""
    return await asyncio.to_thread(CliRunner().invoke, cli, list(args), env=env)
