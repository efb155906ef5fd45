#!/usr/bin/env python
"""Who uses the 2 cores while the harness measures: the broker, the worker's process tree, the rest.

    python bench/cpu_sampler.py OUT.json SECONDS      # next to a running peers_bench.py

Every 0.2 s: the CPU time (user + system) of ``beam.smp``, of the harness's worker process and
all its descendants (``bench_child.py <contender> worker``, found by its command line; contender,
scenario, N and the counter file are read from its ``BENCH_CTX``), and the machine's busy time
from ``/proc/stat``. An interval counts when both its ends fall in one run's measured window:
the first handler call seen in the counter file, and the end not reached yet (S1/S2: N
completions; S3: N handler calls, close to the harness's end, the dead-letter queue holding N).
OUT gets, per run id, the seconds of such intervals (``wall``) and the CPU seconds of each
part in them; divided by ``wall`` they are cores (of ``nproc``). Used for
``results/2026-11-29-processes.md``; it only reads ``/proc``, ~1% of a core.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import time

import psutil

LAYOUT = struct.Struct("<QQddd")  # bench_common's counter: calls, done, t_first, t_last, t_call
TICK = os.sysconf("SC_CLK_TCK")


def find_beam() -> psutil.Process | None:
    for p in psutil.process_iter(["name"]):
        if p.info["name"] == "beam.smp":
            return p
    return None


def machine() -> float:
    """Busy CPU seconds of the whole machine since boot."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (sum(v) - v[3] - v[4]) / TICK  # minus idle and iowait


_found: list = [None, None]


def find_worker() -> tuple[psutil.Process | None, dict | None]:
    p, ctx = _found
    if p is not None and p.is_running():
        return p, ctx
    _found[:] = [None, None]
    for p in psutil.process_iter(["cmdline"]):
        c = p.info["cmdline"] or []
        if len(c) >= 4 and c[1].endswith("bench_child.py") and c[3] == "worker":
            try:
                ctx = json.loads(p.environ()["BENCH_CTX"])
            except (psutil.Error, KeyError, ValueError):
                continue
            _found[:] = [p, ctx]
            return p, ctx
    return None, None


def tree_cpu(p: psutil.Process) -> dict[int, float]:
    out = {}
    try:
        procs = [p, *p.children(recursive=True)]
    except psutil.Error:
        return out
    for q in procs:
        try:
            t = q.cpu_times()
            out[q.pid] = t.user + t.system
        except psutil.Error:
            pass
    return out


def main() -> int:
    out_path, seconds = sys.argv[1], float(sys.argv[2])
    beam = find_beam()
    acc: dict[str, dict] = {}
    prev = None
    stop = time.time() + seconds
    while time.time() < stop:
        now = time.monotonic()
        worker, ctx = find_worker()
        active, cpu = False, {}
        if worker is not None and ctx is not None:
            try:
                with open(ctx["counter_path"], "rb") as f:
                    calls, done, t_first, _, _ = LAYOUT.unpack(f.read(LAYOUT.size))
                end = (calls if ctx["scenario"] == "S3" else done) >= ctx["n"]
                active = t_first > 0 and not end
            except (OSError, struct.error):
                pass
            cpu = tree_cpu(worker)
        try:
            t = beam.cpu_times() if beam else None
            beam_s = t.user + t.system if t else 0.0
        except psutil.Error:
            beam, beam_s = find_beam(), 0.0
        cur = {"t": now, "run": ctx and ctx["run_id"], "active": active, "cpu": cpu,
               "beam": beam_s, "busy": machine()}  # fmt: skip
        if prev and prev["active"] and active and prev["run"] == cur["run"]:
            a = acc.setdefault(ctx["run_id"], {"contender": ctx["contender"],
                               "scenario": ctx["scenario"], "wall": 0.0, "beam": 0.0,
                               "worker": 0.0, "busy": 0.0, "procs": 0})  # fmt: skip
            a["wall"] += now - prev["t"]
            a["beam"] += beam_s - prev["beam"]
            a["worker"] += sum(v - prev["cpu"][pid] for pid, v in cpu.items() if pid in prev["cpu"])
            a["busy"] += cur["busy"] - prev["busy"]
            a["procs"] = max(a["procs"], len(cpu))
            with open(out_path, "w") as f:
                json.dump(acc, f, indent=1)
        prev = cur
        time.sleep(0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
