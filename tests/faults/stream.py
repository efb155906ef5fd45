"""The message stream and its ledgers: the confirmed publisher, the workers' success files,
and the DLQ drain.

- The publisher records an id as *published* only once the broker confirmed it.
- Each worker process appends ``S <id> <attempt> <time>`` to its own ledger file (fsynced) before
  its handler returns, so a success is on disk before the worker can ack it.
- A consumer drains the DLQ while the stream flows (and once more at the end), recording each
  dead letter's message id and reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from qworker import App

# The stream's mix of outcomes (shares of the messages).
MIX = {"ok": 0.70, "transient": 0.12, "hang": 0.01, "permanent": 0.085, "exhausted": 0.085}
SUCCESS_MODES = frozenset({"ok", "transient", "hang", "replay"})
#: The dead-letter reason each failing mode must end with, whatever the faults.
DEAD_REASONS = {"permanent": {"permanent_error"}, "exhausted": {"retries_exhausted"}}


@dataclass(frozen=True, slots=True)
class Success:
    message_id: str
    attempt: int
    at: float
    pid: int


class Ledger:
    """Reads the workers' append-only ledger files incrementally (whole lines only)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.successes: list[Success] = []
        self.processed: set[str] = set()
        self._offsets: dict[Path, int] = {}

    def refresh(self) -> None:
        for path in self.directory.glob("ledger-*.txt"):
            pid = int(path.stem.split("-", 1)[1])
            with open(path, "rb") as fh:
                fh.seek(self._offsets.get(path, 0))
                data = fh.read()
            end = data.rfind(b"\n") + 1
            self._offsets[path] = self._offsets.get(path, 0) + end
            for line in data[:end].decode().splitlines():
                kind, message_id, attempt, at = line.split()
                if kind == "S":
                    self.successes.append(Success(message_id, int(attempt), float(at), pid))
                    self.processed.add(message_id)


class Publisher:
    """Publishes ``{"id", "mode"}`` messages with confirms at a steady rate.

    An id counts as published only when the broker confirmed it; a failed publish is retried
    with the same id (a confirm lost in a fault may therefore make a duplicate, counted later).
    """

    def __init__(self, urls: Sequence[str], queue: str, name: str, window: int = 32) -> None:
        self.urls = list(urls)
        self.name = name
        self.app = App(self.urls, name=name)
        self.queue = queue
        self.window = window
        self.published: dict[str, str] = {}
        self.unconfirmed: dict[str, str] = {}
        self.retries = 0
        self.done = asyncio.Event()

    async def run(self, items: Sequence[tuple[str, str]], rate: float) -> None:
        slots = asyncio.Semaphore(self.window)
        tasks: set[asyncio.Task[None]] = set()
        start = time.monotonic()
        try:
            for i, (message_id, mode) in enumerate(items):
                if (delay := start + i / rate - time.monotonic()) > 0:
                    await asyncio.sleep(delay)
                await slots.acquire()
                task = asyncio.create_task(self._one(message_id, mode))
                tasks.add(task)
                task.add_done_callback(lambda t: (tasks.discard(t), slots.release()))
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            self.done.set()

    async def _one(self, message_id: str, mode: str, give_up_after: float = 180) -> None:
        deadline = time.monotonic() + give_up_after
        while True:
            try:
                await self.app.publish(
                    self.queue, {"id": message_id, "mode": mode}, message_id=message_id
                )
            except Exception as exc:
                self.retries += 1
                if time.monotonic() > deadline:
                    self.unconfirmed[message_id] = repr(exc)[:200]
                    return
                await asyncio.sleep(0.25)
            else:
                self.published[message_id] = mode
                return

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.app.close(), 5)


def make_items(count: int, rng: random.Random, prefix: str) -> list[tuple[str, str]]:
    """``count`` (id, mode) pairs in the :data:`MIX` proportions, shuffled."""
    modes = list(MIX)
    weights = [MIX[m] for m in modes]
    return [(f"{prefix}-{i:06d}", rng.choices(modes, weights)[0]) for i in range(count)]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    message_id: str
    reason: str
    redelivered: bool
    queue_header: str | None


def dead_letter_reason(headers: dict[str, Any]) -> str:
    """``x-qworker-reason``, else the broker's ``x-death`` reason (``x-death:<reason>``)."""
    reason = headers.get("x-qworker-reason")
    if isinstance(reason, bytes):
        reason = reason.decode(errors="replace")
    if isinstance(reason, str) and reason:
        return reason
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        value = deaths[0].get("reason")
        if isinstance(value, bytes):
            value = value.decode(errors="replace")
        return f"x-death:{value}"
    return "none"


async def connect_any(urls: Sequence[str], **kwargs: Any) -> AbstractConnection:
    """The first of ``urls`` that accepts a connection (each tried once)."""
    errors = []
    for url in urls:
        try:
            return await aio_pika.connect(url, timeout=5, **kwargs)
        except Exception as exc:
            errors.append(repr(exc))
    raise ConnectionError("; ".join(errors))


class DlqDrain:
    """Consumes a DLQ (acking each message after recording it), reconnecting as needed."""

    def __init__(self, urls: Sequence[str], queue: str) -> None:
        self.urls = list(urls)
        self.queue = queue
        self.records: list[DeadLetter] = []
        self.reconnects = 0
        self._stop = asyncio.Event()
        self._paused = asyncio.Event()
        self._resumed = asyncio.Event()
        self._resumed.set()
        self.last_message_at = 0.0

    @property
    def ids(self) -> set[str]:
        return {r.message_id for r in self.records}

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        headers = dict(message.headers or {})
        queue_header = headers.get("x-qworker-queue")
        self.records.append(
            DeadLetter(
                message.message_id or "?",
                dead_letter_reason(headers),
                bool(message.redelivered),
                queue_header if isinstance(queue_header, str) else None,
            )
        )
        self.last_message_at = time.monotonic()
        await message.ack()

    async def run(self) -> None:
        while not self._stop.is_set():
            await self._resumed.wait()
            try:
                connection = await connect_any(self.urls)
            except ConnectionError:
                await asyncio.sleep(0.5)
                continue
            self.reconnects += 1
            lost = asyncio.Event()
            connection.close_callbacks.add(_setter(lost))
            try:
                channel = await connection.channel()
                await channel.set_qos(prefetch_count=200)
                queue = await channel.get_queue(self.queue, ensure=False)
                await queue.consume(self._on_message)
                waits = [asyncio.create_task(e.wait()) for e in (self._stop, lost, self._paused)]
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for w in waits:
                    w.cancel()
            except Exception:
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(Exception):
                    await connection.close()

    def pause(self) -> None:
        """Stop consuming (while a test needs the DLQ to fill up)."""
        self._resumed.clear()
        self._paused.set()

    def resume(self) -> None:
        self._paused.clear()
        self._resumed.set()

    def stop(self) -> None:
        self._stop.set()
        self.resume()


def _setter(event: asyncio.Event) -> Callable[..., None]:
    """A close callback that sets ``event``."""
    return lambda *_: event.set()
