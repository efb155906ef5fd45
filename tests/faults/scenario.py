"""A scenario: subprocess workers consume a mixed stream while faults are injected; then every
published id is accounted for (see :mod:`tests.faults.accounting`).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qworker.topology import queue_specs
from tests.faults.accounting import Summary, account
from tests.faults.fault_app import POLICY, worker_env
from tests.faults.injector import FAULT_BUDGET, Injector, Target, make_schedule, make_schedule_kinds
from tests.faults.nodes import ctl
from tests.faults.size import SIZE, seed
from tests.faults.stream import DlqDrain, Ledger, Publisher, connect_any, make_items
from tests.support.broker import depth
from tests.support.workers import WorkerPool


async def queue_depths(urls: Sequence[str], names: Sequence[str]) -> dict[str, int]:
    """Ready messages per queue (passive declare), -1 for a queue that does not exist."""
    connection = await connect_any(urls)
    depths: dict[str, int] = {}
    try:
        for name in names:
            try:
                depths[name] = await depth(connection, name)
            except Exception:
                depths[name] = -1
    finally:
        await connection.close()
    return depths


async def delete_queues(urls: Sequence[str], names: Iterable[str]) -> None:
    with contextlib.suppress(Exception):
        connection = await connect_any(urls)
        try:
            for name in names:
                with contextlib.suppress(Exception):
                    channel = await connection.channel()
                    await channel.queue_delete(name)
                    await channel.close()
        finally:
            await connection.close()


def queue_names(queue: str) -> list[str]:
    """The queues the fault app declares for ``queue``: DLQ, work queue, retry tiers."""
    return [spec.name for spec in queue_specs(queue, "quorum", 10, POLICY.tiers())]


@dataclass
class Scenario:
    """One run: workers on ``urls``, a stream of ``messages`` and faults of ``kinds``."""

    name: str
    tmp: Path
    urls: list[str]
    node: str
    kinds: Sequence[str]
    messages: int
    faults: int
    rate: float = SIZE.rate
    workers: int = 2
    concurrency: int = 8
    prefetch: int = 16
    drain_urls: list[str] | None = None
    restart_app: Callable[[], None] | None = None
    stop_app: Callable[[], None] | None = None
    stop_node: Callable[[], None] | None = None
    start_node: Callable[[], None] | None = None
    settle_timeout: float = 120.0
    before_faults: Callable[[], Awaitable[None]] | None = None
    #: Called with the retry tiers whose dead-lettered messages the broker stopped moving.
    unstick: Callable[[list[str]], Awaitable[None]] | None = None
    #: Extra ``qworker run`` arguments (e.g. ``--url u1,u2,u3``), and the URLs the app itself
    #: is built with (default: ``urls``).
    worker_args: list[str] = field(default_factory=list)
    app_urls: list[str] | None = None
    unstuck: dict[str, int] = field(default_factory=dict)
    unstick_rounds: int = 0
    queue: str = field(default_factory=lambda: f"qwf.{uuid.uuid4().hex[:12]}")
    pool: WorkerPool | None = None

    def allowed_dead(self) -> dict[str, set[str]]:
        """Dead-letter reasons a mode may end with under these faults, beyond its own."""
        allowed: dict[str, set[str]] = {}
        if "hang" in self.kinds:
            # A message whose every attempt fell into hang windows times out for good; the
            # window hangs the handler before a permanent message gets to raise its error.
            for mode in ("ok", "transient", "hang", "permanent", "exhausted"):
                allowed[mode] = {"timeout", "retries_exhausted"}
        return allowed

    async def run(self) -> Summary:
        rng_seed = seed()
        rng = random.Random(rng_seed)
        ledger_dir = self.tmp / "ledger"
        control = self.tmp / "control"
        logs = self.tmp / "logs"
        for d in (ledger_dir, control, logs):
            d.mkdir(parents=True, exist_ok=True)
        worker_name = f"qwf-w-{self.queue}"
        env = worker_env(self.app_urls or self.urls, worker_name, self.queue, ledger_dir, control)
        args = [
            "--concurrency",
            str(self.concurrency),
            "--prefetch",
            str(self.prefetch),
            "--grace",
            "5",
            "--log-format",
            "json",
            *self.worker_args,
        ]
        self.pool = pool = WorkerPool("tests.faults.fault_app:app", env, logs, self.workers, args)
        seconds: dict[str, float] = {}
        t_start = time.monotonic()
        await asyncio.to_thread(pool.start)
        seconds["workers_start"] = round(time.monotonic() - t_start, 2)

        drain = DlqDrain(self.drain_urls or self.urls, f"{self.queue}.dlq")
        drain_task = asyncio.create_task(drain.run())
        publisher = Publisher(self.urls, self.queue, f"qwf-p-{self.queue}")
        target = Target(
            pool,
            control,
            self.queue,
            worker_name,
            self.node,
            drain,
            restart_app=self.restart_app,
            stop_app=self.stop_app,
            stop_node=self.stop_node,
            start_node=self.start_node,
        )
        injector = Injector(target, rng)
        items = make_items(self.messages, rng, self.queue.split(".")[-1])
        budget = sum(FAULT_BUDGET[k] for k in make_schedule_kinds(self.kinds, self.faults))
        window = max(self.messages / self.rate, budget / 0.7)
        rate = self.messages / window
        schedule = make_schedule(self.kinds, self.faults, window, rng) if self.kinds else []
        ledger = Ledger(ledger_dir)
        progress = asyncio.create_task(
            self._progress(publisher, ledger, drain, injector, self.tmp / "progress.log")
        )
        try:
            t0 = time.monotonic()
            publishing = asyncio.create_task(publisher.run(items, rate))
            if self.before_faults is not None:
                await self.before_faults()
            await injector.run(schedule, t0)
            await publishing
            seconds["publish"] = round(time.monotonic() - t0, 2)
            missing = await self._wait_accounted(publisher, ledger, drain, stall=15)
            for _ in range(3 if self.unstick is not None else 0):
                # Ids neither processed nor dead-lettered, and no progress: still in the broker?
                stranded = await asyncio.to_thread(self.stranded) if missing else {}
                if not stranded:
                    break
                assert self.unstick is not None
                for name, n in stranded.items():
                    self.unstuck[name] = max(n, self.unstuck.get(name, 0))
                self.unstick_rounds += 1
                await self.unstick(list(stranded))
                missing = await self._wait_accounted(publisher, ledger, drain, stall=20)
            if missing:
                missing = await self._wait_accounted(publisher, ledger, drain)
            seconds["until_accounted"] = round(time.monotonic() - t0, 2)
            await self._settle()
            alive_before_stop = [w.alive() for w in pool.workers]
            exit_codes = await asyncio.to_thread(pool.terminate, 5.0)
            await self._drain_rest(drain)
            # Whatever is still in the work queue or a tier (the stop returned every unacked
            # delivery) is a leftover copy of an id already accounted for. Passive declares
            # count exactly; rabbitmqctl's counts of quorum queues lag by seconds.
            totals = await queue_depths(self.urls, queue_names(self.queue))
            residual = sum(max(0, n) for name, n in totals.items() if not name.endswith(".dlq"))
        finally:
            progress.cancel()
            drain.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(drain_task, 15)
            await publisher.close()
            pool.close()
        ledger.refresh()
        seconds["total"] = round(time.monotonic() - t_start, 2)
        seconds["window"] = round(window, 2)
        summary = account(
            self.name,
            rng_seed,
            self.queue,
            publisher,
            ledger,
            drain,
            residual,
            injector.faults,
            self.allowed_dead(),
            exit_codes,
            pool.events(),
            seconds,
        )
        summary.stranded = self.unstuck
        summary.unstick_rounds = self.unstick_rounds
        if missing:
            summary.notes.append(
                f"{len(missing)} ids not accounted for when the wait ended; in the broker's "
                f"queues then: {totals}"
            )
        if not all(alive_before_stop):
            summary.notes.append(f"workers dead before the stop: {alive_before_stop}")
        return summary

    async def _progress(
        self,
        publisher: Publisher,
        ledger: Ledger,
        drain: DlqDrain,
        injector: Injector,
        path: Path,
    ) -> None:
        """Every 2 s, one line of counts to ``progress.log`` (to see where a run stalls)."""
        with open(path, "a") as out:
            while True:
                ledger.refresh()
                out.write(
                    f"{time.strftime('%H:%M:%S')} published={len(publisher.published)} "
                    f"publish_retries={publisher.retries} processed={len(ledger.processed)} "
                    f"dead={len(drain.records)} faults={[f.kind for f in injector.faults]}\n"
                )
                out.flush()
                await asyncio.sleep(2)

    async def _wait_accounted(
        self, publisher: Publisher, ledger: Ledger, drain: DlqDrain, stall: float | None = None
    ) -> list[str]:
        """Wait until every published id was processed or dead-lettered (bounded); with
        ``stall``, give up early when nothing moved for that many seconds."""
        deadline = time.monotonic() + self.settle_timeout
        last, moved_at = -1, time.monotonic()
        while True:
            ledger.refresh()
            missing = set(publisher.published) - ledger.processed - drain.ids
            if not missing or time.monotonic() > deadline:
                return sorted(missing)
            if len(missing) != last:
                last, moved_at = len(missing), time.monotonic()
            elif stall is not None and time.monotonic() - moved_at > stall:
                return sorted(missing)
            await asyncio.sleep(0.25)

    async def _settle(self, quiet: float = 1.5, timeout: float = 30) -> int:
        """Wait until the work queue and retry tiers stay empty for ``quiet`` seconds."""
        names = [n for n in queue_names(self.queue) if not n.endswith(".dlq")]
        deadline = time.monotonic() + timeout
        empty_since: float | None = None
        while time.monotonic() < deadline:
            depths = await queue_depths(self.urls, names)
            if all(d == 0 for d in depths.values()):
                empty_since = empty_since or time.monotonic()
                if time.monotonic() - empty_since >= quiet:
                    return 0
            else:
                empty_since = None
            await asyncio.sleep(0.25)
        return sum(max(0, d) for d in depths.values())

    def stranded(self) -> dict[str, int]:
        """Retry tiers holding messages that are neither ready nor unacked: dead-lettered by
        TTL but not moved back to the work queue (RabbitMQ's at-least-once dead-lettering).

        rabbitmqctl's counts of quorum queues are refreshed every few seconds, so a tier
        counts as stranded only if it holds such messages in two readings 6 s apart."""
        first = self._held()
        if not first:
            return {}
        time.sleep(6)
        second = self._held()
        return {name: n for name, n in second.items() if name in first}

    def _held(self) -> dict[str, int]:
        tiers = {n for n in queue_names(self.queue) if ".retry." in n}
        out = ctl(
            self.node,
            "list_queues",
            "name",
            "messages",
            "messages_ready",
            "messages_unacknowledged",
            "--no-table-headers",
        )
        found = {}
        for line in out.splitlines():
            fields = line.split("\t")
            if len(fields) == 4 and fields[0] in tiers and all(f.isdigit() for f in fields[1:]):
                held = int(fields[1]) - int(fields[2]) - int(fields[3])
                if held > 0:
                    found[fields[0]] = held
        return found

    async def _drain_rest(self, drain: DlqDrain, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        dlq = f"{self.queue}.dlq"
        while time.monotonic() < deadline:
            if (await queue_depths(self.urls, [dlq]))[dlq] <= 0:
                await asyncio.sleep(0.3)  # acks of the last deliveries
                return
            await asyncio.sleep(0.2)

    async def cleanup(self) -> None:
        if self.pool is not None:
            self.pool.close()
        await delete_queues(self.urls, queue_names(self.queue))
