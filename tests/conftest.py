"""Shared fixtures: the broker URL (real RabbitMQ, never mocked) and uuid-named queues.

The rest of the toolkit is in ``tests/support``."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import aio_pika
import pytest

from tests.support.broker import answers

#: The toolkit's fixtures (``worker``, ``management_url``) for every suite.
pytest_plugins = ["tests.support.fixtures"]

LOCAL_URL = "amqp://guest:guest@127.0.0.1:5672/"


def _docker_available() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env().ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session", autouse=True)
def _management_api_for_broker_tests(request: pytest.FixtureRequest) -> None:
    """The DLQ tool (and the worker's DLQ poller) ask the management API for delivery-limit
    policies; without it, reading a quorum DLQ that shows 10 deliveries is refused by design
    (docs/dlq.md). So when the session has broker tests, the API is up from the start, as on
    a machine where RabbitMQ was just installed (see the ``management_url`` fixture)."""
    if any(item.get_closest_marker("rabbitmq") for item in request.session.items):
        request.getfixturevalue("management_url")


@pytest.fixture(scope="session")
def broker_url() -> Iterator[str]:
    """QWORKER_TEST_URL, else 127.0.0.1:5672, else a testcontainers RabbitMQ, else an error.

    With CI=true a missing broker fails the run; it is never a skip.
    """
    if url := os.environ.get("QWORKER_TEST_URL"):
        yield url
        return
    if answers("127.0.0.1", 5672):
        yield LOCAL_URL
        return
    if _docker_available():
        from testcontainers.rabbitmq import RabbitMqContainer

        with RabbitMqContainer("rabbitmq:4-management") as container:
            host = container.get_container_host_ip()
            port = container.get_exposed_port(5672)
            yield f"amqp://guest:guest@{host}:{port}/"
        return
    pytest.fail(
        "no RabbitMQ: set QWORKER_TEST_URL, start one on 127.0.0.1:5672 "
        "(rabbitmq-server -detached), or run Docker for testcontainers"
    )


@pytest.fixture
def queue_name() -> str:
    """A fresh queue name for one test."""
    return f"test.{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def amqp(broker_url: str) -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    """A raw aio-pika connection for test setup and inspection."""
    connection = await aio_pika.connect(broker_url)
    yield connection
    await connection.close()


@pytest.fixture
async def cleanup(broker_url: str) -> AsyncIterator[list[str]]:
    """Append queue names to this list; they are deleted after the test.

    For an app, ``cleanup.extend(s.name for s in app.topology())`` covers every queue.
    """
    names: list[str] = []
    yield names
    connection = await aio_pika.connect(broker_url)
    try:
        channel = await connection.channel()
        for name in dict.fromkeys(names):
            try:
                await channel.queue_delete(name)
            except Exception:  # already gone: deleting closed the channel
                channel = await connection.channel()
    finally:
        await connection.close()
