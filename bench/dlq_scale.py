"""The DLQ tool at incident scale (issue 15 part 2): the `qworker dlq` commands on big DLQs.

Run by hand, never in CI (1,000,000 dead letters are ~3 GB in the local broker):

    python bench/dlq_scale.py --sizes 10000 100000            # the curve, ~5 min
    python bench/dlq_scale.py --sizes 1000000 --out -          # the manual 1M run, ~25 min

For each size, on the local broker: fill ``bench.dlqscale.<id>.dlq`` (a quorum DLQ as qworker
declares it) with that many realistic dead letters (``console_scale.fill``: 12 failure kinds,
tracebacks of 1-3 KiB, 1000 outstanding confirms), then run each command as a user would, in
a subprocess whose wall time and peak RSS (``ru_maxrss`` of the child) are recorded:
``dlq stats``, ``dlq ls --sample 0``, ``dlq show --limit 20``, ``dlq export -o FILE``
(records/s), ``dlq replay --to TARGET`` (msg/s; ``TARGET`` a plain quorum queue, so nothing
consumes the copies). The raw floor for replay is ``console_scale.fill``'s own rate: raw
aio-pika confirmed publishing of the same messages with 1000 outstanding (headers built on the
way, so slower than a pure publish); the issue's yardstick, raw aio-pika confirmed publishing
with 100 outstanding (the peer harness's ``confirm_win100``), is measured before each replay.
Every queue is
deleted at the end, also after a failure; export files go to a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika

sys.path.insert(0, str(Path(__file__).resolve().parent))
from console_scale import URL, depth, drop, fill, git, machine
from dlq_floor import move_floor, read_floor
from replay import ceiling_rate

#: Commands get this long before they are killed (the 1M stats run takes ~1.5 min).
COMMAND_TIMEOUT = 1800


#: The first line of ``dlq stats``: ``Q: 221001 of 1000000 dead letters in ...`` when the
#: pass read fewer than were ready, else ``Q: 1000000 dead letters in ...``.
SCANNED = re.compile(r": (\d+)(?: of \d+)? dead letters")

#: Runs ``qworker`` in this interpreter and prints its own peak RSS (KiB) last on stderr.
LAUNCHER = (
    "import resource, runpy, sys\n"
    "sys.argv = ['qworker', *sys.argv[1:]]\n"
    "try:\n"
    "    runpy.run_module('qworker', run_name='__main__')\n"
    "finally:\n"
    "    print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measured(args: list[str]) -> dict[str, Any]:
    """Run ``qworker dlq ARGS``: wall seconds, exit code, the process's own peak RSS and CPU
    seconds, and how many dead letters a ``stats`` pass says it read (``scanned``)."""
    cpu0 = _children_cpu()
    began = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", LAUNCHER, "dlq", *args],
        capture_output=True,
        env={**os.environ, "QWORKER_URL": URL},
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    seconds = time.perf_counter() - began
    err = proc.stderr.decode(errors="replace")
    rss = [line.split()[1] for line in err.splitlines() if line.startswith("MAXRSS ")]
    out = proc.stdout.decode(errors="replace")
    read = SCANNED.search(out)
    return {
        "seconds": seconds,
        "cpu_s": _children_cpu() - cpu0,
        "scanned": int(read.group(1)) if read else None,
        "rc": proc.returncode,
        "stderr": err.replace(f"MAXRSS {rss[-1]}", "").strip()[-300:] if rss else err[-300:],
        "peak_rss_mib": int(rss[-1]) / 1024 if rss else float("nan"),
    }


async def prepare(queue: str, n: int) -> dict[str, Any]:
    connection = await aio_pika.connect(URL)
    try:
        filled = await fill(connection, queue, n)
        channel = await connection.channel()
        await channel.declare_queue(
            f"{queue}.target", durable=True, arguments={"x-queue-type": "quorum"}
        )
        await channel.close()
        filled["depth"] = await depth(connection, f"{queue}.dlq")
        return filled
    finally:
        await connection.close()


async def cleanup(queue: str) -> None:
    await drop(queue)
    connection = await aio_pika.connect(URL)
    try:
        channel = await connection.channel()
        await channel.queue_delete(f"{queue}.target")
    finally:
        await connection.close()


def one_size(n: int) -> dict[str, Any]:
    queue = f"bench.dlqscale.{uuid.uuid4().hex[:8]}"
    dlq = f"{queue}.dlq"
    row: dict[str, Any] = {"n": n}
    try:
        row["fill"] = asyncio.run(prepare(queue, n))
        row["show"] = measured(["show", dlq, "--limit", "20"])
        row["ls"] = measured(["ls", "--queue", dlq, "--sample", "0"])
        # The I/O floor of a reading pass, right before the commands that make one.
        row["read_floor"] = asyncio.run(read_floor(dlq))
        row["stats"] = measured(["stats", dlq])
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "export.jsonl"
            row["export"] = measured(["export", dlq, "-o", str(out)])
            row["export"]["records"] = sum(1 for _ in out.open()) if out.exists() else 0
            row["export"]["file_mib"] = out.stat().st_size / 2**20 if out.exists() else 0
        # The yardstick: raw aio-pika confirmed publishing, 100 outstanding (the peer
        # harness's ceiling, confirm_win100, small messages), measured right before.
        row["ceiling"] = asyncio.run(ceiling_rate(10_000))
        row["replay"] = measured(["replay", dlq, "--to", f"{queue}.target"])
        row["after"] = asyncio.run(_depths(queue))
        # The floor of a replay: the same messages moved back, confirm before ack, 100 out.
        row["move_floor"] = asyncio.run(move_floor(f"{queue}.target", dlq, window=100))
    finally:
        asyncio.run(cleanup(queue))
    return row


async def _depths(queue: str) -> dict[str, int]:
    connection = await aio_pika.connect(URL)
    try:
        return {
            "dlq": await depth(connection, f"{queue}.dlq"),
            "target": await depth(connection, f"{queue}.target"),
        }
    finally:
        await connection.close()


def report(rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    lines = [
        "# The DLQ tool at incident scale (bench/dlq_scale.py)",
        "",
        f"qworker {info['commit']}, {info['when']}, load {info['load']}, RabbitMQ local, "
        "quorum DLQ, realistic dead letters (console_scale.fill). Wall seconds and peak RSS "
        "of each `qworker dlq` command (a subprocess; its own peak RSS, ru_maxrss).",
        "",
        "| dead letters | fill (raw confirmed publish) msg/s | show --limit 20 s | ls --sample 0 s "
        "| stats s | export s (records/s) | replay s (msg/s, x fill, x confirm_win100) "
        "| peak RSS MiB show/ls/stats/export/replay | left: DLQ / target |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        fill_rate = r["fill"]["rate"]
        export, replay = r["export"], r["replay"]
        rss = "/".join(
            f"{r[k]['peak_rss_mib']:.0f}" for k in ("show", "ls", "stats", "export", "replay")
        )
        lines.append(
            f"| {r['n']:,} | {fill_rate:,.0f} | {r['show']['seconds']:.2f} | "
            f"{r['ls']['seconds']:.2f} | {r['stats']['seconds']:.1f} | "
            f"{export['seconds']:.1f} ({export['records'] / export['seconds']:,.0f}) | "
            f"{replay['seconds']:.1f} ({r['n'] / replay['seconds']:,.0f}, "
            f"{r['n'] / replay['seconds'] / fill_rate:.2f}, "
            f"{r['n'] / replay['seconds'] / r['ceiling']:.2f} of {r['ceiling']:,.0f}) | {rss} | "
            f"{r['after']['dlq']:,} / {r['after']['target']:,} |"
        )
    lines += [
        "",
        "Against the I/O floor (`bench/dlq_floor.py`: aiormq alone, qworker's field codec, no "
        "records, filters or output): the read floor holds every message and gives all back, "
        "like a pass; the move floor publishes each message with confirms (100 outstanding) "
        "and acks it after its confirm. x floor = floor seconds / command seconds (1.00: at "
        "the floor). CPU us/msg: the command process's user+system CPU per dead letter, "
        "start-up included; the floor's is its own process's.",
        "",
        "| dead letters | read floor s (msg/s, CPU us/msg) | stats read | ls --sample 0 s "
        "(x floor, CPU us/msg) | stats s (x floor, CPU us/msg) | export s (x floor, CPU us/msg) "
        "| move floor s (msg/s, CPU us/msg) | replay s (x floor, CPU us/msg) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        n, rf, mf = r["n"], r["read_floor"], r["move_floor"]

        def against(key: str, floor: dict[str, Any], n: int = n, r: dict[str, Any] = r) -> str:
            c = r[key]
            return (
                f"{c['seconds']:.1f} ({floor['seconds'] / c['seconds']:.2f}, "
                f"{1e6 * c['cpu_s'] / n:,.0f})"
            )

        scanned = r["stats"]["scanned"]
        read = "?" if scanned is None else f"{scanned:,}"
        lines.append(
            f"| {n:,} | {rf['seconds']:.1f} ({rf['rate']:,.0f}, "
            f"{1e6 * rf['client_cpu_s'] / n:,.0f}) | {read} | {against('ls', rf)} | "
            f"{against('stats', rf)} | {against('export', rf)} | "
            f"{mf['seconds']:.1f} ({mf['rate']:,.0f}, {1e6 * mf['client_cpu_s'] / n:,.0f}) | "
            f"{against('replay', mf)} |"
        )
    failed = [
        (r["n"], k, r[k]["rc"], r[k]["stderr"])
        for r in rows
        for k in ("show", "ls", "stats", "export", "replay")
        if r[k]["rc"] != 0
    ]
    if failed:
        lines += ["", "Commands that did not exit 0:", ""]
        lines += [f"- {n:,} {k}: exit {rc}: {err.strip()}" for n, k, rc, err in failed]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--out", default=None, help="results file (- for stdout)")
    args = parser.parse_args()
    info = {
        "commit": git("rev-parse", "--short", "HEAD"),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load": machine().get("load"),
    }
    rows = []
    for n in sorted(args.sizes):
        print(f"[dlq_scale] {n:,} ...", file=sys.stderr, flush=True)
        rows.append(one_size(n))
        print(report(rows[-1:], info), file=sys.stderr, flush=True)
    text = report(rows, info)
    if args.out == "-":
        print(text)
        return
    out = Path(args.out or Path(__file__).parent / "results" / "2026-11-29-dlq-scale.md")
    out.write_text(text)
    print(f"[dlq_scale] {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
