#!/usr/bin/env python
"""qworker's side of the peer benchmark (the shared harness lives in ../shared/bench).

    python bench/run.py                  # full comparison: every peer + both qworker
                                         # contenders, N=10000, 3 reps, broker ceiling;
                                         # writes bench/results/<date>.md and .json
    python bench/run.py --smoke          # CI: raw aio-pika + qworker, N=300, 1 rep; exit 1
                                         # if a qworker cell fails its checks (no speed asserts)
    python bench/run.py --scaling        # S1 at N=10,000 and N=100,000, raw vs qworker, 1 rep
    python bench/run.py --profile S1 S2 S3   # py-spy profile of the qworker worker (N=10000)

Options common to all modes:
    --qworker-ref REF   measure qworker as committed at REF (git archive into a temp dir put
                        first on PYTHONPATH) instead of the working tree / installed package;
                        use it when others are editing qworker/ while you measure
    -- ARGS             passed on to peers_bench.py (full and smoke modes)

The harness is found via $BENCH_HARNESS, else ../shared/bench next to the repository,
else /work/shared/bench. Results go to bench/results (BENCH_RESULTS_DIR); worker logs to
bench/results/logs (git-ignored).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import glob
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CONTENDERS = os.path.join(HERE, "contenders")
RESULTS = os.environ.get("BENCH_RESULTS_DIR") or os.path.join(HERE, "results")
LOGS = os.path.join(RESULTS, "logs")
#: Packages structlog imports at start-up when they are installed (its deprecated
#: ``threadlocal`` tries greenlet; ``dev`` imports colorama, and colorama ctypes). None is a
#: qworker dependency, but where one is installed (greenlet comes with SQLAlchemy's asyncio
#: support and with playwright, colorama with awscli) a qworker worker carries it: ~1.5 MiB
#: of RSS for both here. The results say which were importable.
STRUCTLOG_OPTIONAL = ("greenlet", "colorama")
PROFILES = os.path.join(HERE, "profiles")
QWORKER = ("qworker_c", "qworker_classic_c")
BASELINE = "raw_aiopika"
URL = "amqp://guest:guest@127.0.0.1:5672/"


def log(msg: str) -> None:
    print(f"[run.py {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def harness_dir() -> str:
    candidates = [
        os.environ.get("BENCH_HARNESS", ""),
        os.path.join(os.path.dirname(REPO), "shared", "bench"),
        "/work/shared/bench",
    ]
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, "peers_bench.py")):
            return os.path.abspath(c)
    raise SystemExit(f"peers_bench.py not found in any of {[c for c in candidates if c]}")


def git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", REPO, *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def qworker_source(ref: str | None, tmp: str) -> tuple[dict[str, str], dict]:
    """Environment for the children and a description of the qworker code measured."""
    env = dict(os.environ)
    env["BENCH_CONTENDERS_PATH"] = CONTENDERS
    env["BENCH_RESULTS_DIR"] = RESULTS
    if ref is None:
        try:
            import qworker

            info: dict = {"source": os.path.dirname(os.path.dirname(qworker.__file__))}
        except Exception as exc:  # a half-edited working tree: the cells will say so
            info = {"source": f"working tree (import failed: {exc!r})"}
        try:
            info["commit"] = git("rev-parse", "HEAD")
            info["dirty"] = bool(git("status", "--porcelain", "--", "qworker"))
        except (subprocess.CalledProcessError, OSError):
            pass
        return env, info
    commit = git("rev-parse", f"{ref}^{{commit}}")
    snap = os.path.join(tmp, "qworker-src")
    os.makedirs(snap)
    archive = subprocess.run(
        ["git", "-C", REPO, "archive", commit, "qworker"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", snap], input=archive, check=True)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (snap, env.get("PYTHONPATH")) if p)
    probe = subprocess.run(
        [sys.executable, "-c", "import qworker; print(qworker.__file__)"],
        env=env,
        cwd=tmp,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not probe.startswith(snap):
        raise SystemExit(f"snapshot of {ref} is not the qworker children import: {probe}")
    sys.path.insert(0, snap)  # the runner imports the contenders too (queues(), profiling)
    return env, {"source": f"git archive {commit}", "commit": commit, "dirty": False}


def peers_bench(env: dict[str, str], argv: list[str]) -> int:
    cmd = [sys.executable, os.path.join(harness_dir(), "peers_bench.py"), *argv]
    log(" ".join(cmd))
    return subprocess.run(cmd, env=env, cwd=harness_dir()).returncode


def interpreter() -> dict:
    """Which Python ran the benchmark, and which of :data:`STRUCTLOG_OPTIONAL` it can import
    (each one is in a qworker worker's peak RSS where it is installed)."""
    import importlib.util

    present = [name for name in STRUCTLOG_OPTIONAL if importlib.util.find_spec(name)]
    return {"prefix": sys.prefix, "executable": sys.executable, "structlog_optional": present}


def annotate(out_json: str, info: dict, mode: str) -> dict:
    """Record which qworker code was measured, in the JSON and under the Markdown table."""
    with open(out_json) as f:
        doc = json.load(f)
    doc["meta"]["qworker"] = info
    doc["meta"]["runner"] = f"bench/run.py ({mode})"
    environment = interpreter()
    doc["meta"]["interpreter"] = environment
    note = (
        f"\nqworker measured: {info.get('source')}"
        f"{' (commit ' + info['commit'][:12] + ')' if info.get('commit') else ''}"
        f"{' + uncommitted changes in qworker/' if info.get('dirty') else ''}; "
        f"runner: bench/run.py ({mode}); interpreter {environment['prefix']}, "
        f"importable of structlog's optional imports: "
        f"{', '.join(environment['structlog_optional']) or 'none'}.\n"
    )
    doc["markdown"] += note
    with open(out_json, "w") as f:
        json.dump(doc, f, indent=2)
    with open(os.path.splitext(out_json)[0] + ".md", "w") as f:
        f.write(doc["markdown"])
    return doc


def check_qworker_cells(doc: dict, names: tuple[str, ...]) -> int:
    """0 when every qworker cell ran and passed its checks, else 1 (speed is not judged)."""
    bad = 0
    for name in names:
        cells = [c for c in doc["cells"] if c["contender"] == name]
        if not cells:
            log(f"FAIL {name}: no cells ran")
            bad += 1
        for c in cells:
            if c["ok"]:
                log(f"ok   {name} {c['scenario']} r{c['rep']}: checks {c.get('checks')}")
            else:
                log(f"FAIL {name} {c['scenario']} r{c['rep']}: {c['error']}")
                for line in c.get("worker_log_tail", []):
                    log(f"     | {line}")
                bad += 1
    if bad:
        broker_dlx_hint()
    for c in doc["cells"]:
        if c["contender"] == BASELINE and not c["ok"]:
            log(f"warning: baseline {c['scenario']} failed too ({c['error']}): broker trouble?")
    return 1 if bad else 0


def broker_dlx_hint() -> None:
    """Say so when the broker cannot dead-letter at-least-once any more.

    RabbitMQ 3.10.8's at-least-once dead-letter worker crashes on an ``x-death`` array holding
    non-tables; after a few crashes its supervisor gives up and, node-wide, quorum queues stop
    dead-lettering: qworker's quorum retry tiers never return messages (S2 times out).
    """
    exe = shutil.which("rabbitmqctl")
    if not exe:
        return
    try:
        pid = subprocess.run([exe, "eval", "whereis(rabbit_fifo_dlx_sup)."], capture_output=True,
                             text=True, timeout=30).stdout.strip()  # fmt: skip
        crashes = subprocess.run(
            ["grep", "-c", "rabbit_fifo_dlx_sup", *glob.glob("/var/log/rabbitmq/*.log")],
            capture_output=True, text=True, timeout=30,
        ).stdout.split()  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return
    log(f"broker: whereis(rabbit_fifo_dlx_sup) = {pid}; log lines naming it: {crashes}")
    if pid == "undefined" or any(c.rsplit(":", 1)[-1] not in ("0", "1") for c in crashes):
        log("broker: the at-least-once dead-letter supervisor is down or has crashed (RabbitMQ "
            "3.10.8 bug, triggered by a forged x-death, see tests/faults/test_forged_headers.py); "
            "quorum retry tiers declared while it was down never return messages")  # fmt: skip


# --------------------------------------------------------------------------- modes


def run_full(args, env: dict[str, str], info: dict) -> int:
    out = os.path.join(RESULTS, f"{dt.date.today().isoformat()}.json")
    argv = ["--n", str(args.n or 10000), "--reps", str(args.reps or 3), "--out", out]
    if args.contenders:
        argv += ["--contenders", *args.contenders]
    rc = peers_bench(env, argv + args.rest)
    if os.path.exists(out):
        annotate(out, info, "full")
    return rc


def run_smoke(args, env: dict[str, str], info: dict) -> int:
    os.makedirs(LOGS, exist_ok=True)
    out = os.path.join(LOGS, "smoke.json")  # git-ignored: CI must not dirty the tree
    if os.path.exists(out):
        os.remove(out)
    names = tuple(args.contenders or QWORKER)
    argv = ["--contenders", BASELINE, *names, "--n", str(args.n or 300), "--reps", "1"]
    # N=300 takes about a second per cell; a stuck cell should not hold CI for 5 minutes.
    argv += ["--skip-ceiling", "--cell-timeout", "90", "--publish-timeout", "90"]
    argv += ["--out", out, *args.rest]
    rc = peers_bench(env, argv)
    if not os.path.exists(out):
        log(f"FAIL: peers_bench.py wrote no results (rc={rc})")
        return 1
    doc = annotate(out, info, "smoke")
    rc = check_qworker_cells(doc, names)
    for queue_type in ("quorum", "classic"):
        # The harness only counts dead letters; check their content too (SPEC section 4).
        check = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--context-check", queue_type],
            env=env, cwd=harness_dir(), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        for line in check.stderr.splitlines():
            log(f"     | {line}")
        if check.returncode != 0:
            log(f"FAIL dead-letter context ({queue_type}): rc={check.returncode}")
            rc = 1
    return rc


# --------------------------------------------------------------------------- context check

CHECK_N = 20
ISO_FIELDS = ("x-qworker-first-failure-at", "x-qworker-last-failure-at")


def dead_letter_problems(msg, queue: str, body: bytes) -> list[str]:
    """What is missing or wrong in one dead letter of the S3 handler (raises Permanent)."""
    hdr = dict(msg.headers or {})
    text = {k: v.decode() if isinstance(v, bytes) else v for k, v in hdr.items()}
    expected = {
        "x-qworker-attempt": 1,
        "x-qworker-error-type": "qworker.errors.Permanent",
        "x-qworker-error-message": "always fails",
        "x-qworker-classification": "permanent",
        "x-qworker-reason": "permanent_error",
        "x-qworker-queue": queue,
        "x-qworker-original-exchange": "",
        "x-qworker-original-routing-key": queue,
        "x-bench-user": "kept",
    }
    bad = [f"{k}={text.get(k)!r}, expected {v!r}" for k, v in expected.items() if text.get(k) != v]
    for k in ISO_FIELDS:
        try:
            at = dt.datetime.fromisoformat(str(text.get(k)))
            if at.utcoffset() != dt.timedelta(0):
                bad.append(f"{k}={text.get(k)!r} is not UTC")
        except ValueError:
            bad.append(f"{k}={text.get(k)!r} is not ISO 8601")
    tb = text.get("x-qworker-error-traceback")
    if not isinstance(tb, str) or "Traceback (most recent call last)" not in tb:
        bad.append(f"x-qworker-error-traceback missing or not a traceback: {tb!r:.80}")
    elif "qworker.errors.Permanent: always fails" not in tb or ", in handle" not in tb:
        bad.append(f"x-qworker-error-traceback lacks the handler frame or the error: {tb!r:.200}")
    elif len(tb.encode()) > 16 * 1024:
        bad.append("x-qworker-error-traceback above 16 KiB")
    handler = str(text.get("x-qworker-handler"))
    if not handler.endswith(":build_app.<locals>.handle"):
        bad.append(f"x-qworker-handler={handler!r}")
    if not re.fullmatch(r".+:\d+", str(text.get("x-qworker-worker"))):
        bad.append(f"x-qworker-worker={text.get('x-qworker-worker')!r}, expected host:pid")
    history = hdr.get("x-qworker-history")
    if not (isinstance(history, list) and len(history) == 1 and isinstance(history[0], dict)):
        bad.append(f"x-qworker-history={history!r}, expected one entry")
    elif {"attempt", "at", "error_type", "error_message"} - set(history[0]):
        bad.append(f"x-qworker-history entry lacks fields: {history[0]!r}")
    ours = json.dumps({k: v for k, v in text.items() if k.startswith("x-qworker-")}, default=str)
    if len(ours.encode()) >= 64 * 1024:
        bad.append("x-qworker-* headers above 64 KiB")
    if msg.body != body:
        bad.append("body changed")
    if msg.correlation_id != "corr-check" or not msg.message_id:
        bad.append(f"ids lost: message_id={msg.message_id!r} correlation={msg.correlation_id!r}")
    if int(msg.delivery_mode or 0) != 2 or msg.content_type != "application/json":
        bad.append(f"properties changed: {msg.delivery_mode!r} {msg.content_type!r}")
    return bad


async def _context_check(queue_type: str) -> int:
    """S3 with the contender's app: CHECK_N dead letters, each with the full error context."""
    import aio_pika

    sys.path.insert(0, harness_dir())
    os.environ["BENCH_CONTENDERS_PATH"] = CONTENDERS
    from bench_common import Ctx, Reporter, create_counter, encode_payload, make_payload
    from contenders import _qworker_common as common

    from qworker import Worker

    run_id = uuid.uuid4().hex[:10]
    queue = f"bench.qworker_check.{queue_type}.{run_id}"
    with tempfile.TemporaryDirectory() as tmp:
        counter = os.path.join(tmp, "counter")
        create_counter(counter)
        ctx = Ctx(contender="qworker_c", scenario="S3", n=CHECK_N, run_id=run_id, queue=queue,
                  dlq=f"{queue}.dlq", counter_path=counter, amqp_url=URL)  # fmt: skip
        app = common.build_app(ctx, queue_type, Reporter(counter))
        names = [spec.name for spec in app.topology()]
        payload = make_payload(0, run_id)
        conn = await aio_pika.connect(URL)
        try:
            async with app:
                await app.declare()
                for _ in range(CHECK_N):
                    await app.publish(queue, payload, headers={"x-bench-user": "kept"},
                                      correlation_id="corr-check")  # fmt: skip
            worker = Worker(app, concurrency=10, prefetch=10)
            task = asyncio.create_task(worker.run())
            ch = await conn.channel()
            depth, deadline = 0, time.monotonic() + 60
            while depth < CHECK_N and time.monotonic() < deadline and not task.done():
                await asyncio.sleep(0.1)
                q = await ch.declare_queue(ctx.dlq, passive=True)
                depth = q.declaration_result.message_count
            worker.stop()
            await asyncio.wait_for(task, 30)
            if depth != CHECK_N:
                print(f"{queue_type}: DLQ holds {depth}, expected {CHECK_N}", file=sys.stderr)
                return 1
            dlq = await ch.declare_queue(ctx.dlq, passive=True)
            problems: set[str] = set()
            for _ in range(CHECK_N):
                msg = await dlq.get(no_ack=False, timeout=5)
                problems.update(dead_letter_problems(msg, queue, encode_payload(payload)))
                await msg.ack()
            for p in sorted(problems):
                print(f"{queue_type}: {p}", file=sys.stderr)
            if not problems:
                print(
                    f"{queue_type}: {CHECK_N} dead letters carry the full context", file=sys.stderr
                )
            return 1 if problems else 0
        finally:
            ch = await conn.channel()
            for name in names:
                with contextlib.suppress(Exception):
                    await ch.queue_delete(name)
            await conn.close()


def run_scaling(args, env: dict[str, str], info: dict) -> int:
    names = tuple(args.contenders or (BASELINE, *QWORKER))
    rc = 0
    rows = []
    for n in args.sizes:
        out = os.path.join(RESULTS, f"scaling-n{n}-{dt.date.today().isoformat()}.json")
        argv = ["--contenders", *names, "--scenarios", "S1", "--n", str(n), "--reps", "1"]
        argv += ["--skip-ceiling", "--out", out, "--cell-timeout", str(max(300, n // 100))]
        argv += ["--publish-timeout", str(max(300, n // 50)), *args.rest]
        rc |= peers_bench(env, argv)
        doc = annotate(out, info, f"scaling N={n}")
        for r in doc["summary"]:
            cells = [c for c in doc["cells"] if c["contender"] == r["contender"] and c["ok"]]
            rows.append((n, r, cells[0].get("vmhwm_mib") if cells else None))
    lines = [
        "S1 success, 1 rep per cell, prefetch 100 (bench/run.py --scaling)\n",
        "| N | contender | msgs/s | x raw aio-pika | msgs/s incl. startup | peak RSS MiB "
        "| VmHWM MiB |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for n, r, hwm in rows:
        lines.append(
            f"| {n:,} | {r['label']} | {fmt(r.get('msgs_per_s'), ',.0f')} | "
            f"{fmt(r.get('ratio_to_baseline'), '.2f')} | "
            f"{fmt(r.get('msgs_per_s_incl_startup'), ',.0f')} | "
            f"{fmt(r.get('peak_rss_mib'), '.1f')} | {fmt(hwm, '.1f')} |"
        )
    lines.append(f"\nqworker measured: {info.get('source')}\n")
    md = "\n".join(lines) + "\n"
    with open(os.path.join(RESULTS, f"scaling-{dt.date.today().isoformat()}.md"), "w") as f:
        f.write(md)
    print(md)
    return rc


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


# --------------------------------------------------------------------------- profiling


async def _depth(queue: str) -> int | None:
    import aio_pika
    import aiormq

    conn = await aio_pika.connect(URL)
    try:
        ch = await conn.channel(publisher_confirms=False)
        try:
            q = await ch.declare_queue(queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None
        return q.declaration_result.message_count
    finally:
        await conn.close()


async def _delete(queues: list[str]) -> None:
    import aio_pika

    conn = await aio_pika.connect(URL)
    try:
        for q in queues:
            ch = await conn.channel(publisher_confirms=False)
            with contextlib.suppress(Exception):
                await ch.queue_delete(q)
    finally:
        await conn.close()


def profile_one(
    args, env: dict[str, str], info: dict, name: str, scenario: str, spy: bool = True
) -> dict:
    """Preload N, run the worker (under `py-spy record --format raw` when ``spy``) until the
    scenario's end, and measure the worker's CPU time from its first handler call to the end."""
    import psutil

    harness = harness_dir()
    sys.path.insert(0, harness)
    os.environ["BENCH_CONTENDERS_PATH"] = CONTENDERS
    import contenders
    from bench_common import CTX_ENV, CounterReader, Ctx, create_counter

    mod = contenders.load(name)
    run_id = uuid.uuid4().hex[:10]
    base = f"bench.{name}.{scenario}.{run_id}"
    work = tempfile.mkdtemp(prefix="qworker-profile.")
    counter = os.path.join(work, "counter")
    create_counter(counter)
    ctx = Ctx(
        contender=name,
        scenario=scenario,
        n=args.n or 10000,
        run_id=run_id,
        queue=base,
        dlq=f"{base}.dlq",
        counter_path=counter,
        amqp_url=URL,
        deadline=time.time() + 900,
        parent_pid=0,  # py-spy may be the worker's parent
    )
    names = mod.queues(ctx)
    cenv = dict(env, **{CTX_ENV: ctx.to_env(), "PYTHONUNBUFFERED": "1"})
    child = os.path.join(harness, "bench_child.py")
    raw = os.path.join(work, f"{name}-{scenario}.raw")
    result: dict = {"contender": name, "scenario": scenario, "n": ctx.n, "stacks": ""}
    try:
        subprocess.run(
            [sys.executable, child, name, "publish"], env=cenv, cwd=harness, check=True,
            stdout=subprocess.DEVNULL, timeout=600,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while asyncio.run(_depth(ctx.queue)) != ctx.n and time.monotonic() < deadline:
            time.sleep(0.2)
        wlog = open(os.path.join(work, "worker.log"), "wb")  # noqa: SIM115 -- closed below
        cmd = [sys.executable, child, name, "worker"]
        if spy:
            cmd = ["py-spy", "record", "--format", "raw", "--rate", str(args.rate), "-o", raw,
                   "--", *cmd]  # fmt: skip
        proc = subprocess.Popen(cmd, env=cenv, cwd=harness, stdout=wlog, stderr=subprocess.STDOUT)
        reader = CounterReader(counter)
        t_end = worker = cpu0 = None
        broker = next(
            (p for p in psutil.process_iter(["name"]) if p.info["name"] == "beam.smp"), None
        )
        broker0 = None
        limit = time.monotonic() + 600
        while time.monotonic() < limit and proc.poll() is None:
            c = reader.read()
            if worker is None:
                kids = psutil.Process(proc.pid).children() if spy else [psutil.Process(proc.pid)]
                worker = kids[0] if kids else None
            if cpu0 is None and c["calls"] and worker is not None:
                cpu0 = sum(worker.cpu_times()[:2])  # user + system at the first handler call
                broker0 = sum(broker.cpu_times()[:2]) if broker is not None else None
            if scenario == "S3":
                if c["calls"] >= ctx.n and (asyncio.run(_depth(names["dead"])) or 0) >= ctx.n:
                    t_end = time.monotonic()
                    break
            elif c["done"] >= ctx.n:
                t_end = c["t_last"]
                break
            time.sleep(0.02)
        c = reader.read()
        if worker is not None and cpu0 is not None:
            result["cpu_us_per_msg"] = (sum(worker.cpu_times()[:2]) - cpu0) * 1e6 / ctx.n
            result["rss_mib"] = worker.memory_info().rss / 2**20
            with open(f"/proc/{worker.pid}/status") as f:  # the kernel's peak RSS
                hwm = [ln.split()[1] for ln in f if ln.startswith("VmHWM:")]
            result["vmhwm_mib"] = int(hwm[0]) / 1024 if hwm else None
            if broker0 is not None:  # the broker's CPU too (other users of the broker add to it)
                result["broker_cpu_us_per_msg"] = (
                    (sum(broker.cpu_times()[:2]) - broker0) * 1e6 / ctx.n
                )
        if t_end and c["t_first"]:
            result["msgs_per_s"] = ctx.n / (t_end - c["t_first"])
        result.update(calls=c["calls"], done=c["done"])
        if worker is not None:
            worker.send_signal(signal.SIGTERM)  # graceful stop; then py-spy writes its output
        proc.wait(timeout=60)
        wlog.close()
        with open(os.path.join(work, "worker.log"), "rb") as f:
            result["worker_log_bytes"] = len(f.read())
        if spy:
            with open(raw) as f:
                result["stacks"] = f.read()
    finally:
        asyncio.run(_delete(names["delete"]))
        result["workdir"] = work
    return result


def run_cpu(args, env: dict[str, str], info: dict) -> int:
    """Worker CPU time per message (user+system, first handler call to the end), no profiler.

    Less sensitive than msgs/s to other load on the machine: a ratio of CPU per message is
    what throughput ratios converge to when the worker is the bottleneck."""
    names = args.contenders or [BASELINE, *QWORKER]
    reps = args.prof_reps
    rows: dict[tuple[str, str], list[dict]] = collections.defaultdict(list)
    for rep in range(reps):
        for scenario in args.cpu:
            for name in names:
                r = profile_one(args, env, info, name, scenario, spy=False)
                shutil.rmtree(r["workdir"], ignore_errors=True)
                ok = r["done"] == (0 if scenario == "S3" else r["n"]) and bool(r.get("msgs_per_s"))
                cpu, rate = fmt(r.get("cpu_us_per_msg"), "6.0f"), fmt(r.get("msgs_per_s"), ",.0f")
                log(
                    f"rep {rep + 1} {scenario} {name:18s} {cpu} us/msg {rate} msg/s "
                    f"{ok or 'FAILED'}"
                )
                if ok:
                    rows[(scenario, name)].append(r)
    med = statistics.median
    lines = [
        f"Worker CPU (user+system) per message, first handler call to the end, N={args.n or 10000},"
        f" median of {reps} (bench/run.py --cpu); qworker: {info.get('commit') or info['source']}."
        " Broker CPU: beam.smp over the same interval (includes anyone else's load).",
        "",
        "| scenario | contender | CPU us/msg | raw CPU / this CPU | broker CPU us/msg | msgs/s "
        "| peak RSS MiB (VmHWM) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for scenario in args.cpu:
        base = rows.get((scenario, BASELINE))
        base_cpu = med([r["cpu_us_per_msg"] for r in base]) if base else None
        for name in names:
            rs = rows.get((scenario, name))
            if not rs:
                lines.append(f"| {scenario} | {name} | failed | | | | |")
                continue
            cpu = med([r["cpu_us_per_msg"] for r in rs])
            ratio = base_cpu / cpu if base_cpu else None
            rate = med([r["msgs_per_s"] for r in rs])
            rss = med([r.get("vmhwm_mib") or r["rss_mib"] for r in rs])
            bcpu = [r["broker_cpu_us_per_msg"] for r in rs if "broker_cpu_us_per_msg" in r]
            bcpu_s = fmt(med(bcpu) if bcpu else None, ",.0f")
            lines.append(
                f"| {scenario} | {name} | {cpu:,.0f} | {fmt(ratio, '.2f')} | {bcpu_s} | "
                f"{rate:,.0f} | {rss:.1f} |"
            )
    md = "\n".join(lines) + "\n"
    # Only the default comparison goes to results/; partial runs to the git-ignored logs/.
    where = LOGS if args.contenders else RESULTS
    name = f"cpu-{dt.date.today().isoformat()}" + (f"-n{args.n}" if args.n else "")
    with open(os.path.join(where, f"{name}.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


def _short(path: str) -> str:
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/", "qworker-src/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def category(file: str) -> str:
    f = _short(file)
    if f.startswith("qworker/"):
        return "qworker"
    for pkg in ("aio_pika", "aiormq", "pamqp", "structlog", "pydantic", "tenacity"):
        if f.startswith(pkg):
            return pkg
    if f in ("traceback.py", "linecache.py", "tokenize.py", "ast.py") or "traceback" in f:
        return "traceback formatting (stdlib)"
    if f.startswith("asyncio/") or f in ("selectors.py", "contextvars.py"):
        return "asyncio event loop"
    if f in ("json/encoder.py", "json/decoder.py", "json/__init__.py"):
        return "json"
    if "bench_common" in f or "contenders/" in f:
        return "bench harness / handler"
    if f.startswith("<frozen") or "importlib" in f:
        return "imports (startup)"
    return "other stdlib / python"


# Buckets for "where does a message's time go": the first match (top to bottom) wins; a
# bucket matches when all its needles do: "@path" a frame's file starts with path, anything
# else is a substring of some "function (file)". Labels may repeat (alternatives).
TB = "traceback formatting (ErrorInfo.from_exception)"
BUCKETS = (
    (TB, ("format_exception",)),
    (TB, ("format_traceback",)),
    ("redact() of error message + traceback (ErrorInfo.from_exception)",
     ("ErrorInfo.from_exception", "redact")),
    ("ErrorInfo.from_exception, rest", ("ErrorInfo.from_exception",)),
    ("log line: redact_values processor", ("redact_values",)),
    ("log line: structlog bind/render/write", ("@structlog",)),
    ("failure_headers / _fit", ("failure_headers",)),
    ("build the copy's properties", ("Consumer._move", "Message.__init__")),
    ("build the copy's properties", ("copy_properties",)),
    ("publish the copy (ConfirmedPublisher -> aiormq/pamqp)", ("ConfirmedPublisher.publish",)),
    ("ack/nack call", ("IncomingMessage.ack",)),
    ("ack/nack call", ("Delivery.ack",)),
    ("ack/nack call", ("Delivery.nack",)),
    ("aiormq writer task (frames to the socket)", ("Connection.__writer",)),
    ("aiormq reader task (deliveries, confirms: pamqp unmarshal)", ("Connection.__reader",)),
    ("aio-pika on_message -> IncomingMessage", ("consumer (aio_pika/queue.py)",)),
    ("handler call (incl. Context)", ("Consumer._run",)),
    ("handler call (incl. Context)", ("@qworker/execution.py",)),
    ("payload decode (pydantic)", ("decode_json",)),
    ("qworker delivery intake (flow.Gate, Delivery)", ("@qworker/flow.py",)),
    ("qworker delivery intake (flow.Gate, Delivery)", ("@qworker/delivery.py",)),
    ("qworker, other (Consumer task, semaphore, observers)", ("@qworker/",)),
    ("event loop and everything else", ()),
)  # fmt: skip


def bucket_of(frames: list[tuple[str, str, str]]) -> str:
    names = {f"{func} ({file})" for func, file, _ in frames}
    files = {file for _, file, _ in frames}
    for label, needles in BUCKETS:
        if all(
            any(f.startswith(n[1:]) for f in files)
            if n.startswith("@")
            else any(n in x for x in names)
            for n in needles
        ):
            return label
    return BUCKETS[-1][0]


def analyse(result: dict, rate: int) -> str:
    stacks: list[tuple[list[tuple[str, str, str]], int]] = []
    for line in result["stacks"].splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = []
        for fr in stack.split(";"):
            m = _FRAME.match(fr)
            frames.append((m["func"], _short(m["file"]), m["line"] or "") if m else (fr, "?", ""))
        stacks.append((frames, int(count)))
    # Keep the worker's main thread once it runs the event loop: drop the watchdog thread,
    # empty stacks and start-up imports.
    everything = sum(n for _, n in stacks)
    stacks = [
        (fr, n)
        for fr, n in stacks
        if any(f[0] == "BaseEventLoop.run_forever" for f in fr)
        and not any(f[1].startswith("<frozen importlib") for f in fr)
    ]
    total = sum(n for _, n in stacks) or 1
    self_fn: collections.Counter[str] = collections.Counter()
    incl_fn: collections.Counter[str] = collections.Counter()
    incl_line: collections.Counter[str] = collections.Counter()
    cats: collections.Counter[str] = collections.Counter()
    buckets: collections.Counter[str] = collections.Counter()
    for frames, n in stacks:
        buckets[bucket_of(frames)] += n
        leaf = frames[-1]
        self_fn[f"{leaf[0]} ({leaf[1]})"] += n
        cats[category(leaf[1])] += n
        seen_fn, seen_line = set(), set()
        for func, file, line in frames:
            key = f"{func} ({file})"
            if key not in seen_fn:
                incl_fn[key] += n
                seen_fn.add(key)
            if file.startswith("qworker/"):
                kl = f"{func} ({file}:{line})"
                if kl not in seen_line:
                    incl_line[kl] += n
                    seen_line.add(kl)
    n_msgs = result["n"] * result["reps"]
    cpu_ms = total * 1000 / rate
    out = [
        f"# py-spy record --format raw --rate {rate} (blocking): {result['contender']} "
        f"{result['scenario']}, {result['reps']} run(s) of N={result['n']}",
        f"# qworker: {result.get('qworker')}",
        f"# throughput under the profiler (slowest run): "
        f"{fmt(result.get('msgs_per_s_under_profiler'), ',.0f')} msg/s; "
        f"worker log {result.get('worker_log_bytes', 0) / result['n']:.0f} bytes/msg",
        f"# {total} samples of the main thread inside the event loop (of {everything}: the "
        "watchdog thread, imports and idle waits are left out)",
        f"# = ~{cpu_ms:,.0f} ms busy = ~{cpu_ms * 1000 / n_msgs:.0f} us per message under the "
        "profiler (sampling pauses inflate this; compare percentages)",
        "",
        "## where the time goes (samples by the first matching bucket)",
        *(f"{100 * n / total:6.1f}%  {label}" for label, n in buckets.most_common()),
        "",
        "## self time by category (leaf frame)",
    ]
    for cat, n in cats.most_common():
        out.append(f"{100 * n / total:6.1f}%  {cat}")
    out += ["", "## top 40 functions, inclusive (% of samples with the function on the stack)"]
    for key, n in incl_fn.most_common(40):
        out.append(f"{100 * n / total:6.1f}%  {key}")
    out += ["", "## top 40 functions, self (leaf)"]
    for key, n in self_fn.most_common(40):
        out.append(f"{100 * n / total:6.1f}%  {key}")
    out += ["", "## qworker call sites, inclusive (function, file:line)"]
    for key, n in incl_line.most_common(40):
        out.append(f"{100 * n / total:6.1f}%  {key}")
    return "\n".join(out) + "\n"


def run_profile(args, env: dict[str, str], info: dict) -> int:
    if not shutil.which("py-spy"):
        raise SystemExit("py-spy not found (pip install py-spy; needs root or ptrace rights)")
    os.makedirs(PROFILES, exist_ok=True)
    names = args.contenders or ["qworker_c"]
    for name in names:
        for scenario in args.profile:
            log(f"profiling {name} {scenario} N={args.n or 10000} ...")
            runs = [profile_one(args, env, info, name, scenario) for _ in range(args.prof_reps)]
            res = dict(runs[0], reps=len(runs), stacks="\n".join(r["stacks"] for r in runs))
            if args.keep_raw:
                with open(os.path.join(LOGS, f"{name}-{scenario}.raw"), "w") as f:
                    f.write(res["stacks"])
            rates = [r.get("msgs_per_s") or 0 for r in runs]
            res["msgs_per_s_under_profiler"] = min(rates)
            for r in runs[1:]:
                shutil.rmtree(r["workdir"], ignore_errors=True)
            res["qworker"] = info.get("commit") or info.get("source")
            text = analyse(res, args.rate)
            path = os.path.join(PROFILES, f"{name}-{scenario}.txt")
            with open(path, "w") as f:
                f.write(text)
            shutil.rmtree(res["workdir"], ignore_errors=True)
            log(f"  {path}: {res.get('done')} done, {res.get('calls')} calls")
    return 0


# --------------------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="CI check: N=300, 1 rep, no ceiling")
    mode.add_argument("--scaling", action="store_true", help="S1 at --sizes, 1 rep")
    mode.add_argument("--profile", nargs="+", choices=("S1", "S2", "S3"), metavar="SCENARIO")
    mode.add_argument("--cpu", nargs="+", choices=("S1", "S2", "S3"), metavar="SCENARIO",
                      help="worker CPU per message, raw vs qworker, no profiler")  # fmt: skip
    mode.add_argument("--context-check", choices=("quorum", "classic"), help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help="messages per cell (default per mode)")
    p.add_argument("--reps", type=int, help="full mode: repetitions (default 3)")
    p.add_argument("--contenders", nargs="+", help="override the contender list of the mode")
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--prof-reps", type=int, default=3, help="profiled runs per scenario")
    p.add_argument("--keep-raw", action="store_true", help="copy py-spy raw stacks to logs/")
    p.add_argument("--qworker-ref", help="measure qworker at this git ref (e.g. HEAD)")
    p.add_argument("rest", nargs="*", help="after --: arguments for peers_bench.py")
    args = p.parse_args()
    if args.context_check:  # a child of --smoke, run with the qworker under test
        return asyncio.run(_context_check(args.context_check))
    os.makedirs(LOGS, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qworker-bench.") as tmp:
        env, info = qworker_source(args.qworker_ref, tmp)
        log(f"qworker under test: {info}")
        if args.smoke:
            return run_smoke(args, env, info)
        if args.scaling:
            return run_scaling(args, env, info)
        if args.profile:
            return run_profile(args, env, info)
        if args.cpu:
            return run_cpu(args, env, info)
        return run_full(args, env, info)


if __name__ == "__main__":
    sys.exit(main())
