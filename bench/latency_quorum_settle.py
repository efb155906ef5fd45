#!/usr/bin/env python
"""Acks sent right before a connection closes, on a quorum queue: do they count?

Found while measuring SIGTERM -> exit for ``bench/latency.py`` (issue 15, part 3): after a
clean ``qworker run`` drain on a quorum queue, some messages whose handler had finished (and
been acked) were back in the queue. This reproduces it without qworker, in raw aio-pika:

    python bench/latency_quorum_settle.py                 # 10 reps, close right after the acks
    python bench/latency_quorum_settle.py --pause 0.2     # wait 0.2 s between acks and close
    python bench/latency_quorum_settle.py --queue-type classic

Each rep: a fresh queue, 150 persistent messages, one consumer with prefetch 100 whose
handler sleeps 0.5 s and then acks (``await message.ack()``: written to the socket);
``basic.cancel`` once 100 have started; wait for the 100 handlers; optionally pause; close
the connection. Then read the queue back (basic.get) and count the ids that were acked and
are still there. Every loop is bounded; only 127.0.0.1; each queue is deleted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import uuid

import aio_pika

URL = "amqp://guest:guest@127.0.0.1:5672/"


async def one(queue_type: str, pause: float, backlog: int = 150) -> dict[str, int]:
    name = f"lat.settle.{uuid.uuid4().hex[:8]}"
    acked: set[int] = set()
    started = 0
    tasks: set[asyncio.Task[None]] = set()
    hundred = asyncio.Event()
    conn = await aio_pika.connect(URL)
    try:
        ch = await conn.channel()
        await ch.set_qos(prefetch_count=100)
        await ch.declare_queue(name, durable=True, arguments={"x-queue-type": queue_type})
        pub = await conn.channel()
        for i in range(backlog):
            body = json.dumps({"id": i}).encode()
            await pub.default_exchange.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=name,
            )

        async def handle(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal started
            started += 1
            if started >= 100:
                hundred.set()
            await asyncio.sleep(0.5)
            await message.ack()
            acked.add(json.loads(message.body)["id"])

        queue = await ch.get_queue(name)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            task = asyncio.create_task(handle(message))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        tag = await queue.consume(on_message)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(hundred.wait(), 30)
        await queue.cancel(tag)
        if tasks:
            await asyncio.wait(set(tasks), timeout=30)
        if pause:
            await asyncio.sleep(pause)
    finally:
        await conn.close()
    async with await aio_pika.connect(URL) as conn2:
        ch2 = await conn2.channel()
        q2 = await ch2.get_queue(name)
        left: list[int] = []
        for _ in range(backlog + 10):
            m = await q2.get(no_ack=True, fail=False)
            if m is None:
                break
            left.append(json.loads(m.body)["id"])
        await ch2.queue_delete(name)
    return {
        "acked": len(acked),
        "still_queued": len(left),
        "acked_but_still_queued": len(acked & set(left)),
        "lost": backlog - len(acked | set(left)),
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--pause", type=float, default=0.0)
    ap.add_argument("--queue-type", default="quorum", choices=["quorum", "classic"])
    args = ap.parse_args()
    hits = 0
    for rep in range(1, args.reps + 1):
        r = await one(args.queue_type, args.pause)
        hits += r["acked_but_still_queued"] > 0
        print(f"rep {rep}: {r}", flush=True)
    print(
        f"{args.queue_type}, pause {args.pause} s: acked messages back in the queue "
        f"in {hits} of {args.reps} reps"
    )


if __name__ == "__main__":
    asyncio.run(main())
