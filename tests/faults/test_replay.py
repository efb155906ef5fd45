"""``qworker dlq replay`` killed with SIGKILL mid-way, then run again: nothing is lost.

Messages in mode ``replay`` fail permanently until they come back from the DLQ with
``x-qworker-replay-count`` set (an operator "fixed" them). A replay subprocess is killed at a
random moment while it publishes (several times at full size); a last replay finishes the job.
Every id must end processed (each handled copy carries the replay count) or still in the DLQ;
ids replayed twice (a copy confirmed, the dead letter's ack lost in the kill) are counted.
"""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from qworker import App
from tests.faults.fault_app import worker_env
from tests.faults.nodes import ROOT
from tests.faults.scenario import delete_queues, queue_depths, queue_names
from tests.faults.size import SIZE, seed
from tests.faults.stream import DlqDrain, Ledger
from tests.support.broker import eventually
from tests.support.workers import WorkerPool

pytestmark = [pytest.mark.faults, pytest.mark.rabbitmq, pytest.mark.timeout(SIZE.timeout)]


def replay(url: str, dlq: str, log: Path, *args: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "qworker", "dlq", "replay", dlq, "--url", url, *args],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


async def test_replay_killed_mid_way_loses_nothing(broker_url: str, tmp_path: Path) -> None:
    """Dead letters replayed by a ``qworker dlq replay`` that is SIGKILLed mid-way, then replayed
    again to the end: every id is processed once replayed or is still in the DLQ (lost = 0)."""
    rng = random.Random(run_seed := seed())
    queue = f"qwf.r{uuid.uuid4().hex[:10]}"
    count = 300 if SIZE.name == "ci" else 5_000
    kills = 1 if SIZE.name == "ci" else 3
    for sub in ("ledger", "logs"):
        (tmp_path / sub).mkdir()
    env = worker_env([broker_url], f"qwf-w-{queue}", queue, tmp_path / "ledger", tmp_path)
    pool = WorkerPool(
        "tests.faults.fault_app:app", env, tmp_path / "logs", 2, ["--log-format", "json"]
    )
    ledger = Ledger(tmp_path / "ledger")
    ids = [f"{queue}-{i:05d}" for i in range(count)]
    dlq = f"{queue}.dlq"
    killed_at: list[int] = []
    codes: list[int] = []
    try:
        await asyncio.to_thread(pool.start)
        async with App(broker_url, name=f"qwf-p-{queue}") as app:
            for i in ids:
                await app.publish(queue, {"id": i, "mode": "replay"}, message_id=i)

        async def dead_letters() -> int:
            return (await queue_depths([broker_url], [dlq]))[dlq]

        async def all_dead() -> bool:
            return await dead_letters() >= count

        await eventually(all_dead, 60, 0.2, "dead letters did not arrive")
        assert not ledger.processed

        for k in range(kills):
            proc = replay(broker_url, dlq, tmp_path / "replay.log", "--rate", "150")
            target = len(ledger.processed) + rng.randint(count // 10, count // 4)
            deadline = time.monotonic() + 60
            while len(ledger.processed) < min(target, count - 1) and proc.poll() is None:
                assert time.monotonic() < deadline, "replay made no progress"
                await asyncio.sleep(0.02)
                ledger.refresh()
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                killed_at.append(len(ledger.processed))
            codes.append(proc.wait(30))
            assert k < kills - 1 or killed_at, "the replay finished before it could be killed"
        final = replay(broker_url, dlq, tmp_path / "replay.log")
        codes.append(await asyncio.to_thread(final.wait, 120))

        deadline = time.monotonic() + 60
        while set(ids) - ledger.processed and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            ledger.refresh()
        assert await asyncio.to_thread(pool.terminate, 5.0) == [0, 0]
        # Whatever is still dead-lettered: drain it, by id.
        drain = DlqDrain([broker_url], dlq)
        task = asyncio.create_task(drain.run())
        await asyncio.sleep(1.0)
        for _ in range(150):  # at most 30 s
            if await dead_letters() <= 0:
                break
            await asyncio.sleep(0.2)
        drain.stop()
        await asyncio.wait_for(task, 15)
    finally:
        pool.close()
        await delete_queues([broker_url], queue_names(queue))

    ledger.refresh()
    processed = Counter(s.message_id for s in ledger.successes)
    lost = set(ids) - set(processed) - drain.ids
    duplicates = sum(c - 1 for c in processed.values() if c > 1)
    print(
        f"\nreplay [{SIZE.name}, seed {run_seed}]: {count} dead letters, replay killed at "
        f"{killed_at} handled, exit codes {codes}, processed {len(processed)}, still dead "
        f"{len(drain.ids)}, lost {len(lost)}, duplicates {duplicates}\n"
        f"  log: {tmp_path / 'replay.log'}"
    )
    assert len(killed_at) == kills
    assert codes[:kills] == [-signal.SIGKILL] * kills and codes[-1] == 0, codes
    assert not lost, sorted(lost)[:10]
    assert set(processed) == set(ids), "the last replay left dead letters behind"
