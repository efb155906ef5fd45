"""``ChannelAcks``'s waiting, with a channel whose writes never complete (a connection that died
under aiormq's writer: its frame queue never frees room). What is written and when is tested
on RabbitMQ in ``tests/integration/test_ack_coalescing.py``."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import aiormq
from structlog.testing import capture_logs

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


class _FailingChannel:
    """A channel still open whose ack writes fail (not the usual closed-channel cause)."""

    def __init__(self) -> None:
        self.is_closed = False
        self.closed_by_us = False

    async def basic_ack(self, tag: int, multiple: bool = False, wait: bool = True) -> None:
        raise RuntimeError("frame queue broken")

    async def close(self) -> None:
        self.closed_by_us = True
        self.is_closed = True


async def test_a_failed_ack_write_on_an_open_channel_is_logged_and_closes_the_channel() -> None:
    """Booked acks that cannot be written must not leave their messages unacked on a live
    channel forever: the channel is closed, so the broker gives them back (duplicates, never
    a wedge), and the failure is logged once."""
    channel = _FailingChannel()
    acks = ChannelAcks(cast(aiormq.abc.AbstractChannel, channel))
    with capture_logs() as logs:
        acks.book(1)
        await asyncio.wait_for(acks.written(1), 5)
    assert channel.closed_by_us
    assert [(e["event"], "frame queue broken" in e["error"]) for e in logs] == [
        ("acks.write_failed", True)
    ]
