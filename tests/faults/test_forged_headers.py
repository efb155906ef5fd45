"""Forged ``x-death`` headers on a message that qworker retries, on a throwaway private node.

qworker keeps ``x-death`` on the copies it publishes to its retry tiers (quorum queues that
dead-letter back at-least-once). RabbitMQ 3.10.8's dead-letter worker crashes on an ``x-death``
array whose entries are not tables; it crashes again on every retry, its supervisor gives up,
and from then on the whole node cannot dead-letter at-least-once (new quorum queues with it
fail to start: consumers get INTERNAL_ERROR). One producer message is enough.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
import pytest

from qworker import App, Context, RetryPolicy
from qworker.testing import running
from tests.faults.nodes import RabbitNode, ctl
from tests.faults.size import SIZE

pytestmark = [pytest.mark.faults, pytest.mark.rabbitmq, pytest.mark.timeout(SIZE.timeout)]

BUG = (
    "qworker weakness (with a RabbitMQ 3.10.8 bug): Consumer._move (qworker/consumer.py) copies "
    "a producer's x-death into retry tiers as is; an x-death array of non-tables (e.g. [[]]) "
    "crashes the broker's at-least-once dead-letter worker, the retry never comes back, and the "
    "node's rabbit_fifo_dlx_sup dies (every at-least-once quorum queue of the node breaks)"
)


def dlx_supervisor(node: RabbitNode) -> str:
    return ctl(node.name, "eval", "whereis(rabbit_fifo_dlx_sup).").strip()


@pytest.mark.parametrize("forged", [[[]], [5]], ids=["array-of-array", "array-of-int"])
@pytest.mark.xfail(strict=True, reason=BUG)
async def test_forged_x_death_cannot_strand_retries_nor_break_the_broker(
    scratch_node: RabbitNode, forged: Any
) -> None:
    """A message with a forged ``x-death`` fails once (transient) and is retried: the retry
    comes back and succeeds, and the node's dead-letter supervisor is still running."""
    app = App(scratch_node.url, name="qwf-forged")
    attempts: list[int] = []

    @app.handler("forged", retry=RetryPolicy(max_attempts=3, initial_delay=0.05, jitter=0))
    async def handle(payload: bytes, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise ConnectionError("first attempt fails")

    async with running(app):
        connection = await aio_pika.connect(scratch_node.url)
        try:
            channel = await connection.channel()
            await channel.default_exchange.publish(
                aio_pika.Message(b"x", headers={"x-death": forged}), routing_key="forged"
            )
            for _ in range(100):
                if 2 in attempts:
                    break
                await asyncio.sleep(0.1)
        finally:
            await connection.close()
    alive = dlx_supervisor(scratch_node)
    assert attempts[:2] == [1, 2], f"the retry never came back (attempts {attempts})"
    assert alive != "undefined", "rabbit_fifo_dlx_sup died"
