"""``App.publish`` after the broker closed the App's connection (restart or forced close).

A producer process keeps one ``App`` for its lifetime; after the broker restarts or closes its
connection, the next publishes must reconnect (the spec: "Connection loss: reconnect").
"""

from __future__ import annotations

import asyncio
import time
import uuid

import aio_pika
import pytest

from qworker import App
from tests.faults.injector import close_connections
from tests.faults.nodes import RabbitNode
from tests.faults.scenario import delete_queues
from tests.faults.size import SIZE

pytestmark = [pytest.mark.faults, pytest.mark.rabbitmq, pytest.mark.timeout(SIZE.timeout)]

# Regression tests: before 9d24992, App._ensure_connection reused a connection the broker had
# closed (aio-pika's is_closed stays false then), so every later App.publish raised
# RuntimeError('... closed') until the process restarted.


async def _publish_until(app: App, queue: str, seconds: float) -> list[str]:
    """Publish once; on failure retry every 0.5 s for ``seconds``; the errors seen."""
    errors: list[str] = []
    deadline = time.monotonic() + seconds
    while True:
        try:
            await app.publish(queue, {"n": 1})
            return errors
        except Exception as exc:
            errors.append(repr(exc)[:200])
            if time.monotonic() > deadline:
                raise AssertionError(f"App.publish never recovered: {errors[-3:]}") from None
            await asyncio.sleep(0.5)


async def _declare(url: str, queue: str) -> None:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        await channel.declare_queue(queue, durable=True)
    finally:
        await connection.close()


async def test_app_publish_reconnects_after_a_broker_restart(own_node: RabbitNode) -> None:
    """After the broker restarts, the same App publishes again within 10 s."""
    queue = f"qwf.pub.{uuid.uuid4().hex[:8]}"
    await _declare(own_node.url, queue)
    app = App(own_node.url, name=f"qwf-pub-{queue}")
    try:
        await app.publish(queue, {"n": 0})
        await asyncio.to_thread(own_node.stop_app)
        await asyncio.to_thread(own_node.start_app)
        await _publish_until(app, queue, 10)
    finally:
        await asyncio.wait_for(app.close(), 10)
        await delete_queues([own_node.url], [queue])


async def test_app_publish_reconnects_after_a_forced_close(broker_url: str) -> None:
    """After the broker closes the App's connection (rabbitmqctl close_connection), the same
    App publishes again within 10 s."""
    queue = f"qwf.pub.{uuid.uuid4().hex[:8]}"
    await _declare(broker_url, queue)
    name = f"qwf-pub-{queue}"
    app = App(broker_url, name=name)
    try:
        await app.publish(queue, {"n": 0})
        # App.publish names its connection "<app name>-publisher".
        closed = await asyncio.to_thread(close_connections, "rabbit@localhost", f"{name}-publisher")
        assert closed == 1
        await asyncio.sleep(0.5)
        await _publish_until(app, queue, 10)
    finally:
        await asyncio.wait_for(app.close(), 10)
        await delete_queues([broker_url], [queue])
