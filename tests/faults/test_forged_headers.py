"""Forged ``x-death`` headers on a message that qworker retries, on a throwaway private node.

qworker keeps ``x-death`` on the copies it publishes to its retry tiers (quorum queues that
dead-letter back at-least-once). RabbitMQ 3.10.8's dead-letter worker crashes on an ``x-death``
array whose entries are not tables; it crashes again on every retry, its supervisor gives up,
and from then on the whole node cannot dead-letter at-least-once (new quorum queues with it
fail to start: consumers get INTERNAL_ERROR). One producer message is enough, so qworker drops
malformed ``x-death`` / ``x-first-death-*`` headers from its copies.
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

# Regression test: before 9d24992, Consumer._move copied such an x-death into retry tiers as is.


def dlx_supervisor(node: RabbitNode) -> str:
    return ctl(node.name, "eval", "whereis(rabbit_fifo_dlx_sup).").strip()


@pytest.mark.parametrize(
    ("name", "forged"),
    [("x-death", [[]]), ("x-death", [5]), ("x-first-death-queue", [[]])],
    ids=["x-death-array-of-array", "x-death-array-of-int", "x-first-death-array"],
)
async def test_forged_x_death_cannot_strand_retries_nor_break_the_broker(
    scratch_node: RabbitNode, name: str, forged: Any
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
                aio_pika.Message(b"x", headers={name: forged}), routing_key="forged"
            )
            for _ in range(60):
                if 2 in attempts:
                    break
                await asyncio.sleep(0.1)
        finally:
            await connection.close()
    alive = dlx_supervisor(scratch_node)
    assert attempts[:2] == [1, 2], f"the retry never came back (attempts {attempts})"
    assert alive != "undefined", "rabbit_fifo_dlx_sup died"
