"""Helpers for ``test_broker_conditions``: drive a private node into a condition, read it back.

Runtime settings (``consumer_timeout``, ``frame_max``, ``channel_tick_interval``) are set with
``application:set_env`` on the private node: RabbitMQ 3.10 reads them when a connection or
channel opens, exactly as if they came from ``rabbitmq.conf``, so one node serves every test
and each test restores what it changed. Every wait here is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq

from tests.faults.nodes import RabbitNode, ctl


def get_env(node: RabbitNode, key: str) -> str:
    """``application:get_env(rabbit, key)`` as Erlang prints it (e.g. ``{ok,2000}``)."""
    return ctl(node.name, "eval", f"application:get_env(rabbit, {key}).").strip()


def set_env(node: RabbitNode, key: str, value: int) -> None:
    ctl(node.name, "eval", f"application:set_env(rabbit, {key}, {int(value)}).")


@contextlib.contextmanager
def rabbit_env(node: RabbitNode, **settings: int) -> Iterator[None]:
    """Set ``rabbit`` application settings for the block; the old values come back after it."""
    old: dict[str, int | None] = {}
    for key, value in settings.items():
        raw = get_env(node, key)
        old[key] = int(raw[4:-1]) if raw.startswith("{ok,") else None
        set_env(node, key, value)
    try:
        yield
    finally:
        for key, previous in old.items():
            if previous is None:
                ctl(node.name, "eval", f"application:unset_env(rabbit, {key}).", check=False)
            else:
                set_env(node, key, previous)


async def actl(node: RabbitNode, *args: str, check: bool = True) -> str:
    """:func:`ctl` in a thread: a CLI call takes ~0.7 s, which must not stall a worker
    running in this event loop (its heartbeats, acks and cancels)."""
    return await asyncio.to_thread(ctl, node.name, *args, check=check)


@contextlib.asynccontextmanager
async def memory_alarm(node: RabbitNode) -> AsyncIterator[None]:
    """A memory alarm (watermark 0: every publishing connection blocks) until the block ends."""
    await actl(node, "set_vm_memory_high_watermark", "0")
    try:
        yield
    finally:
        await actl(node, "set_vm_memory_high_watermark", "0.4")


async def alarms(node: RabbitNode) -> str:
    return (await actl(node, "eval", "rabbit_alarm:get_alarms().")).strip()


async def connection_pids(node: RabbitNode, name: str) -> list[str]:
    """The pids of the connections whose client named itself ``name`` (exactly)."""
    out = await actl(node, "list_connections", "pid", "client_properties", "--no-table-headers")
    needle = f'{{"connection_name","{name}"}}'
    return [line.split("\t", 1)[0] for line in out.splitlines() if needle in line]


async def close_connections(node: RabbitNode, name: str) -> int:
    """Force-close every connection named ``name``; returns how many."""
    pids = await connection_pids(node, name)
    for pid in pids:
        await actl(node, "close_connection", pid, "qworker fault test: forced close")
    return len(pids)


async def consumers(node: RabbitNode, queue: str) -> int:
    """Consumers attached to ``queue`` now (``rabbitmqctl list_consumers``)."""
    out = await actl(node, "list_consumers", "queue_name", "consumer_tag", "--no-table-headers")
    return sum(1 for line in out.splitlines() if line.split("\t", 1)[0] == queue)


@dataclass(frozen=True)
class QueueState:
    ready: int
    unacked: int
    consumers: int
    policy: str


async def queue_state(node: RabbitNode, queue: str) -> QueueState | None:
    """``list_queues`` for ``queue`` (quorum queue counters lag by a few seconds)."""
    out = await actl(
        node,
        "list_queues",
        "name",
        "messages_ready",
        "messages_unacknowledged",
        "consumers",
        "policy",
        "--no-table-headers",
    )
    for line in out.splitlines():
        cells = line.split("\t")
        if cells[0] == queue:
            return QueueState(int(cells[1]), int(cells[2]), int(cells[3]), cells[4])
    return None


def authenticated(node: RabbitNode, user: str) -> int:
    """Connections of ``user`` the node let in so far (its log's ``authenticated`` lines)."""
    log = node.base / "log" / f"{node.name}.log"
    needle = f"user '{user}' authenticated"
    return sum(needle in line for line in log.read_text(errors="replace").splitlines())


@dataclass(frozen=True)
class Letter:
    message_id: str | None
    headers: dict[str, Any]


@contextlib.asynccontextmanager
async def channel(url: str) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    connection = await aio_pika.connect(url, client_properties={"connection_name": "qwf-probe"})
    try:
        yield await connection.channel()
    finally:
        await connection.close()


async def depth(url: str, queue: str) -> int:
    """Ready messages in ``queue`` (passive declare); -1 when it does not exist."""
    async with channel(url) as ch:
        try:
            declared = await ch.declare_queue(queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return -1
        return int(declared.declaration_result.message_count or 0)


async def drain(url: str, queue: str, limit: int = 10_000) -> list[Letter]:
    """Take every ready message of ``queue`` (acked), as (message id, headers)."""
    letters: list[Letter] = []
    async with channel(url) as ch:
        q = await ch.get_queue(queue, ensure=False)
        while len(letters) < limit:
            message = await q.get(no_ack=True, fail=False)
            if message is None:
                break
            letters.append(Letter(message.message_id, dict(message.headers or {})))
    return letters


async def delete(url: str, *queues: str) -> None:
    with contextlib.suppress(Exception):
        async with channel(url) as ch:
            for name in queues:
                await ch.queue_delete(name)


async def until(
    check: Callable[[], bool | Awaitable[bool]], timeout: float, step: float = 0.1
) -> bool:
    """Poll ``check`` until it is true or ``timeout`` s passed; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result or time.monotonic() >= deadline:
            return bool(result)
        await asyncio.sleep(step)


def duplicates(ids: list[str | None]) -> dict[str | None, int]:
    return {key: n for key, n in Counter(ids).items() if n > 1}


def events(logs: Sequence[Mapping[str, Any]], name: str, **match: Any) -> list[Mapping[str, Any]]:
    """Captured structlog entries of event ``name`` whose fields match ``match``."""
    return [
        e for e in logs if e.get("event") == name and all(e.get(k) == v for k, v in match.items())
    ]
