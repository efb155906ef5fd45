#!/usr/bin/env python
"""Latency, not only throughput (issue 15, part 3). Run by hand:

    python bench/latency.py                      # everything (~10 min on the shared 2-core box)
    python bench/latency.py --parts 1 --reps 1   # only publish -> handler start
    python bench/latency.py --smoke              # tiny and fast, checks only (no speed asserts);
                                                 # exit 1 if a check fails. Not wired into CI.

1. **Publish -> handler start.** Per contender and repetition, one worker process (configured
   like the shared peer harness: prefetch 100, persistent ~200-byte JSON bodies, each
   framework's own publisher in its own process):
   a. *max*: N_max messages preloaded, then the worker starts; max msg/s = handler starts per
      second from the first to the last start (the harness's S1 definition, on starts);
   b. *half*: a paced publisher sends N_half messages at 0.5 x the max just measured;
   c. *fixed*: the same at fixed rates common to every contender (``--fixed-rate``, default
      300 and 1000 msg/s; the JSON says whether each is below half of the slowest
      contender's max in this run: ``meta.fixed_rates_below_half_of_slowest_max``).
   The body carries the publisher's ``time.monotonic_ns()`` taken right before the publish
   call; the handler's first statement records its own. Latency = handler start - publish.
   The first ``--warmup`` messages of each paced phase are left out of the statistics.
   Contenders alternate: rep 1 in the given order, rep 2 reversed, ... A thread of the runner
   sleeps 1 ms in a loop and records how late it wakes (``runner_oversleep_ms`` per phase):
   the machine's stalls, to read the tails against.
2. **Retry delay accuracy** (qworker only, quorum and classic): ``qworker run`` with one
   handler per tier,
   ``RetryPolicy(max_attempts=2, initial_delay=0.2 | 2.0, jitter=0)``; attempt 1 records the
   time right before it raises ``Transient``, attempt 2 its start. Observed delay = the
   difference; error = observed - scheduled.
3. **SIGTERM -> exit** with 100 in-flight deliveries: ``qworker run --concurrency 100`` (so
   prefetch 100) with its default grace; a handler that sleeps ``--sleep`` s; ``--backlog``
   messages queued; SIGTERM as soon as 100 handlers have started. Then every message is
   accounted for: the handlers that finished must be acked (gone), every other message must
   still be in the queue (read back with basic.get), none lost (a failure), none twice
   (reported, not a failure: on quorum queues RabbitMQ 3.10 sometimes ignores acks that
   arrive right before the connection closes, rabbitmq-server#10327, see
   ``bench/latency_quorum_settle.py``). Quorum and classic alternate; one more rep per queue
   type with ``--grace 0.2`` (handlers cancelled, their messages returned).

qworker is measured as committed at ``--qworker-ref`` (default HEAD; a ``git archive`` put
first on PYTHONPATH), not the working tree others may be editing. Only 127.0.0.1 is used;
every queue gets a fresh ``lat.*`` name and is deleted afterwards; every child has a
deadline watchdog and is SIGTERMed, then SIGKILLed (its own process group).
"""

from __future__ import annotations

import argparse
import array
import bisect
import contextlib
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any

import pika
import pika.exceptions

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from latency_workers import CONTENDERS, URL, Recorder, encode, make_body, queues  # noqa: E402

CHILD = os.path.join(HERE, "latency_workers.py")
RESULTS = os.path.join(HERE, "results")
PACKAGES = (
    "aio-pika",
    "aiormq",
    "pamqp",
    "pydantic",
    "structlog",
    "faststream",
    "dramatiq",
    "pika",
    "celery",
    "kombu",
    "amqp",
)
DEFAULT_ORDER = [
    "raw_aiopika",
    "qworker_classic",
    "faststream",
    "dramatiq",
    "celery",
    "raw_aiopika_quorum",
    "qworker_quorum",
]


