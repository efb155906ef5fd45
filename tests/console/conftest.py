"""Shared fixtures of the console tests: a console (``create_app``) and an HTTP client on it.

``make_console`` builds ``create_app(Console(ConsoleSettings(...)), Access(token))`` and an
``httpx.AsyncClient`` over ``httpx.ASGITransport`` (no server, no port: requests go
straight into the ASGI app, with the raw path as sent, so ``%2F`` stays inside a queue
name). The browser tests (``tests/console/browser``) can use it too, to build the same
console and check through the API what a page did; they serve the ``.web`` app with
their own uvicorn::

    async def test_x(make_console: MakeConsole) -> None:
        c = await make_console("orders.dlq", token=TOKEN, app=my_app)
        answer = await c.client.get(c.path("orders.dlq", "groups"), headers=c.bearer)

Everything it made is closed after the test (``Console.close`` too: the ASGI transport
runs no lifespan).
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aio_pika
import httpx
import pytest
from pydantic import BaseModel
from starlette.applications import Starlette

from qworker import App, Context, Permanent, RetryPolicy
from qworker.console.security import Access
from qworker.console.service import Console, ConsoleSettings
from qworker.console.web import create_app
from qworker.dlq.probes import queue_depth
from qworker.errors import QueueNotFound
from qworker.testing import running
from tests.support.broker import eventually_depth

#: A token long enough for ``qworker console`` (it refuses shorter ones at start).
CONSOLE_TOKEN = "console-test-token-0123456789abcdef"
#: The host the client's requests name (a same-site ``Origin`` names it too).
BASE_URL = "http://console.test"
#: How long ``wait_job`` waits for a job to end, at most.
JOB_TIMEOUT = 30.0


def quoted(name: str) -> str:
    """A queue name or message id as one URL path segment (``/`` as ``%2F``)."""
    return urllib.parse.quote(name, safe="")


@dataclass
class ConsoleUnderTest:
    """One console: its service, its token and sessions, its ASGI app and a client on it."""

    console: Console
    access: Access
    web: Starlette
    client: httpx.AsyncClient
    token: str | None

    @property
    def bearer(self) -> dict[str, str]:
        """The headers of a request that may change things (empty without a token)."""
        return {"authorization": f"Bearer {self.token}"} if self.token else {}

    @staticmethod
    def path(dlq: str, *rest: str) -> str:
        """``/api/dlqs/<dlq>/<rest...>``, each part quoted as one segment."""
        return "/".join(["/api/dlqs", quoted(dlq), *(quoted(part) for part in rest)])

    async def get(self, url: str, **kwargs: Any) -> httpx.Response:
        """GET with the bearer token (when the console has one), then wait until the pass
        it made has given the DLQ back (a page answers before that: ``Console.settled``)."""
        headers = {**self.bearer, **kwargs.pop("headers", {})}
        answer = await self.client.get(url, headers=headers, **kwargs)
        await self.console.settled()
        return answer

    async def post(self, url: str, body: Any = None, **kwargs: Any) -> httpx.Response:
        """POST a JSON body with the bearer token (when the console has one)."""
        headers = {**self.bearer, **kwargs.pop("headers", {})}
        return await self.client.post(url, json=body, headers=headers, **kwargs)

    async def wait_job(self, job_id: str, timeout: float = JOB_TIMEOUT) -> dict[str, Any]:
        """Poll ``GET /api/jobs/{id}`` until the job is done or failed; its last answer."""
        deadline = time.monotonic() + timeout
        while True:
            answer = await self.get(f"/api/jobs/{quoted(job_id)}")
            assert answer.status_code == 200, answer.text
            job: dict[str, Any] = answer.json()
            if job["state"] in ("done", "failed"):
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {job['state']} after {timeout} s: {job}")
            await asyncio.sleep(0.05)


class MakeConsole(Protocol):
    def __call__(
        self,
        *dlqs: str,
        app: App | None = None,
        token: str | None = None,
        urls: Sequence[str] | None = None,
        management_url: str | None = None,
        **settings: Any,
    ) -> Awaitable[ConsoleUnderTest]: ...


@pytest.fixture
async def make_console(request: pytest.FixtureRequest) -> AsyncIterator[MakeConsole]:
    """Build consoles showing ``dlqs`` (and ``app``'s DLQs); closed after the test.

    ``urls`` defaults to the test broker (the ``broker_url`` fixture, asked for only then,
    so that tests of a console on a closed port need no broker); ``settings`` are more
    :class:`ConsoleSettings` fields (``scan_ttl``, ``read_wait``, ...).
    """
    made: list[ConsoleUnderTest] = []

    async def make(
        *dlqs: str,
        app: App | None = None,
        token: str | None = None,
        urls: Sequence[str] | None = None,
        management_url: str | None = None,
        **settings: Any,
    ) -> ConsoleUnderTest:
        if urls is None:
            urls = [request.getfixturevalue("broker_url")]
        console = Console(
            ConsoleSettings(
                urls=list(urls),
                app=app,
                management_url=management_url,
                extra_dlqs=tuple(dlqs),
                **settings,
            )
        )
        access = Access(token)
        web = create_app(console, access)
        client = httpx.AsyncClient(
            # An exception escaping the app answers 500 (as a server would), so that tests
            # can say "never a 500" of a response.
            transport=httpx.ASGITransport(app=web, raise_app_exceptions=False),
            base_url=BASE_URL,
            timeout=60,
        )
        under_test = ConsoleUnderTest(console, access, web, client, token)
        made.append(under_test)
        return under_test

    yield make
    for under_test in made:
        await under_test.client.aclose()
        await under_test.console.close()


class Order(BaseModel):
    """The payload of the ``shop`` app's handler (edited bodies are validated against it)."""

    order_id: str
    amount_cents: int


@dataclass
class Shop:
    """An app with one handler on ``queue`` that raises ``Permanent`` until ``fixed``.

    ``handled`` lists the order ids it handled after the fix, in order.
    """

    app: App
    queue: str
    amqp: aio_pika.abc.AbstractConnection
    fixed: bool = False
    handled: list[str] = field(default_factory=list)

    @property
    def dlq(self) -> str:
        return f"{self.queue}.dlq"

    async def dead_letters(self, count: int, prefix: str = "o") -> list[str]:
        """Publish ``count`` orders, run the worker until all are dead letters; their ids."""
        ids = [f"{prefix}{i}" for i in range(count)]
        try:
            already = await queue_depth(self.amqp, self.dlq)
        except QueueNotFound:
            already = 0
        async with running(self.app, concurrency=4):
            for i, order_id in enumerate(ids):
                await self.app.publish(
                    self.queue, Order(order_id=order_id, amount_cents=i), message_id=order_id
                )
            await eventually_depth(self.amqp, self.dlq, already + count, timeout=20)
        return ids


@pytest.fixture
async def shop(
    broker_url: str,
    queue_name: str,
    cleanup: list[str],
    amqp: aio_pika.abc.AbstractConnection,
) -> AsyncIterator[Shop]:
    """A :class:`Shop` on a fresh queue (its queues deleted after the test)."""
    app = App(broker_url, name=f"console-shop-{queue_name}")
    made = Shop(app, queue_name, amqp)

    @app.handler(queue_name, retry=RetryPolicy(max_attempts=1, initial_delay=0.05, jitter=0))
    async def charge(order: Order, ctx: Context) -> None:
        if not made.fixed:
            raise Permanent(f"customer of {order.order_id} unknown", code="UNKNOWN_CUSTOMER")
        made.handled.append(order.order_id)

    cleanup.extend(spec.name for spec in app.topology())
    yield made
    await app.close()
