"""Exclusion: shared runs side by side, a quarantined run alone, waiting alone runs first."""

from __future__ import annotations

import asyncio

from qworker.exclusion import Exclusion


async def test_shared_runs_overlap_and_an_alone_run_waits_for_them_and_blocks_new_ones() -> None:
    """An alone run starts only when no shared run is running; shared runs arriving while it
    waits or runs wait for it."""
    exclusion = Exclusion()
    log: list[str] = []
    release = asyncio.Event()

    async def shared(name: str, hold: asyncio.Event | None = None) -> None:
        async with exclusion.shared:
            log.append(f"{name}+")
            if hold is not None:
                await hold.wait()
            await asyncio.sleep(0)
            log.append(f"{name}-")

    async def alone() -> None:
        async with exclusion.alone():
            log.append("alone+")
            await asyncio.sleep(0.01)
            log.append("alone-")

    first = asyncio.create_task(shared("s1", release))
    second = asyncio.create_task(shared("s2", release))
    await asyncio.sleep(0)
    solo = asyncio.create_task(alone())
    await asyncio.sleep(0)
    late = asyncio.create_task(shared("s3"))  # arrives while alone waits: must wait too
    await asyncio.sleep(0.01)
    assert log == ["s1+", "s2+"]
    release.set()
    await asyncio.gather(first, second, solo, late)
    assert log.index("alone+") > max(log.index("s1-"), log.index("s2-"))
    assert log.index("s3+") > log.index("alone-")


async def test_shared_runs_do_not_wait_when_nothing_runs_alone() -> None:
    """The common path: no alone run, no waiting."""
    exclusion = Exclusion()
    entered = 0

    async def shared() -> None:
        nonlocal entered
        async with exclusion.shared:
            entered += 1
            await asyncio.sleep(0.01)

    await asyncio.wait_for(asyncio.gather(*(shared() for _ in range(50))), 1)
    assert entered == 50


async def test_a_quarantine_move_wakes_the_poller_at_once() -> None:
    """The poller waits for its (growing) idle interval, or until this process quarantines a
    delivery of the handler: then it looks at once."""
    import time

    exclusion = Exclusion()
    started = time.monotonic()
    waiting = asyncio.create_task(exclusion.quarantined(5.0))
    await asyncio.sleep(0.05)
    exclusion.wake()
    await asyncio.wait_for(waiting, 1)
    assert time.monotonic() - started < 1.0
    started = time.monotonic()
    await exclusion.quarantined(0.1)  # no wake: the interval runs out
    assert time.monotonic() - started >= 0.09
