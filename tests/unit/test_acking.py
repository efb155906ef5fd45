"""``ChannelAcks``'s waiting, with a channel whose writes never complete (a connection that died
under aiormq's writer: its frame queue never frees room). What is written and when is tested
on RabbitMQ in ``tests/integration/test_ack_coalescing.py``."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import aiormq

from qworker.acking import ChannelAcks


class _StuckChannel:
    is_closed = False

    def __init__(self) -> None:
        self.calls: list[tuple[int, bool]] = []

    async def basic_ack(self, tag: int, multiple: bool = False, wait: bool = True) -> None:
        self.calls.append((tag, multiple))
        await asyncio.Event().wait()  # the write queue never has room again


async def test_a_stop_waits_for_booked_acks_at_most_its_timeout() -> None:
    channel = _StuckChannel()
    acks = ChannelAcks(cast(aiormq.abc.AbstractChannel, channel))
    acks.book(1)
    acks.book(2)
    await asyncio.sleep(0)  # the writer plans 1-2 and blocks
    acks.book(3)  # a second writer waits for the first
    started = time.monotonic()
    await asyncio.wait_for(acks.written(0.2), 5)  # a regression fails here, not hangs
    waited = time.monotonic() - started
    assert 0.15 <= waited < 1.0
    assert channel.calls == [(2, True)]
    for task in asyncio.all_tasks():
        if task is not asyncio.current_task():
            cast(Any, task).cancel()
