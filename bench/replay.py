"""The DLQ tool's speed: replay against raw aio-pika confirmed publishing, show and stats.

In one run, on the local broker:
  1. the harness's broker ceiling: raw aio-pika publishing N persistent messages with publisher
     confirms, 100 outstanding (``ceiling.py``'s ``confirm_win100``);
  2. N dead letters (full ``x-qworker-*`` context) loaded into a qworker quorum DLQ and replayed
     to their origin queue with ``qworker.dlq.replay`` (library API, confirms, default window);
  3. ``show --limit 20`` (``qworker.dlq.browse``) and ``stats`` (``qworker.dlq.stats``) on DLQs of
     each ``--sizes`` (show should stay constant, stats grow linearly).
Reps are interleaved; medians are reported, replay as a ratio to the ceiling.

    python bench/replay.py                         # N=10000, sizes 10000 100000, 3 reps
    python bench/replay.py --n 2000 --sizes 2000 --reps 1    # quick look
Writes bench/results/replay-<date>.md and .json (BENCH_RESULTS_DIR to move them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from datetime import date
from pathlib import Path
from typing import Any

import aio_pika

from qworker import dlq, failures
from qworker import headers as h
from qworker.topology import declare, queue_specs

HERE = Path(__file__).resolve().parent
URL = "amqp://guest:guest@127.0.0.1:5672/"
WINDOW = 500


def harness() -> Path:
    """The shared peer harness (for ``ceiling.py``)."""
    for candidate in (os.environ.get("BENCH_HARNESS"), HERE.parent.parent / "shared" / "bench"):
        if candidate and (Path(candidate) / "ceiling.py").exists():
            return Path(candidate)
    return Path("/work/shared/bench")


def dead_letter_headers(queue: str, i: int) -> dict[str, Any]:
    try:
        raise LookupError(f"customer {i} not found")
    except LookupError as exc:
        error = failures.ErrorInfo.from_exception(exc)
    origin = h.Origin(queue, "bench.replay:handle", "", queue, "bench:1")
    return h.failure_headers(
        {},
        error=error,
        attempt=1,
        classification="permanent",
        origin=origin,
        reason="permanent_error",
    )


async def load(connection: aio_pika.abc.AbstractConnection, queue: str, n: int) -> None:
    """Declare qworker's topology for ``queue`` and put ``n`` dead letters in ``queue.dlq``."""
    await declare(connection, queue_specs(queue, "quorum", 10, [1000]))
    channel = await connection.channel(publisher_confirms=True)
    headers = dead_letter_headers(queue, 0)
    body = json.dumps({"order_id": "x" * 150}).encode()
    for start in range(0, n, WINDOW):
        await asyncio.gather(
            *(
                channel.default_exchange.publish(
                    aio_pika.Message(body, headers=headers, message_id=f"m-{i}", delivery_mode=2),
                    routing_key=f"{queue}.dlq",
                )
                for i in range(start, min(n, start + WINDOW))
            )
        )
    await channel.close()


async def drop(connection: aio_pika.abc.AbstractConnection, queue: str) -> None:
    channel = await connection.channel()
    for name in (queue, f"{queue}.dlq", f"{queue}.retry.1s"):
        await channel.queue_delete(name)
    await channel.close()


async def replay_rate(n: int) -> float:
    queue = f"bench.replay.{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect(URL)
    try:
        await load(connection, queue, n)
        started = time.perf_counter()
        result = await dlq.replay(connection, f"{queue}.dlq")
        elapsed = time.perf_counter() - started
        if result.replayed != n:
            raise SystemExit(f"replay moved {result.replayed} of {n}: {result.error}")
        return n / elapsed
    finally:
        await drop(connection, queue)
        await connection.close()


async def inspection(size: int) -> tuple[float, float]:
    """Seconds for ``show --limit 20`` and for ``stats`` on a DLQ of ``size`` dead letters."""
    queue = f"bench.inspect.{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect(URL)
    try:
        await load(connection, queue, size)
        shown: list[Any] = []
        started = time.perf_counter()
        await dlq.browse(connection, f"{queue}.dlq", shown.append, limit=20)
        show = time.perf_counter() - started
        started = time.perf_counter()
        _, report = await dlq.stats(connection, f"{queue}.dlq")
        grouped = time.perf_counter() - started
        if len(shown) != 20 or report.matched != size:
            raise SystemExit(f"inspection saw {len(shown)} / {report.matched} of {size}")
        return show, grouped
    finally:
        await drop(connection, queue)
        await connection.close()


async def ceiling_rate(n: int) -> float:
    sys.path.insert(0, str(harness()))
    import ceiling  # type: ignore[import-not-found]

    result = await ceiling.run_mode(URL, "confirm_win100", n, 200, 300)
    return float(result.get("msgs_per_s") or n / result["seconds"])


async def main(args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[str, list[float]] = {"ceiling": [], "replay": []}
    for size in args.sizes:
        runs[f"show_{size}"], runs[f"stats_{size}"] = [], []
    for rep in range(args.reps):
        runs["ceiling"].append(await ceiling_rate(args.n))
        runs["replay"].append(await replay_rate(args.n))
        print(
            f"rep {rep + 1}: ceiling {runs['ceiling'][-1]:,.0f}/s replay "
            f"{runs['replay'][-1]:,.0f}/s",
            file=sys.stderr,
        )
        for size in args.sizes:
            show, grouped = await inspection(size)
            runs[f"show_{size}"].append(show)
            runs[f"stats_{size}"].append(grouped)
            print(f"  {size}: show {show:.2f}s stats {grouped:.2f}s", file=sys.stderr)
    return {key: statistics.median(values) for key, values in runs.items()} | {"runs": runs}


def report(summary: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"DLQ tool speed, median of {args.reps} (bench/replay.py), RabbitMQ on 127.0.0.1, "
        f"{os.cpu_count()} CPUs",
        "",
        "| measure | value | ratio |",
        "|---|---:|---:|",
        f"| raw aio-pika publish, confirms, 100 outstanding (N={args.n}) "
        f"| {summary['ceiling']:,.0f} msg/s | 1.00 |",
        f"| qworker dlq replay (library API, N={args.n}, quorum DLQ -> origin queue) "
        f"| {summary['replay']:,.0f} msg/s | {summary['replay'] / summary['ceiling']:.2f} |",
    ]
    for size in args.sizes:
        lines.append(
            f"| show --limit 20 on {size:,} dead letters | {summary[f'show_{size}']:.2f} s | |"
        )
        lines.append(f"| stats on {size:,} dead letters | {summary[f'stats_{size}']:.2f} s | |")
    return "\n".join(lines) + "\n"


def cli() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    summary = asyncio.run(main(args))
    text = report(summary, args)
    out = Path(os.environ.get("BENCH_RESULTS_DIR", HERE / "results"))
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"replay-{date.today().isoformat()}"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps({"args": vars(args), **summary}, indent=2))
    print(text)


if __name__ == "__main__":
    cli()
