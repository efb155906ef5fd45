#!/usr/bin/env python
"""Cost of the Prometheus ``Metrics`` observer on the success path.

    python bench/metrics_overhead.py [--n 10000] [--reps 3] [--queue-type quorum] [--ref REF]

Each run preloads N messages into a fresh queue, then starts one worker process
(``Worker(concurrency=100, prefetch=100)``, JSON logs to /dev/null, a pydantic
payload and a ``Context``, as the benchmark contenders do) with or without
``Metrics().attach(app)``, and times the first handler call to the N-th success.
Runs alternate (off, on, off, on, ...); the report is the median msg/s of each and
their ratio. ``--ref REF`` measures qworker as committed at REF (``git archive``), not
the working tree, for when others edit it meanwhile. Needs RabbitMQ on 127.0.0.1:5672
(or BENCH_URL).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import aio_pika
from pydantic import BaseModel

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.environ.get("BENCH_QWORKER_PATH") or REPO)

from qworker import App, Context, Worker  # noqa: E402
from qworker.logging import configure_logging  # noqa: E402

URL = os.environ.get("BENCH_URL", "amqp://guest:guest@127.0.0.1:5672/")
PAD = "x" * 200


class Payload(BaseModel):
    id: int
    pad: str


def build_app(queue: str, queue_type: str, on_done: object = None) -> App:
    app = App(URL, name=f"metrics-overhead-{queue}")
    state = {"n": 0, "first": 0.0, "first_cpu": 0.0}

    @app.handler(queue, queue_type=queue_type)  # type: ignore[arg-type]
    async def handle(payload: Payload, ctx: Context) -> None:
        if state["n"] == 0:
            state["first"] = time.perf_counter()
            state["first_cpu"] = time.process_time()
        state["n"] += 1
        if callable(on_done):
            on_done(state)

    return app


async def preload(queue: str, queue_type: str, n: int) -> None:
    app = build_app(queue, queue_type)
    async with app:
        await app.declare()
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        for start in range(0, n, 500):
            await asyncio.gather(
                *(
                    channel.default_exchange.publish(
                        aio_pika.Message(
                            json.dumps({"id": i, "pad": PAD}).encode(),
                            content_type="application/json",
                            message_id=str(i),
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        ),
                        routing_key=queue,
                    )
                    for i in range(start, min(start + 500, n))
                )
            )


async def delete(queue: str, queue_type: str) -> None:
    connection = await aio_pika.connect(URL)
    async with connection:
        for spec in build_app(queue, queue_type).topology():
            channel = await connection.channel()
            await channel.queue_delete(spec.name)


def worker(queue: str, queue_type: str, n: int, metrics: bool) -> None:
    """The measured process: prints {"msgs_per_s": ...} on stdout's last line."""
    configure_logging("json")
    result: dict[str, float] = {}
    holder: dict[str, Worker] = {}

    def on_done(state: dict[str, float]) -> None:
        if state["n"] == n:
            result["elapsed"] = time.perf_counter() - state["first"]
            result["cpu"] = time.process_time() - state["first_cpu"]
            holder["worker"].stop()

    app = build_app(queue, queue_type, on_done)
    if metrics:
        from qworker.metrics import Metrics

        Metrics().attach(app)
    w = holder["worker"] = Worker(app, concurrency=100, prefetch=100, grace=10)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, w.stop)
        await w.run()

    asyncio.run(serve())
    rates = {"msgs_per_s": n / result["elapsed"], "cpu_us": result["cpu"] / n * 1e6}
    sys.__stderr__.write(json.dumps(rates) + "\n")


def measure(n: int, queue_type: str, metrics: bool, env: dict[str, str]) -> tuple[float, float]:
    """(msg/s, CPU microseconds of the worker process per message)."""
    queue = f"bench.metrics.{uuid.uuid4().hex[:10]}"
    asyncio.run(preload(queue, queue_type, n))
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", queue, "--n", str(n), "--queue-type",
             queue_type, *(["--metrics"] if metrics else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=180, check=True,
            env=env,
        )  # fmt: skip
        result = json.loads(proc.stderr.strip().splitlines()[-1])
        return float(result["msgs_per_s"]), float(result["cpu_us"])
    finally:
        asyncio.run(delete(queue, queue_type))


def micro(count: int = 200_000) -> float:
    """Microseconds the observer calls of one successful delivery take (best of 5)."""
    import timeit

    from qworker.events import Outcome, OutcomeKind
    from qworker.metrics import Metrics

    metrics = Metrics()
    event = Outcome(OutcomeKind.SUCCEEDED, "q", "module:handler", "id", 1, 0.01)

    def one_delivery() -> None:  # what the consumer reports for one success
        metrics.in_flight("q", 1)
        metrics.outcome(event)
        metrics.in_flight("q", 0)

    return min(timeit.repeat(one_delivery, number=count, repeat=5)) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--queue-type", choices=["quorum", "classic"], default="quorum")
    parser.add_argument("--ref", help="measure qworker as committed at this git ref")
    parser.add_argument("--worker", metavar="QUEUE", help=argparse.SUPPRESS)
    parser.add_argument("--metrics", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.queue_type, args.n, args.metrics)
        return
    env = dict(os.environ)
    source = tempfile.mkdtemp(prefix="qworker-ref-") if args.ref else None
    if source:
        archive = subprocess.run(
            ["git", "-C", REPO, "archive", args.ref, "qworker"], check=True, capture_output=True
        )
        subprocess.run(["tar", "-x", "-C", source], input=archive.stdout, check=True)
        env["BENCH_QWORKER_PATH"] = source
        print(f"qworker at {args.ref}", flush=True)
    try:
        run_all(args, env)
    finally:
        if source:
            shutil.rmtree(source, ignore_errors=True)


def run_all(args: argparse.Namespace, env: dict[str, str]) -> None:
    rates: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}
    for rep in range(1, args.reps + 1):
        for metrics in (False, True):
            rate, cpu_us = measure(args.n, args.queue_type, metrics, env)
            rates[metrics].append(rate)
            cpu[metrics].append(cpu_us)
            label = "with metrics   " if metrics else "without metrics"
            print(f"rep {rep} {label}: {rate:,.0f} msg/s, {cpu_us:.0f} us CPU/msg", flush=True)
    off, on = statistics.median(rates[False]), statistics.median(rates[True])
    cpu_off, cpu_on = statistics.median(cpu[False]), statistics.median(cpu[True])
    print(
        f"N={args.n} {args.queue_type}, median of {args.reps}: without {off:,.0f} msg/s, "
        f"with {on:,.0f} msg/s, ratio with/without {on / off:.3f}; worker CPU per message "
        f"{cpu_off:.0f} us vs {cpu_on:.0f} us (ratio {cpu_on / cpu_off:.3f})"
    )
    best_off, best_on = max(rates[False]), max(rates[True])
    print(
        f"best run of each: without {best_off:,.0f} msg/s ({min(cpu[False]):.0f} us CPU/msg), "
        f"with {best_on:,.0f} msg/s ({min(cpu[True]):.0f} us CPU/msg), "
        f"ratio with/without {best_on / best_off:.3f}"
    )
    us = micro()
    print(
        f"observer calls per successful delivery: {us:.2f} us = {us * off / 1e4:.2f}% of the "
        f"{1e6 / off:.0f} us a delivery takes without metrics"
    )


if __name__ == "__main__":
    main()
