"""Where the peer benchmark's qworker worker gets its peak RSS: RSS at each step, in-process.

Runs the worker of ``contenders/_qworker_common.py`` (the app, handler and ``Worker`` the peer
benchmark measures) inside this process on N preloaded messages and prints VmRSS and VmHWM
after: the harness's import, qworker's and the contender's imports, the app, the first call,
100, 1,000 and 2,000 calls, the last message and the stop. The preload runs in a child
process, as the harness does it, so it adds nothing here. The queues are deleted at the end.

    python3 bench/rss_milestones.py S3 [--queue-type quorum] [--n 3000]
    PYTHON=bench/.venv/bin/python ...   # the same in the benchmark's venv (bench/venv.sh)

Use it to see which step a change moved, not for totals: the peak RSS that counts is the
harness's (``bench/run.sh``), which differs from these by up to about 0.6 MiB either way (this
script's own imports; the harness's child process).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import subprocess
import sys
import tempfile
import types
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: The shared harness, found as bench/run.py finds it (not imported from there: run.py's own
#: imports would be counted in the first figures).
HARNESS = next(
    (
        str(path)
        for path in (
            Path(os.environ.get("BENCH_HARNESS") or "/nonexistent"),
            HERE.parent.parent / "shared" / "bench",
            Path("/work/shared/bench"),
        )
        if (path / "peers_bench.py").is_file()
    ),
    "",
)
COMMON = HERE / "contenders" / "_qworker_common.py"
#: Call counts at which RSS is recorded (the worker runs 100 deliveries at once).
CALL_MARKS = (1, 100, 1000, 2000)


def rss_mib() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MiB."""
    values: dict[str, float] = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, value = line.split(":")
                values[name] = int(value.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def load_common() -> types.ModuleType:
    """The contender's shared module, imported from its file (``contenders`` is the harness's
    package name too)."""
    spec = importlib.util.spec_from_file_location("_qworker_common", COMMON)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PRELOAD = """
import importlib.util, json, sys
sys.path.insert(0, {harness!r})
from bench_common import Ctx
spec = importlib.util.spec_from_file_location("_qworker_common", {common!r})
common = importlib.util.module_from_spec(spec); spec.loader.exec_module(common)
common.publish(Ctx(**json.loads(sys.argv[1])), {queue_type!r})
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=("S1", "S2", "S3"))
    parser.add_argument("--queue-type", choices=("quorum", "classic"), default="quorum")
    parser.add_argument("--n", type=int, default=3000)
    args = parser.parse_args()
    marks: list[tuple[str, tuple[float, float]]] = [("interpreter", rss_mib())]

    if not HARNESS:
        raise SystemExit("the shared harness (peers_bench.py) was not found; set BENCH_HARNESS")
    harness = HARNESS
    sys.path.insert(0, harness)
    import dataclasses
    import json

    from bench_common import Ctx, Reporter

    marks.append(("harness's bench_common", rss_mib()))
    common = load_common()
    marks.append(("qworker + pydantic model", rss_mib()))

    run = uuid.uuid4().hex[:8]
    counter = Path(tempfile.mkdtemp()) / "counter"
    counter.write_bytes(b"\0" * 64)
    queue = f"bench.rss.{run}"
    ctx = Ctx(
        contender="qworker_c",
        scenario=args.scenario,
        n=args.n,
        run_id=run,
        queue=queue,
        dlq=f"{queue}.dlq",
        counter_path=str(counter),
    )
    code = PRELOAD.format(harness=harness, common=str(COMMON), queue_type=args.queue_type)
    subprocess.run([sys.executable, "-c", code, json.dumps(dataclasses.asdict(ctx))], check=True)

    import aio_pika

    from qworker import Worker
    from qworker.logging import configure_logging

    # The worker's JSON lines go where the harness's log file would take them.
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    configure_logging("json")
    report = Reporter(str(counter))
    app = common.build_app(ctx, args.queue_type, report)
    worker = Worker(app, concurrency=ctx.prefetch, prefetch=ctx.prefetch)
    marks.append(("app and worker built", rss_mib()))

    async def serve() -> None:
        task = asyncio.create_task(worker.run())
        pending = list(CALL_MARKS)
        finished = report.calls if args.scenario == "S3" else report.done_count
        while finished < args.n:
            await asyncio.sleep(0.02)
            while pending and report.calls >= pending[0]:
                marks.append((f"{pending.pop(0):,} calls", rss_mib()))
            finished = report.calls if args.scenario == "S3" else report.done_count
        marks.append(("last message handled", rss_mib()))
        worker.stop()
        await task
        marks.append(("stopped", rss_mib()))
        connection = await aio_pika.connect(ctx.amqp_url)
        async with connection:
            channel = await connection.channel()
            for spec in app.topology():
                await channel.queue_delete(spec.name)

    try:
        asyncio.run(serve())
    finally:
        for name, (rss, hwm) in marks:
            print(f"{name:26s} RSS {rss:6.1f} MiB  peak {hwm:6.1f} MiB", file=sys.stderr)


if __name__ == "__main__":
    main()
