"""The I/O floors of the DLQ tool: what reading and moving dead letters cost without qworker.

Two hand-written aiormq loops over a DLQ, doing only what the ``qworker dlq`` commands
must do on the wire, with none of their Python work (records, filters, grouping, JSON):

* :func:`read_floor` is the floor of ``stats``, ``ls`` and ``export``: consume with manual
  acks, hold every message (a consumer of ``window`` unacked messages, replaced by a fresh
  one when it has used its window, as :class:`qworker.dlq.cursor.Cursor` does), then give
  everything back with ``basic.nack(multiple, requeue)`` frames of 32, as the cursor does.
* :func:`move_floor` is the floor of ``replay --to``: consume, publish each message (body
  and properties as delivered) to a target with publisher confirms, ``window`` outstanding,
  and ack each original once its copy is confirmed.

Both decode headers with qworker's field codec (:mod:`qworker.wire`, installed into pamqp
on import), as the tool does, so the floor includes the header decoding the tool cannot
avoid. Each returns wall seconds, the rate, this process's CPU seconds and, when the
broker's OS pid is given, the broker's CPU seconds over the same interval.

Used by ``bench/dlq_scale.py``; alone::

    python bench/dlq_floor.py read QUEUE [--window 1000]
    python bench/dlq_floor.py move QUEUE TARGET [--window 100]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import time
from typing import Any

import aiormq
from aiormq.abc import DeliveredMessage

import qworker.wire  # noqa: F401  (installs qworker's AMQP field codec into pamqp)

URL = os.environ.get("QWORKER_URL", "amqp://guest:guest@127.0.0.1/")
#: Returned messages per ``basic.nack(multiple=True)``, as the cursor gives them back.
GIVE_BACK_BATCH = 32


def process_cpu(pid: int | None) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (None without a pid)."""
    if pid is None:
        return None
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Meter:
    """Wall, own CPU and (optionally) the broker's CPU from construction to :meth:`done`."""

    def __init__(self, broker_pid: int | None) -> None:
        self._pid = broker_pid
        self._broker0 = process_cpu(broker_pid)
        self._cpu0 = time.process_time()
        self._wall0 = time.perf_counter()

    def done(self, n: int) -> dict[str, Any]:
        wall = time.perf_counter() - self._wall0
        broker = process_cpu(self._pid)
        return {
            "n": n,
            "seconds": wall,
            "rate": n / wall if wall else 0.0,
            "client_cpu_s": time.process_time() - self._cpu0,
            "broker_cpu_s": None if broker is None else broker - (self._broker0 or 0.0),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }


async def read_floor(
    queue: str, *, window: int = 1000, url: str = URL, broker_pid: int | None = None
) -> dict[str, Any]:
    """Hold every message of ``queue`` (as ready at the start), then give all back in order.

    Args:
        queue: The queue to read; it is unchanged afterwards.
        window: Unacked messages per consumer (the cursor's default is 1000).
        url: The broker.
        broker_pid: The broker's OS pid, to report its CPU time over the pass.
    """
    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel()
        declared = await channel.queue_declare(queue, passive=True)
        depth = int(declared.message_count or 0)
        await channel.basic_qos(prefetch_count=window)
        seen = 0
        last_tag = 0
        all_read = asyncio.Event()

        async def on_delivery(message: DeliveredMessage) -> None:
            nonlocal seen, last_tag
            seen += 1
            last_tag = int(message.delivery.delivery_tag or 0)
            if seen >= depth:
                all_read.set()

        consumers = 0

        async def consume() -> str:
            nonlocal consumers
            consumers += 1
            tag = f"floor-{consumers:08d}"
            await channel.basic_consume(queue, on_delivery, consumer_tag=tag)
            return tag

        meter = _Meter(broker_pid)
        tag = await consume()
        rolled_at = 0
        while depth and not all_read.is_set():
            if seen - rolled_at >= window:
                await channel.basic_cancel(tag)
                rolled_at = seen
                tag = await consume()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_read.wait(), 0.002)
        read = meter.done(seen)
        await channel.basic_cancel(tag)
        began = time.perf_counter()
        for upto in range(GIVE_BACK_BATCH, last_tag + GIVE_BACK_BATCH, GIVE_BACK_BATCH):
            await channel.basic_nack(min(upto, last_tag), multiple=True, requeue=True)
        read["give_back_s"] = time.perf_counter() - began
        read["consumers"] = consumers
        return read
    finally:
        await connection.close()


async def move_floor(
    queue: str,
    target: str,
    *,
    window: int = 100,
    url: str = URL,
    broker_pid: int | None = None,
) -> dict[str, Any]:
    """Move every message of ``queue`` to ``target`` (which must exist), confirm before ack.

    Args:
        queue: The queue to empty.
        target: The queue the copies go to.
        window: Copies awaiting their confirm at once (``qworker dlq replay``'s default: 100).
        url: The broker.
        broker_pid: The broker's OS pid, to report its CPU time over the move.
    """
    connection = await aiormq.connect(url)
    try:
        reading = await connection.channel()
        publishing = await connection.channel(publisher_confirms=True)
        await publishing.queue_declare(target, passive=True)
        depth = int((await reading.queue_declare(queue, passive=True)).message_count or 0)
        await reading.basic_qos(prefetch_count=1000)
        slots = asyncio.Semaphore(window)
        moved = 0
        all_moved = asyncio.Event()
        tasks: set[asyncio.Task[None]] = set()

        async def move(message: DeliveredMessage) -> None:
            nonlocal moved
            try:
                await publishing.basic_publish(
                    message.body, routing_key=target, properties=message.header.properties
                )
                await reading.basic_ack(message.delivery.delivery_tag)
            finally:
                slots.release()
            moved += 1
            if moved >= depth:
                all_moved.set()

        async def on_delivery(message: DeliveredMessage) -> None:
            await slots.acquire()
            task = asyncio.create_task(move(message))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        meter = _Meter(broker_pid)
        if depth:
            await reading.basic_consume(queue, on_delivery)
            await all_moved.wait()
        return meter.done(moved)
    finally:
        await connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["read", "move"])
    parser.add_argument("queue")
    parser.add_argument("target", nargs="?")
    parser.add_argument("--window", type=int)
    parser.add_argument("--broker-pid", type=int)
    args = parser.parse_args()
    if args.mode == "read":
        result = asyncio.run(
            read_floor(args.queue, window=args.window or 1000, broker_pid=args.broker_pid)
        )
    else:
        if not args.target:
            parser.error("move needs a TARGET queue")
        result = asyncio.run(
            move_floor(
                args.queue, args.target, window=args.window or 100, broker_pid=args.broker_pid
            )
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