def log(msg: str) -> None:
    print(f"[latency {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- broker probe


class Probe:
    """Synchronous helper on its own connection: depths, cleanup, raw publish and get."""

    def __init__(self) -> None:
        params = pika.URLParameters(URL + "?heartbeat=0")
        self.conn = pika.BlockingConnection(params)
        self.ch: Any = self.conn.channel()

    def server(self) -> dict[str, str]:
        props = getattr(self.conn._impl, "server_properties", {}) or {}
        out = {}
        for key in ("product", "version", "platform"):
            value = props.get(key)
            out[key] = value.decode() if isinstance(value, bytes) else str(value)
        return out

    def _channel(self) -> Any:
        if self.ch is None or self.ch.is_closed:
            self.ch = self.conn.channel()
        return self.ch

    def depth(self, queue: str) -> tuple[int, int] | None:
        """(ready messages, consumers) of ``queue``; None if it does not exist."""
        try:
            ok = self._channel().queue_declare(queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker:
            self.ch = None
            return None
        return ok.method.message_count, ok.method.consumer_count

    def delete_queue(self, queue: str) -> None:
        try:
            self._channel().queue_delete(queue)
        except pika.exceptions.ChannelClosedByBroker:
            self.ch = None

    def delete_exchange(self, exchange: str) -> None:
        try:
            self._channel().exchange_delete(exchange)
        except pika.exceptions.ChannelClosedByBroker:
            self.ch = None

    def publish(self, queue: str, body: bytes) -> None:
        props = pika.BasicProperties(delivery_mode=2, content_type="application/json")
        self._channel().basic_publish("", queue, body, props)

    def get(self, queue: str) -> bytes | None:
        method, _props, body = self._channel().basic_get(queue, auto_ack=True)
        return None if method is None else bytes(body)

    def wait_depth(self, queue: str, target: int, timeout: float) -> int:
        limit = time.monotonic() + timeout
        while True:
            d = self.depth(queue)
            ready = d[0] if d else -1
            if ready >= target or time.monotonic() > limit:
                return ready
            time.sleep(0.05)

    def wait_consumers(self, names: list[str], timeout: float) -> bool:
        limit = time.monotonic() + timeout
        while time.monotonic() < limit:
            if all((d := self.depth(q)) is not None and d[1] >= 1 for q in names):
                return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self.conn.close()


# --------------------------------------------------------------------------- helpers


def pct(xs: list[float], p: float) -> float | None:
    """Nearest-rank percentile of sorted ``xs``."""
    if not xs:
        return None
    k = max(1, math.ceil(p / 100 * len(xs)))
    return xs[k - 1]


def summary(xs: list[float]) -> dict[str, Any]:
    xs = sorted(xs)
    out: dict[str, Any] = {"n": len(xs)}
    if not xs:
        return out
    out.update(
        min=xs[0],
        p50=pct(xs, 50),
        p90=pct(xs, 90),
        p99=pct(xs, 99),
        max=xs[-1],
        mean=sum(xs) / len(xs),
    )
    # p99.9 is reported only when at least 5 samples lie at or beyond it.
    out["p999"] = pct(xs, 99.9) if len(xs) >= 5000 else None
    return out


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def stop(proc: subprocess.Popen[bytes], timeout: float) -> str:
    if proc.poll() is not None:
        return f"exited rc={proc.returncode}"
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
        return f"stopped rc={proc.returncode}"
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        return "killed after SIGTERM timeout"


def tail(path: str, n: int = 8) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 6000))
            return f.read().decode(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", REPO, *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def snapshot(ref: str, tmp: str, tree: str | None) -> tuple[dict[str, str], str]:
    """Children's environment with qworker from ``git archive <ref>`` first on PYTHONPATH
    (or from ``tree``, a folder holding a qworker package, e.g. a patched copy)."""
    if tree:
        snap, commit = os.path.abspath(tree), f"tree {os.path.abspath(tree)}"
    else:
        commit = git("rev-parse", f"{ref}^{{commit}}")
        snap = os.path.join(tmp, "qworker-src")
        os.makedirs(snap)
        archive = subprocess.run(
            ["git", "-C", REPO, "archive", commit, "qworker"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", snap], input=archive, check=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (snap, HERE, env.get("PYTHONPATH")) if p)
    probe = subprocess.run(
        [sys.executable, "-c", "import qworker; print(qworker.__file__)"],
        env=env,
        cwd=tmp,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not probe.startswith(snap):
        raise SystemExit(f"the children would not import the snapshot of {ref}: {probe}")
    return env, commit


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


class StallProbe:
    """A thread that sleeps 1 ms in a loop and records how late it wakes up: the machine's
    scheduling stalls (other people's load on the shared cores), to read latency tails
    against. Bounded: stops with the run (daemon thread, ~1,000 samples/s, 16 bytes each)."""

    def __init__(self) -> None:
        self.t = array.array("q")
        self.late = array.array("q")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="stall-probe", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic_ns()
            time.sleep(0.001)
            self.t.append(t0)
            self.late.append(time.monotonic_ns() - t0 - 1_000_000)

    def window(self, t0: int, t1: int) -> dict[str, Any]:
        """Oversleep statistics (ms) between monotonic_ns ``t0`` and ``t1``."""
        lo, hi = bisect.bisect_left(self.t, t0), bisect.bisect_right(self.t, t1)
        xs = sorted(x / 1e6 for x in self.late[lo:hi])
        if not xs:
            return {"n": 0}
        return {
            "n": len(xs),
            "p50": pct(xs, 50),
            "p99": pct(xs, 99),
            "max": xs[-1],
            "over_10ms": sum(1 for x in xs if x > 10),
        }

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)


class Run:
    """Settings and shared state of one invocation."""

    def __init__(self, args: argparse.Namespace, env: dict[str, str], tmp: str) -> None:
        self.args = args
        self.env = env
        self.tmp = tmp
        self.probe = Probe()
        self.stalls = StallProbe()


def publisher(run: Run, cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, CHILD, "publish", json.dumps(cfg)],
        env=run.env,
        cwd=run.tmp,
        capture_output=True,
        timeout=timeout,
    )
    if out.returncode != 0:
        err = out.stderr.decode(errors="replace").strip().splitlines()[-4:]
        raise RuntimeError(f"publisher rc={out.returncode}: {' | '.join(err)}")
    result: dict[str, Any] = json.loads(out.stdout.decode().strip().splitlines()[-1])
    return result


def wait_started(rec: Recorder, target: int, timeout: float, proc: Any) -> int:
    limit = time.monotonic() + timeout
    while True:
        started, _ = rec.counters()
        if started >= target or time.monotonic() > limit:
            return started
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited early rc={proc.returncode}")
        time.sleep(0.01)


# --------------------------------------------------------------------------- part 1


def latency_cell(run: Run, name: str, rep: int) -> dict[str, Any]:
    a = run.args
    run_id = uuid.uuid4().hex[:8]
    queue = f"lat.{name}.{run_id}"
    n_max, n_half, n_fixed = a.n_max, a.n_half, a.n_fixed
    total = n_max + n_half + n_fixed * len(a.fixed_rate)
    rec_path = os.path.join(run.tmp, f"{run_id}.rec")
    rec = Recorder(rec_path, total, create=True)
    deadline = time.time() + a.cell_timeout + 120
    base = {
        "contender": name,
        "queue": queue,
        "run_id": run_id,
        "recorder": rec_path,
        "slots": total,
        "deadline": deadline,
    }
    label, qtype = CONTENDERS[name]
    res: dict[str, Any] = {
        "contender": name,
        "label": label,
        "queue_type": qtype,
        "rep": rep,
        "run_id": run_id,
        "ok": False,
        "error": None,
        "load_before": loadavg(),
    }
    wlog = os.path.join(run.tmp, f"{run_id}-worker.log")
    proc: subprocess.Popen[bytes] | None = None
    limit = time.monotonic() + a.cell_timeout
    try:
        # a. max: preload, then start the worker
        pub = publisher(run, {**base, "first_id": 0, "n": n_max, "rate": 0}, a.cell_timeout)
        res["preload"] = pub
        depth = run.probe.wait_depth(queue, n_max, 60)
        if depth != n_max:
            raise RuntimeError(f"preload: {queue} holds {depth}, expected {n_max}")
        with open(wlog, "wb") as lf:
            proc = subprocess.Popen(
                [sys.executable, CHILD, "worker", json.dumps(base)],
                env=run.env,
                cwd=run.tmp,
                stdout=lf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        got = wait_started(rec, n_max, limit - time.monotonic(), proc)
        if got < n_max:
            raise TimeoutError(f"max phase: {got}/{n_max} handler starts")
        starts = sorted(rec.slot(i)[1] for i in range(n_max))
        max_rate = (n_max - 1) / ((starts[-1] - starts[0]) / 1e9)
        res["max_msgs_per_s"] = max_rate
        phases = [("half", n_max, n_half, 0.5 * max_rate)]
        for k, fixed in enumerate(a.fixed_rate):
            phases.append((f"fixed {fixed:g}/s", n_max + n_half + k * n_fixed, n_fixed, fixed))
        res["phases"] = [p[0] for p in phases]
        for phase, first, n, rate in phases:
            time.sleep(0.5)  # let the worker settle between phases
            pub = publisher(
                run,
                {**base, "first_id": first, "n": n, "rate": rate},
                max(1.0, limit - time.monotonic()),
            )
            got = wait_started(rec, first + n, max(1.0, limit - time.monotonic()), proc)
            if got < first + n:
                raise TimeoutError(f"{phase} phase: {got - first}/{n} handler starts")
            pairs = [rec.slot(i) for i in range(first + a.warmup, first + n)]
            lat_ms = [(s - p) / 1e6 for p, s in pairs if s and p]
            st = sorted(s for _p, s in pairs)
            handled = (len(st) - 1) / ((st[-1] - st[0]) / 1e9) if len(st) > 1 else None
            half = len(lat_ms) // 2
            res[phase] = {
                "target_rate": rate,
                # A rate the system cannot sustain shows as a queue that grows: compare halves.
                "p50_first_half_ms": pct(sorted(lat_ms[:half]), 50),
                "p50_second_half_ms": pct(sorted(lat_ms[half:]), 50),
                "publisher": pub,
                "achieved_publish_rate": n / pub["send_s"] if pub["send_s"] > 0 else None,
                "handled_rate": handled,
                "missing": sum(1 for p, s in pairs if not (s and p)),
                "latency_ms": summary(lat_ms),
                "samples_ms": lat_ms,
                # how late a 1 ms sleep of the runner woke up meanwhile (machine stalls)
                "runner_oversleep_ms": run.stalls.window(
                    min(p for p, _s in pairs), max(s for _p, s in pairs)
                ),
            }
        res["worker_stop"] = stop(proc, 30)
        started, _ = rec.counters()
        d = run.probe.depth(queue)
        res["checks"] = {
            "queue_empty": d is not None and d[0] == 0,
            "starts==published": started == total,
        }
        res["ok"] = all(res["checks"].values())
        if not res["ok"]:
            res["error"] = f"checks failed: {res['checks']}, starts {started}/{total}"
    except Exception as exc:  # record and carry on
        res["error"] = f"{type(exc).__name__}: {exc}"
        res["worker_log_tail"] = tail(wlog)
    finally:
        if proc is not None and proc.poll() is None:
            res.setdefault("worker_stop", stop(proc, 30))
        qs, exs = queues(name, queue)
        for q in qs:
            run.probe.delete_queue(q)
        for ex in exs:
            run.probe.delete_exchange(ex)
        rec.close()
        for p in (rec_path, wlog):
            if os.path.exists(p):
                os.remove(p)
        res["load_after"] = loadavg()
    return res


# --------------------------------------------------------------------------- parts 2, 3


def qworker_run(run: Run, env: dict[str, str], extra: list[str], logpath: str) -> Any:
    cmd = [sys.executable, "-m", "qworker", "run", "latency_app:app", "--log-format", "json"]
    with open(logpath, "wb") as lf:
        return subprocess.Popen(
            [*cmd, *extra],
            env=env,
            cwd=run.tmp,
            stdout=lf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def qworker_queues(queue: str, tier: str | None) -> list[str]:
    names = [queue, f"{queue}.dlq", f"{queue}.quarantine"]
    names.append(f"{queue}.retry.{tier}" if tier else f"{queue}.retry.1s")  # default policy: 1s
    if tier is None:  # RetryPolicy() defaults: 1, 2, 4, 8 s
        names += [f"{queue}.retry.{s}s" for s in (2, 4, 8)]
    return names


def retry_part(run: Run, qtype: str) -> dict[str, Any]:
    a = run.args
    run_id = uuid.uuid4().hex[:8]
    base = f"lat.retry.{run_id}"
    tiers = [("200ms", 0.2), ("2s", 2.0)] if not a.smoke else [("200ms", 0.2)]
    n = a.retry_n
    slots = n * len(tiers)
    rec_path = os.path.join(run.tmp, f"{run_id}.rec")
    rec = Recorder(rec_path, slots, create=True)
    env = dict(
        run.env,
        LAT_MODE="retry",
        LAT_QUEUE=base,
        LAT_QTYPE=qtype,
        LAT_RECORDER=rec_path,
        LAT_SLOTS=str(slots),
        LAT_TIERS=",".join(f"{t}={s}" for t, s in tiers),
    )
    logpath = os.path.join(run.tmp, f"{run_id}-retry.log")
    res: dict[str, Any] = {"queue_type": qtype, "n_per_tier": n, "ok": False, "error": None}
    res["load_before"] = loadavg()
    extra = ["--concurrency", "100", "--prefetch", "100"]
    res["command"] = "qworker run latency_app:app --log-format json " + " ".join(extra)
    proc = qworker_run(run, env, extra, logpath)
    try:
        names = [f"{base}.{t}" for t, _ in tiers]
        if not run.probe.wait_consumers(names, 60):
            raise RuntimeError("qworker run did not consume within 60 s")
        # Interleaved across tiers at a.retry_rate messages/s per tier.
        t0 = time.monotonic()
        for k in range(n):
            due = t0 + k / a.retry_rate
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            for j, q in enumerate(names):
                i = j * n + k
                run.probe.publish(q, encode(make_body(i, time.monotonic_ns(), run_id)))
        res["publish_s"] = time.monotonic() - t0
        limit = time.monotonic() + max(s for _, s in tiers) + 60
        while rec.counters()[1] < slots and time.monotonic() < limit:
            if proc.poll() is not None:
                raise RuntimeError(f"qworker run exited rc={proc.returncode}")
            time.sleep(0.05)
        started, finished = rec.counters()
        res["attempts1"], res["attempts2"] = started, finished
        res["worker_stop"] = stop(proc, 40)
        checks: dict[str, bool] = {"all_retried": finished == slots and started == slots}
        for j, (tier, secs) in enumerate(tiers):
            pairs = [rec.slot(j * n + k) for k in range(n)]
            obs = [(b - a_) / 1e6 for a_, b in pairs if a_ and b]
            err = [x - secs * 1000 for x in obs]
            res[tier] = {
                "scheduled_ms": secs * 1000,
                "observed_ms": summary(obs),
                "error_ms": summary(err),
                "early": sum(1 for e in err if e < 0),
            }
            q = f"{base}.{tier}"
            for name in (q, f"{q}.dlq", f"{q}.retry.{tier}"):
                d = run.probe.depth(name)
                checks[f"{name.removeprefix(base + '.')}_empty"] = d is not None and d[0] == 0
        res["checks"] = checks
        res["ok"] = all(checks.values())
        if not res["ok"]:
            res["error"] = f"checks failed: {[k for k, v in checks.items() if not v]}"
    except Exception as exc:
        res["error"] = f"{type(exc).__name__}: {exc}"
        res["log_tail"] = tail(logpath)
    finally:
        if proc.poll() is None:
            res.setdefault("worker_stop", stop(proc, 40))
        for tier, _ in tiers:
            q = f"{base}.{tier}"
            for name in (q, f"{q}.dlq", f"{q}.quarantine", f"{q}.retry.{tier}"):
                run.probe.delete_queue(name)
        rec.close()
        for p in (rec_path, logpath):
            if os.path.exists(p):
                os.remove(p)
        res["load_after"] = loadavg()
    return res


def sigterm_part(run: Run, rep: int, grace: float | None, qtype: str) -> dict[str, Any]:
    a = run.args
    run_id = uuid.uuid4().hex[:8]
    queue = f"lat.sigterm.{run_id}"
    n = a.backlog
    rec_path = os.path.join(run.tmp, f"{run_id}.rec")
    rec = Recorder(rec_path, n, create=True)
    env = dict(
        run.env,
        LAT_MODE="sigterm",
        LAT_QUEUE=queue,
        LAT_RECORDER=rec_path,
        LAT_SLOTS=str(n),
        LAT_SLEEP=str(a.sleep),
        LAT_QTYPE=qtype,
    )
    extra = ["--concurrency", "100"]
    if grace is not None:
        extra += ["--grace", str(grace)]
    logpath = os.path.join(run.tmp, f"{run_id}-sigterm.log")
    res: dict[str, Any] = {"rep": rep, "grace": grace if grace is not None else "default (30 s)"}
    res["queue_type"] = qtype
    res.update(ok=False, error=None, load_before=loadavg(), backlog=n, sleep_s=a.sleep)
    res["command"] = "qworker run latency_app:app --log-format json " + " ".join(extra)
    proc = qworker_run(run, env, extra, logpath)
    try:
        if not run.probe.wait_consumers([queue], 60):
            raise RuntimeError("qworker run did not consume within 60 s")
        for i in range(n):
            run.probe.publish(queue, encode(make_body(i, time.monotonic_ns(), run_id)))
        limit = time.monotonic() + 30
        while rec.counters()[0] < 100 and time.monotonic() < limit:
            time.sleep(0.002)
        started, finished = rec.counters()
        t_sig = time.monotonic_ns()
        proc.send_signal(signal.SIGTERM)
        res["in_flight_at_sigterm"] = started - finished
        res["started_at_sigterm"] = started
        limit = time.monotonic() + (grace if grace is not None else 30.0) + 30
        while proc.poll() is None and time.monotonic() < limit:
            time.sleep(0.002)
        t_exit = time.monotonic_ns()
        if proc.poll() is None:
            res["worker_stop"] = stop(proc, 5)
            raise TimeoutError("qworker run did not exit within grace + 30 s")
        res["exit_code"] = proc.returncode
        res["sigterm_to_exit_s"] = (t_exit - t_sig) / 1e9
        slots = [rec.slot(i) for i in range(n)]
        starts = [s for s, _ in slots if s]
        done_ids = {i for i, (_s, e) in enumerate(slots) if e}
        # The floor: the last in-flight handler's own end (start + sleep) after the signal.
        res["handler_floor_s"] = (max(starts) + a.sleep * 1e9 - t_sig) / 1e9 if starts else None
        res["started_total"], res["finished_total"] = rec.counters()
        d = run.probe.depth(queue)
        res["ready_after_exit"] = d[0] if d else None
        left: list[int] = []
        for _ in range(n + 10):
            body = run.probe.get(queue)
            if body is None:
                break
            left.append(int(json.loads(body)["id"]))
        dlq = run.probe.depth(f"{queue}.dlq")
        dup = len(left) - len(set(left))
        both = done_ids & set(left)
        res["finished_and_still_queued_detail"] = [
            {
                "id": i,
                "start_after_sigterm_s": (slots[i][0] - t_sig) / 1e9,
                "end_after_sigterm_s": (slots[i][1] - t_sig) / 1e9,
            }
            for i in sorted(both)[:20]
        ]
        res["finished_after_sigterm_started_after"] = sum(1 for s, _e in slots if s and s > t_sig)
        lost = set(range(n)) - done_ids - set(left)
        res.update(
            acked=len(done_ids),
            returned_or_never_started=len(left),
            duplicates_in_queue=dup,
            finished_and_still_queued=len(both),
            lost=len(lost),
            dlq=dlq[0] if dlq else None,
        )
        for line in tail(logpath, 40):
            if '"worker.stopped"' in line:
                res["worker_stopped_log"] = json.loads(line)
        res["checks"] = {
            "in_flight==100": res["in_flight_at_sigterm"] == 100,
            "none_lost": not lost,
            "none_duplicated": not dup and not both,
            "dlq_empty": res["dlq"] == 0,
            "exit_code_0": proc.returncode == 0,
        }
        # Acks lost at close on quorum queues are a known broker bug (rabbitmq-server#10327):
        # duplicates are reported (table, JSON, warning) but do not fail the run; a loss does.
        res["ok"] = all(v for k, v in res["checks"].items() if k != "none_duplicated")
        if not res["checks"]["none_duplicated"]:
            res["warning"] = "finished messages back in the queue (see rabbitmq-server#10327)"
        if not res["ok"]:
            res["error"] = f"checks failed: {[k for k, v in res['checks'].items() if not v]}"
            res["log_tail"] = tail(logpath)
    except Exception as exc:
        res["error"] = f"{type(exc).__name__}: {exc}"
        res["log_tail"] = tail(logpath)
    finally:
        if proc.poll() is None:
            res.setdefault("worker_stop", stop(proc, 40))
        for q in qworker_queues(queue, None):
            run.probe.delete_queue(q)
        rec.close()
        keep_log(run, logpath, f"sigterm-r{rep}-{run_id}.log")
        for p in (rec_path, logpath):
            if os.path.exists(p):
                os.remove(p)
        res["load_after"] = loadavg()
    return res


def keep_log(run: Run, path: str, name: str) -> None:
    """Copy the first 256 KiB of a worker log to --logs (if given)."""
    if not run.args.logs or not os.path.exists(path):
        return
    os.makedirs(run.args.logs, exist_ok=True)
    with open(path, "rb") as src, open(os.path.join(run.args.logs, name), "wb") as dst:
        dst.write(src.read(262144))


# --------------------------------------------------------------------------- report


def fmt(x: Any, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def markdown(doc: dict[str, Any]) -> str:
    m = doc["meta"]
    out = [
        f"qworker {m['qworker_commit'][:12]} (git archive of {m['qworker_ref']}), "
        f"RabbitMQ {m['broker'].get('version')}, Python {m['python']}, {m['cpus']} CPUs; "
        f"load average at start {m['load_start']}, at end {m.get('load_end')}",
        "",
    ]
    cells = doc.get("latency", [])
    if cells:
        out += [
            "### Publish -> handler start",
            "",
            "| rep | contender | queue | max msg/s | phase | target msg/s | published msg/s "
            "| handled msg/s | n | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms "
            "| p50 1st / 2nd half ms | runner oversleep max ms | load 1m |",
            "|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
        ]
        for c in cells:
            if c.get("error"):
                out.append(
                    f"| {c['rep']} | {c['label']} | {c['queue_type']} | "
                    f"{fmt(c.get('max_msgs_per_s'), 0)} | FAILED: {c['error']} |"
                )
                continue
            for phase in c["phases"]:
                p = c[phase]
                lat = p["latency_ms"]
                out.append(
                    f"| {c['rep']} | {c['label']} | {c['queue_type']} | "
                    f"{fmt(c['max_msgs_per_s'], 0)} | {phase} | {fmt(p['target_rate'], 0)} | "
                    f"{fmt(p['achieved_publish_rate'], 0)} | {fmt(p['handled_rate'], 0)} | "
                    f"{lat['n']} | {fmt(lat.get('p50'), 2)} | {fmt(lat.get('p90'), 2)} | "
                    f"{fmt(lat.get('p99'), 2)} | {fmt(lat.get('p999'), 2)} | "
                    f"{fmt(lat.get('max'), 1)} | {fmt(p['p50_first_half_ms'], 2)} / "
                    f"{fmt(p['p50_second_half_ms'], 2)} | "
                    f"{fmt(p.get('runner_oversleep_ms', {}).get('max'), 1)} | "
                    f"{c['load_before'][0]}-{c['load_after'][0]} |"
                )
        out.append("")
        pooled = doc.get("latency_pooled", [])
        if pooled:
            out += [
                "Pooled over the repetitions (all samples of a contender and phase together; "
                "target msg/s of the half phase: the mean over reps):",
                "",
                "| contender | queue | phase | target msg/s | n | p50 ms | p99 ms | p99.9 ms "
                "| max ms |",
                "|---|---|---|---:|---:|---:|---:|---:|---:|",
            ]
            for r in pooled:
                lat = r["latency_ms"]
                out.append(
                    f"| {r['label']} | {r['queue_type']} | {r['phase']} | "
                    f"{fmt(r['target_rate'], 0)} | {lat['n']} | {fmt(lat.get('p50'), 2)} | "
                    f"{fmt(lat.get('p99'), 2)} | {fmt(lat.get('p999'), 2)} | "
                    f"{fmt(lat.get('max'), 1)} |"
                )
            out.append("")
    for r in doc.get("retry", []):
        out += [
            f"### Retry delay accuracy, qworker ({r['queue_type']} queues), "
            f"{r['n_per_tier']} messages per tier",
            "",
        ]
        if r.get("error"):
            out += [f"FAILED: {r['error']}", ""]
        out += [
            "| tier | scheduled ms | n | observed p50 ms | error p50 ms | error p99 ms "
            "| error min ms | error max ms | early |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for tier in ("200ms", "2s"):
            if tier not in r:
                continue
            t = r[tier]
            e = t["error_ms"]
            out.append(
                f"| {tier} | {fmt(t['scheduled_ms'], 0)} | {e['n']} | "
                f"{fmt(t['observed_ms'].get('p50'), 1)} | {fmt(e.get('p50'), 1)} | "
                f"{fmt(e.get('p99'), 1)} | {fmt(e.get('min'), 1)} | {fmt(e.get('max'), 1)} | "
                f"{t['early']} |"
            )
        out.append("")
    sig = doc.get("sigterm", [])
    if sig:
        out += [
            "### SIGTERM -> exit, 100 in-flight deliveries",
            "",
            "| rep | queue | grace | in flight | SIGTERM->exit s | handler floor s | exit code "
            "| finished | still queued | lost | finished but still queued | DLQ |",
            "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for s in sig:
            if s.get("error") and "sigterm_to_exit_s" not in s:
                out.append(
                    f"| {s['rep']} | {s['queue_type']} | {s['grace']} | FAILED: {s['error']} |"
                )
                continue
            out.append(
                f"| {s['rep']} | {s['queue_type']} | {s['grace']} | "
                f"{s.get('in_flight_at_sigterm')} | "
                f"{fmt(s.get('sigterm_to_exit_s'), 3)} | {fmt(s.get('handler_floor_s'), 3)} | "
                f"{s.get('exit_code')} | {s.get('acked')} | {s.get('returned_or_never_started')} "
                f"| {s.get('lost')} | "
                f"{(s.get('duplicates_in_queue') or 0) + (s.get('finished_and_still_queued') or 0)}"
                f" | {s.get('dlq')} |"
            )
        out.append("")
    return "\n".join(out)


def pool(cells: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every sample of a contender and phase over all reps; drops the samples from the cells
    (kept in the JSON only with --keep-samples)."""
    out = []
    for name in args.contenders:
        good = [c for c in cells if c["contender"] == name and c["ok"]]
        if not good:
            continue
        for phase in good[0]["phases"]:
            samples = [x for c in good for x in c[phase]["samples_ms"]]
            rates = [c[phase]["target_rate"] for c in good]
            out.append(
                {
                    "contender": name,
                    "label": good[0]["label"],
                    "queue_type": good[0]["queue_type"],
                    "phase": phase,
                    "reps": len(good),
                    "target_rate": sum(rates) / len(rates),
                    "latency_ms": summary(samples),
                }
            )
    for c in cells:
        for phase in c.get("phases", []):
            if phase in c and not args.keep_samples:
                c[phase].pop("samples_ms", None)
    return out


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--parts", nargs="+", type=int, default=[1, 2, 3], choices=[1, 2, 3])
    ap.add_argument("--contenders", nargs="+", default=DEFAULT_ORDER, choices=list(CONTENDERS))
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--n-max", type=int, default=5000)
    ap.add_argument("--n-half", type=int, default=6000)
    ap.add_argument("--n-fixed", type=int, default=3000)
    ap.add_argument("--fixed-rate", type=float, nargs="+", default=[300.0, 1000.0])
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--cell-timeout", type=float, default=240.0)
    ap.add_argument("--retry-n", type=int, default=300)
    ap.add_argument("--retry-rate", type=float, default=100.0, help="per tier, msg/s")
    ap.add_argument("--retry-qtypes", nargs="+", default=["quorum", "classic"])
    ap.add_argument("--sigterm-reps", type=int, default=3)
    ap.add_argument(
        "--sigterm-short-grace",
        type=float,
        default=0.2,
        help="one extra rep with this --grace (handlers cancelled); 0: none",
    )
    ap.add_argument("--backlog", type=int, default=300)
    ap.add_argument("--sigterm-qtypes", nargs="+", default=["quorum", "classic"])
    ap.add_argument("--sleep", type=float, default=0.5)
    ap.add_argument("--qworker-ref", default="HEAD")
    ap.add_argument(
        "--qworker-tree", default=None, help="a folder with a qworker package to measure instead"
    )
    ap.add_argument("--keep-samples", action="store_true", help="every latency in the JSON")
    ap.add_argument("--out", default=None, help="results path without extension")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--logs", default=None, help="keep the qworker run logs in this folder")
    args = ap.parse_args()
    if args.smoke:
        args.contenders = [c for c in args.contenders if c in ("raw_aiopika", "qworker_quorum")]
        args.reps, args.n_max, args.n_half, args.n_fixed = 1, 300, 300, 200
        args.fixed_rate, args.warmup, args.cell_timeout = [200.0], 20, 90.0
        args.retry_n, args.retry_qtypes = 20, ["quorum"]
        args.sigterm_reps, args.sigterm_short_grace, args.backlog = 1, 0.0, 150
        args.sigterm_qtypes = ["quorum"]
    if args.warmup >= min(args.n_half, args.n_fixed):
        raise SystemExit("--warmup must be below --n-half and --n-fixed")

    started = dt.datetime.now(dt.UTC)
    with tempfile.TemporaryDirectory(prefix="qworker-latency-") as tmp:
        env, commit = snapshot(args.qworker_ref, tmp, args.qworker_tree)
        run = Run(args, env, tmp)
        doc: dict[str, Any] = {
            "meta": {
                "started_utc": started.isoformat(timespec="seconds"),
                "command": " ".join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]),
                "qworker_ref": args.qworker_ref,
                "qworker_commit": commit,
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "host": platform.node(),
                "broker": run.probe.server(),
                "versions": versions(),
                "settings": {k: v for k, v in vars(args).items() if k != "out"},
                "load_start": loadavg(),
            }
        }
        failed = False
        try:
            if 1 in args.parts:
                cells = []
                for rep in range(1, args.reps + 1):
                    order = args.contenders if rep % 2 else list(reversed(args.contenders))
                    for name in order:
                        log(f"part 1 rep {rep}: {name} (load {loadavg()})")
                        cell = latency_cell(run, name, rep)
                        if cell["error"]:
                            log(f"  {name}: {cell['error']}")
                        else:
                            parts = [
                                f"{ph} {cell[ph]['target_rate']:.0f}/s: p50/p99 "
                                f"{cell[ph]['latency_ms']['p50']:.2f}/"
                                f"{cell[ph]['latency_ms']['p99']:.2f} ms"
                                for ph in cell["phases"]
                            ]
                            log(f"  max {cell['max_msgs_per_s']:.0f}/s; " + "; ".join(parts))
                        cells.append(cell)
                        failed |= not cell["ok"]
                doc["latency"] = cells
                doc["latency_pooled"] = pool(cells, args)
                maxes = [c["max_msgs_per_s"] for c in cells if c.get("max_msgs_per_s")]
                if maxes:
                    doc["meta"]["half_of_slowest_max"] = 0.5 * min(maxes)
                    doc["meta"]["fixed_rates_below_half_of_slowest_max"] = [
                        r < 0.5 * min(maxes) for r in args.fixed_rate
                    ]
            if 2 in args.parts:
                doc["retry"] = []
                for qtype in args.retry_qtypes:
                    log(f"part 2: retry tiers, {qtype} (load {loadavg()})")
                    r = retry_part(run, qtype)
                    log(f"  {r.get('error') or 'ok'}")
                    doc["retry"].append(r)
                    failed |= not r["ok"]
            if 3 in args.parts:
                doc["sigterm"] = []
                graces: list[float | None] = [None] * args.sigterm_reps
                if args.sigterm_short_grace:
                    graces.append(args.sigterm_short_grace)
                for rep, grace in enumerate(graces, 1):
                    for qtype in args.sigterm_qtypes:  # alternating
                        log(f"part 3: SIGTERM rep {rep}, {qtype}, grace {grace} ({loadavg()})")
                        s = sigterm_part(run, rep, grace, qtype)
                        state = s.get("error") or s.get("warning") or "ok"
                        log(f"  {state}: exit {s.get('sigterm_to_exit_s')} s")
                        doc["sigterm"].append(s)
                        failed |= not s["ok"]
        finally:
            run.probe.close()
            run.stalls.stop()
        doc["meta"]["load_end"] = loadavg()
        doc["meta"]["finished_utc"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        md = markdown(doc)
        doc["markdown"] = md
        print(md)
        if args.out or not args.smoke:
            path = args.out or os.path.join(RESULTS, f"latency-{started:%Y-%m-%d}")
            with open(path + ".json", "w") as f:
                json.dump(doc, f, indent=1)
            log(f"wrote {path}.json")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
