"""Faults injected at scheduled moments while messages flow, one at a time."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.faults.nodes import ctl
from tests.faults.stream import DlqDrain
from tests.support.workers import WorkerPool

#: Seconds of stream each kind of fault needs (injection, outage, and a little recovery), so
#: that every fault happens while messages still flow.
FAULT_BUDGET = {
    "kill9": 3.0,
    "close": 3.0,
    "restart": 6.0,
    "hang": 4.0,
    "dlq_full": 6.0,
    "node_stop": 14.0,
}


@dataclass
class Fault:
    """One injected fault: its kind, when it took effect, and what followed."""

    kind: str
    at: float  # time.time() when the fault took effect
    detail: dict[str, Any] = field(default_factory=dict)
    recovery_s: float | None = None


@dataclass
class Target:
    """What faults act on: the worker pool, the control dir, and the broker node(s)."""

    pool: WorkerPool
    control: Path
    queue: str
    worker_name: str
    node: str  # rabbitmqctl node name holding the queues / the workers' connections
    drain: DlqDrain | None = None
    restart_app: Callable[[], None] | None = None
    stop_app: Callable[[], None] | None = None
    stop_node: Callable[[], None] | None = None
    start_node: Callable[[], None] | None = None


def close_connections(node: str, connection_name: str) -> int:
    """Close (broker side), at one moment, every connection whose client named itself
    ``connection_name``; returns how many.

    One ``rabbitmqctl eval`` closes them all. Closed by one ``rabbitmqctl close_connection``
    each (every call starts an Erlang VM: 0.5-1 s), a "close" of two workers was two
    connection losses a second apart: a delivery the first close sent to the other worker
    could be lost again by the second, and one fault counted twice toward ``max_deliveries``
    (a hang-mode message reached 5 in three faults and was dead-lettered as poison, as the
    product documents for five losses; CI, 2026-11-30).
    """
    out = ctl(node, "list_connections", "pid", "client_properties")
    needle = f'{{"connection_name","{connection_name}"}}'
    pids = [line.partition("\t")[0] for line in out.splitlines() if needle in line]
    if not pids:
        return 0
    listed = ",".join(f'"{pid}"' for pid in pids)
    close = (
        "length([ok || P <- [" + listed + "], ok =:= rabbit_networking:close_connection("
        'rabbit_misc:string_to_pid(P), "faults: forced close")]).'
    )
    done = ctl(node, "eval", close, check=False).strip()
    return int(done) if done.isdigit() else 0


class Injector:
    """Injects faults at scheduled moments while messages flow; one fault at a time."""

    def __init__(self, target: Target, rng: random.Random) -> None:
        self.t = target
        self.rng = rng
        self.faults: list[Fault] = []

    async def run(self, schedule: Sequence[tuple[float, str]], start: float) -> None:
        for offset, kind in schedule:
            if (delay := start + offset - time.monotonic()) > 0:
                await asyncio.sleep(delay)
            self.faults.append(await getattr(self, f"_{kind}")())
            await asyncio.sleep(0.3)

    async def _kill9(self) -> Fault:
        t = self.t
        alive = [w for w in t.pool.workers if w.alive()]
        worker = self.rng.choice(alive)
        pid = worker.proc.pid if worker.proc else -1
        await asyncio.to_thread(worker.kill9)
        fault = Fault("kill9", time.time(), {"slot": worker.slot, "pid": pid})
        await asyncio.sleep(self.rng.uniform(0.1, 1.0))
        await asyncio.to_thread(worker.start)
        fault.detail["new_pid"] = worker.proc.pid if worker.proc else -1
        return fault

    async def _close(self) -> Fault:
        """Close the workers' connections. A worker whose connection died within 10 s of
        connecting waits before the next round (back-off, up to 30 s, issue 9 finding 4), so
        a close soon after the last one may find nothing yet: wait (bounded) until there is
        a connection to close."""
        deadline = time.monotonic() + 45
        while True:
            closed = await asyncio.to_thread(close_connections, self.t.node, self.t.worker_name)
            if closed or time.monotonic() > deadline:
                return Fault("close", time.time(), {"closed": closed})
            await asyncio.sleep(0.5)

    async def _restart(self) -> Fault:
        assert self.t.stop_app is not None and self.t.restart_app is not None
        await asyncio.to_thread(self.t.stop_app)
        fault = Fault("restart", time.time())
        down = self.rng.uniform(1.0, 3.0)
        await asyncio.sleep(down)
        await asyncio.to_thread(self.t.restart_app)
        fault.detail["down_s"] = round(time.time() - fault.at, 2)
        return fault

    async def _hang(self) -> Fault:
        flag = self.t.control / "hang"
        flag.touch()
        fault = Fault("hang", time.time())
        await asyncio.sleep(self.rng.uniform(1.0, 2.0))
        flag.unlink()
        fault.detail["window_s"] = round(time.time() - fault.at, 2)
        return fault

    async def _dlq_full(self) -> Fault:
        t = self.t
        policy = f"qwf-full-{t.queue}"
        pattern = "^" + t.queue.replace(".", "\\.") + "\\.dlq$"
        if t.drain is not None:
            t.drain.pause()  # a drained DLQ would never be full
        await asyncio.sleep(0.2)
        fault = Fault("dlq_full", time.time(), {"set": False})
        try:
            await asyncio.to_thread(
                ctl,
                t.node,
                "set_policy",
                policy,
                pattern,
                '{"max-length": 0, "overflow": "reject-publish"}',
                "--apply-to",
                "queues",
                "--priority",
                "999",
            )
            fault.at = time.time()
            fault.detail["set"] = True
            await asyncio.sleep(self.rng.uniform(1.5, 2.5))
        finally:
            # RabbitMQ 3.10: a quorum queue blocked by reject-publish stays blocked when the
            # policy is cleared (it re-checks on a dequeue or a config change), so raise the
            # limit first, then clear it.
            await asyncio.to_thread(
                ctl,
                t.node,
                "set_policy",
                policy,
                pattern,
                '{"max-length": 1000000000}',
                "--apply-to",
                "queues",
                "--priority",
                "999",
                check=False,
            )
            await asyncio.to_thread(ctl, t.node, "clear_policy", policy, check=False)
            if t.drain is not None:
                t.drain.resume()
        fault.detail["window_s"] = round(time.time() - fault.at, 2)
        return fault

    async def _node_stop(self) -> Fault:
        assert self.t.stop_node is not None and self.t.start_node is not None
        await asyncio.to_thread(self.t.stop_node)
        fault = Fault("node_stop", time.time())
        await asyncio.sleep(self.rng.uniform(3.0, 6.0))
        await asyncio.to_thread(self.t.start_node)
        fault.detail["down_s"] = round(time.time() - fault.at, 2)
        return fault


def make_schedule_kinds(kinds: Sequence[str], count: int) -> list[str]:
    """``count`` faults cycling through ``kinds`` (every kind at least once if count allows)."""
    return [kinds[i % len(kinds)] for i in range(count)] if kinds else []


def make_schedule(
    kinds: Sequence[str], count: int, window: float, rng: random.Random
) -> list[tuple[float, str]]:
    """Faults at random moments within the first 70% of the publishing window, shuffled."""
    chosen = make_schedule_kinds(kinds, count)
    rng.shuffle(chosen)
    moments = sorted(rng.uniform(0.05, 0.7) * window for _ in chosen)
    return list(zip(moments, chosen, strict=True))
