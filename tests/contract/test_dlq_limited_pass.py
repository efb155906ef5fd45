"""A limited pass without a filter (``qworker dlq show --limit N``) delivers exactly N.

Messages delivered but not shown are given back with the shown ones; on a quorum DLQ the
returned messages queue up, in the order returned, ahead of the rest. When the extra count
varied with timing (a consumer started ahead of need), a second, shorter-by-chance pass moved
the head: repeated ``show`` runs on a 10,000-message DLQ showed ``m-000021`` first after 17
runs. Runs on the in-memory broker and on RabbitMQ (``tests/contract/conftest.py``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest

from qworker import dlq
from qworker.dlq.cursor import select
from qworker.dlq.filters import Filter
from qworker.testing.inmemory import MemoryBroker
from qworker.topology import dead_letter_queue

N = 60
SHOWN = 20


@pytest.fixture
async def broker(transport: str, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """The URL of a broker of the case's transport (a fresh in-memory one, or RabbitMQ)."""
    if transport == "rabbitmq":
        yield str(request.getfixturevalue("broker_url"))
        return
    async with MemoryBroker() as memory:
        yield memory.url


@pytest.fixture
async def filled(
    broker: str, queue: str
) -> AsyncIterator[tuple[aio_pika.abc.AbstractConnection, str]]:
    """A connection and a quorum DLQ (declared as qworker declares it) of N messages
    ``m-00``..; the DLQ is deleted afterwards."""
    dlq_queue = f"{queue}.dlq"
    connection = await aio_pika.connect(broker)
    channel = await connection.channel()
    spec = dead_letter_queue(dlq_queue, "quorum")
    await channel.declare_queue(dlq_queue, durable=True, arguments=spec.arguments)
    try:
        for i in range(N):
            await channel.default_exchange.publish(
                aio_pika.Message(b"{}", message_id=f"m-{i:02d}"), routing_key=dlq_queue
            )
        yield connection, dlq_queue
    finally:
        await channel.queue_delete(dlq_queue)
        await connection.close()


async def _delivered_before(connection: aio_pika.abc.AbstractConnection, queue: str) -> list[Any]:
    """A full pass: every id in order, and the ids that were delivered before it."""
    every: list[Any] = []
    await dlq.browse(connection, queue, every.append)
    assert [d.message_id for d in every] == [f"m-{i:02d}" for i in range(N)]
    # A quorum queue adds x-delivery-count to a message it delivers again.
    return [d.message_id for d in every if "x-delivery-count" in d.headers]


async def test_repeated_limited_passes_deliver_only_what_they_show(
    filled: tuple[aio_pika.abc.AbstractConnection, str],
) -> None:
    connection, dlq_queue = filled
    for _ in range(4):
        shown: list[Any] = []
        await dlq.browse(connection, dlq_queue, shown.append, limit=SHOWN)
        assert [d.message_id for d in shown] == [f"m-{i:02d}" for i in range(SHOWN)]
    # Only the shown ones were ever delivered.
    assert await _delivered_before(connection, dlq_queue) == [f"m-{i:02d}" for i in range(SHOWN)]


async def test_a_limit_above_the_window_still_takes_exactly_the_limit(
    filled: tuple[aio_pika.abc.AbstractConnection, str],
) -> None:
    connection, dlq_queue = filled
    # Windows of 10 (consumers rolled over) up to a limit of 25: 25 shown, 25 delivered.
    async with select(connection, dlq_queue, Filter(), 25, window=10) as selection:
        shown = [held.dead_letter.message_id async for held in selection]
    assert shown == [f"m-{i:02d}" for i in range(25)]
    assert await _delivered_before(connection, dlq_queue) == [f"m-{i:02d}" for i in range(25)]
