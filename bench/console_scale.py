"""The console at the issue's scale: one DLQ of 100,000 dead letters (issue 13).

Run by hand, never in CI (it fills the local broker with ~250 MB for a few minutes):

    python bench/console_scale.py              # N=100000, writes the results file
    python bench/console_scale.py --n 5000 --out -    # a quick look, report on stdout

In one run, on the local broker (127.0.0.1:5672 and its management API on 15672):

1. Fill ``bench.console.<id>.dlq`` (a quorum DLQ as qworker declares it) with N realistic
   dead letters: 12 failure kinds (KeyError, ValueError, TimeoutError, a pydantic-like
   ValidationError, errors with codes, ...) over 3 handlers and 4 reasons, each with a real
   traceback of 1 to 3 KiB in its headers; published with confirms, 1000 outstanding.
2. ``qworker dlq stats DLQ`` as a subprocess: its wall time (the issue's reference); run
   again after step 3, so that a change of load by other processes shows.
3. ``qworker console --queue DLQ`` as a subprocess on a free port, then, in this order:
   ``GET /api/dlqs`` (cold: it scans), ``GET /api/dlqs`` again (cached),
   ``GET /api/dlqs/{dlq}/groups`` (the overview's scan reused), ``.../groups?rescan=1``
   (a forced scan), ``.../groups`` again (cached), the first page (50) of the largest
   group's messages and of the smallest group's. The console's peak RSS (``VmHWM``) is
   read from ``/proc/<pid>/status`` before it is stopped with SIGTERM.
4. Delete the queues, also when something failed.

The issue's bar: overview and group page within the stats time + 1 s; console RSS under
150 MiB. The results go to ``bench/results/2026-11-29-console-scale.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika

from qworker import failures
from qworker import headers as h
from qworker.topology import declare, queue_specs

ROOT = Path(__file__).resolve().parent.parent
URL = os.environ.get("BENCH_URL", "amqp://guest:guest@127.0.0.1:5672/")
OUT = ROOT / "bench" / "results" / "2026-11-29-console-scale.md"
#: Publishes outstanding at once while filling.
WINDOW = 1000
#: Bounds, so that a stuck broker or console ends the run instead of hanging it.
HTTP_TIMEOUT = 300.0
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
STATS_TIMEOUT = 300.0
MIB = 1024 * 1024


def topology(queue: str) -> list[Any]:
    """qworker's topology of ``queue`` (work, retry tier, DLQ, quarantine)."""
    return list(queue_specs(queue, "quorum", 10, [1000]))


# Dead letters


class PaymentDeclined(Exception):
    """An error with a code, as an application raises it."""

    code = "PAYMENT_DECLINED"


class ValidationError(ValueError):
    """Shaped like pydantic's: a multi-line message."""


def _raise_at(depth: int, exc: BaseException) -> None:
    """Raise ``exc`` ``depth`` frames down (a longer traceback)."""
    if depth <= 0:
        raise exc
    _raise_at(depth - 1, exc)


def _kinds() -> list[tuple[str, str, int, Any]]:
    """(handler, reason, traceback depth, exception factory of i) for each failure kind."""
    return [
        ("billing.handlers:charge", "permanent_error", 4, lambda i: KeyError(f"customer {i}")),
        (
            "billing.handlers:charge",
            "permanent_error",
            8,
            lambda i: PaymentDeclined(f"card ending {i % 10000:04d} declined by issuer"),
        ),
        (
            "billing.handlers:refund",
            "retries_exhausted",
            12,
            lambda i: TimeoutError(f"payments-api did not answer within 30s (request {i})"),
        ),
        (
            "billing.handlers:refund",
            "retries_exhausted",
            6,
            lambda i: ConnectionRefusedError(111, f"Connection refused: ledger-{i % 7}:5432"),
        ),
        (
            "shipping.handlers:dispatch",
            "decode_error",
            3,
            lambda i: ValidationError(
                f"2 validation errors for Shipment\naddress.zip\n  String should match "
                f"pattern '^[0-9]{{5}}$' [input_value='{i}x']\nweight_grams\n  Input should "
                f"be greater than 0 [input_value=-{i}]"
            ),
        ),
        (
            "shipping.handlers:dispatch",
            "permanent_error",
            16,
            lambda i: ValueError(f"unknown carrier code 'X{i % 13}'"),
        ),
        (
            "shipping.handlers:dispatch",
            "timeout",
            10,
            lambda i: TimeoutError(f"handler exceeded 30s (parcel {i})"),
        ),
        (
            "mail.handlers:send",
            "poison",
            2,
            lambda i: RuntimeError(f"worker died while handling message {i}"),
        ),
        (
            "mail.handlers:send",
            "permanent_error",
            20,
            lambda i: PermissionError(f"SMTP 550 mailbox user{i}@example.com unavailable"),
        ),
        (
            "mail.handlers:send",
            "retries_exhausted",
            9,
            lambda i: OSError(f"[Errno 101] Network is unreachable (attempt {i % 5})"),
        ),
        (
            "billing.handlers:charge",
            "permanent_error",
            14,
            lambda i: ZeroDivisionError("division by zero"),
        ),
        (
            "shipping.handlers:dispatch",
            "permanent_error",
            5,
            lambda i: AttributeError(f"'NoneType' object has no attribute 'street' (order {i})"),
        ),
    ]


def dead_letter(queue: str, i: int, kind: tuple[str, str, int, Any], at: datetime) -> Any:
    """One dead letter of ``queue`` as a worker writes it (headers, body, message id)."""
    handler, reason, depth, make = kind
    try:
        _raise_at(depth, make(i))
    except Exception as exc:
        error = failures.ErrorInfo.from_exception(exc)
    origin = h.Origin(queue, handler, "", queue, f"worker-{i % 4}:{1000 + i % 4}")
    when = at.isoformat()
    headers = h.failure_headers(
        {"traceparent": f"00-{uuid.uuid4().hex}-{i:016x}-01"},
        error=error,
        attempt=3 if reason == "retries_exhausted" else 1,
        classification="permanent",
        origin=origin,
        reason=reason,
        at=when,
    )
    body = json.dumps(
        {
            "order_id": f"ord-{i:08d}",
            "customer": {"id": i % 5000, "email": f"user{i}@example.com"},
            "lines": [{"sku": f"SKU-{(i + k) % 997}", "qty": 1 + k} for k in range(i % 4 + 1)],
            "amount_cents": (i * 37) % 100_000,
        }
    ).encode()
    return body, headers


async def fill(connection: aio_pika.abc.AbstractConnection, queue: str, n: int) -> dict[str, Any]:
    """Declare qworker's topology of ``queue`` and put ``n`` dead letters in ``queue.dlq``."""
    await declare(connection, topology(queue))
    kinds = _kinds()
    rng = random.Random(13)
    weights = [30, 15, 12, 8, 8, 6, 5, 5, 4, 3, 2, 2]
    start = datetime.now(UTC) - timedelta(days=2)
    channel = await connection.channel(publisher_confirms=True)
    header_bytes = 0
    began = time.perf_counter()
    try:
        for first in range(0, n, WINDOW):
            batch = []
            for i in range(first, min(n, first + WINDOW)):
                kind = rng.choices(kinds, weights)[0]
                body, headers = dead_letter(queue, i, kind, start + timedelta(seconds=i))
                header_bytes += len(json.dumps(headers, default=str))
                batch.append(
                    channel.default_exchange.publish(
                        aio_pika.Message(
                            body,
                            headers=headers,
                            message_id=f"m-{i:06d}",
                            content_type="application/json",
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        ),
                        routing_key=f"{queue}.dlq",
                    )
                )
            await asyncio.gather(*batch)
    finally:
        await channel.close()
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "rate": n / seconds, "header_bytes_mean": header_bytes / n}


async def depth(connection: aio_pika.abc.AbstractConnection, name: str) -> int:
    channel = await connection.channel()
    try:
        declared = await channel.declare_queue(name, passive=True)
        return int(declared.declaration_result.message_count or 0)
    finally:
        await channel.close()


async def drop(queue: str) -> None:
    connection = await aio_pika.connect(URL)
    try:
        for name in [spec.name for spec in topology(queue)]:
            channel = await connection.channel()
            try:
                await channel.queue_delete(name)
            except Exception as exc:  # gone already; say so and go on
                print(f"  delete {name}: {exc}", file=sys.stderr)
            finally:
                if not channel.is_closed:
                    await channel.close()
    finally:
        await connection.close()


# Measuring


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def stats_seconds(dlq: str) -> tuple[float, str]:
    """Wall time of ``qworker dlq stats DLQ`` (a subprocess, as an operator runs it)."""
    began = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "qworker", "dlq", "stats", dlq, "--url", URL],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=STATS_TIMEOUT,
        check=False,
    )
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"dlq stats failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return seconds, done.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Timed:
    name: str
    seconds: float
    status: int
    size: int
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None


def get(base: str, path: str, name: str) -> Timed:
    began = time.perf_counter()
    try:
        with urllib.request.urlopen(base + path, timeout=HTTP_TIMEOUT) as response:
            raw = response.read()
            status = response.status
            headers = {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as exc:
        raw, status, headers = exc.read(), exc.code, {}
    seconds = time.perf_counter() - began
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    print(f"  {name}: {seconds:.3f} s ({status}, {len(raw)} bytes)", file=sys.stderr)
    return Timed(name, seconds, status, len(raw), headers, body)


def vm(pid: int, key: str) -> int:
    """``VmHWM`` / ``VmRSS`` of ``pid`` in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def wait_ready(base: str, proc: subprocess.Popen[bytes]) -> float:
    """Wait (bounded) until the console answers a request that reads no DLQ."""
    began = time.perf_counter()
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the console exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/api/openapi.json", timeout=2) as response:
                if response.status == 200:
                    return time.perf_counter() - began
        except OSError:
            time.sleep(0.1)
    raise SystemExit("the console did not answer within 30 s")


def console_run(dlq: str, logdir: Path) -> dict[str, Any]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    quoted = urllib.parse.quote(dlq, safe="")
    err = open(logdir / "console.err", "wb")  # noqa: SIM115 (closed below)
    command = [sys.executable, "-m", "qworker", "console", "--queue", dlq, "--port", str(port)]
    proc = subprocess.Popen(
        [*command, "--url", URL],
        cwd=ROOT,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=err,
        start_new_session=True,
    )
    out: dict[str, Any] = {"pid": proc.pid}
    try:
        out["startup_seconds"] = wait_ready(base, proc)
        out["rss_idle"] = vm(proc.pid, "VmRSS")
        timed = [
            get(base, "/api/dlqs", "GET /api/dlqs (cold: scans)"),
            get(base, "/api/dlqs", "GET /api/dlqs (cached)"),
            get(base, f"/api/dlqs/{quoted}/groups", "GET groups (overview's scan reused)"),
            get(base, f"/api/dlqs/{quoted}/groups?rescan=1", "GET groups?rescan=1 (scans)"),
            get(base, f"/api/dlqs/{quoted}/groups", "GET groups (cached)"),
        ]
        groups = timed[-1].body or []
        if not groups:
            raise SystemExit(f"no groups: {timed[-1]}")
        largest, smallest = groups[0], groups[-1]
        for label, group in (("largest", largest), ("smallest", smallest)):
            timed.append(
                get(
                    base,
                    f"/api/dlqs/{quoted}/messages?fingerprint={group['fingerprint']}&limit=50",
                    f"GET messages, first page of the {label} group ({group['count']})",
                )
            )
        out["timed"] = timed
        out["groups"] = groups
        out["overview"] = timed[0].body
        out["rss_peak"] = vm(proc.pid, "VmHWM")
        out["rss_end"] = vm(proc.pid, "VmRSS")
        stop_began = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        out["exit_code"] = proc.wait(timeout=STOP_TIMEOUT)
        out["stop_seconds"] = time.perf_counter() - stop_began
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        err.close()
    out["stderr"] = (logdir / "console.err").read_text(errors="replace")[-2000:]
    return out


def git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()


def machine() -> dict[str, Any]:
    load = os.getloadavg()
    busy = subprocess.run(
        ["ps", "-eo", "pcpu,comm", "--sort=-pcpu", "--no-headers"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.splitlines()[:5]
    return {"cpus": os.cpu_count(), "load": [round(x, 2) for x in load], "top": busy}


# The run


async def fill_and_check(queue: str, n: int) -> dict[str, Any]:
    connection = await aio_pika.connect(URL)
    try:
        filled = await fill(connection, queue, n)
        filled["depth"] = await depth(connection, f"{queue}.dlq")
        return filled
    finally:
        await connection.close()


async def depth_of(queue: str) -> int:
    connection = await aio_pika.connect(URL)
    try:
        return await depth(connection, queue)
    finally:
        await connection.close()


def run(n: int, logdir: Path) -> dict[str, Any]:
    queue = f"bench.console.{uuid.uuid4().hex[:8]}"
    dlq = f"{queue}.dlq"
    result: dict[str, Any] = {
        "n": n,
        "queue": dlq,
        "commit": git("rev-parse", "--short", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no", "qworker")),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine_before": machine(),
    }
    try:
        print(f"filling {dlq} with {n} dead letters", file=sys.stderr)
        result["fill"] = asyncio.run(fill_and_check(queue, n))
        print(f"  {result['fill']}", file=sys.stderr)
        if result["fill"]["depth"] != n:
            raise SystemExit(f"filled {result['fill']['depth']} of {n}")
        print("qworker dlq stats", file=sys.stderr)
        result["stats_seconds"], stats_out = stats_seconds(dlq)
        result["stats_head"] = stats_out.splitlines()[:4]
        print(f"  {result['stats_seconds']:.3f} s", file=sys.stderr)
        result["machine_during"] = machine()
        print("qworker console", file=sys.stderr)
        result["console"] = console_run(dlq, logdir)
        print(
            "qworker dlq stats, again (brackets the console under the same load)", file=sys.stderr
        )
        result["stats_again_seconds"], _ = stats_seconds(dlq)
        print(f"  {result['stats_again_seconds']:.3f} s", file=sys.stderr)
        result["depth_after"] = asyncio.run(depth_of(dlq))
    finally:
        asyncio.run(drop(queue))
        result["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
        result["machine_after"] = machine()
    return result


def report(r: dict[str, Any]) -> str:
    c = r["console"]
    timed: list[Timed] = c["timed"]
    stats = r["stats_seconds"]
    stats_again = r["stats_again_seconds"]
    bar = max(stats, stats_again) + 1.0
    cold_overview = timed[0].seconds
    group_pages = [t for t in timed if t.name.startswith("GET groups")]
    slowest_group = max(t.seconds for t in group_pages)
    rss = c["rss_peak"] / MIB
    ok_time = max(cold_overview, slowest_group) <= bar
    fill = r["fill"]
    overview = c["overview"][0]
    lines = [
        f"# Console at scale: one DLQ of {r['n']:,} dead letters (issue 13)",
        "",
        f"`python bench/console_scale.py` at commit `{r['commit']}`"
        + (" (qworker/ had uncommitted changes by other sessions)" if r["dirty"] else "")
        + f", {r['started']} to {r['finished']} UTC. RabbitMQ 3.10 on 127.0.0.1 (quorum DLQ "
        "as qworker declares it), Python "
        f"{sys.version.split()[0]}, {r['machine_before']['cpus']} CPUs shared with other "
        "sessions.",
        "",
        "## Verdict",
        "",
        f"- Overview and group page within `dlq stats` + 1 s ({bar:.2f} s, the slower of "
        "the two stats runs): "
        f"**{'yes' if ok_time else 'no'}** (slowest: overview cold {cold_overview:.2f} s, "
        f"groups {slowest_group:.2f} s).",
        f"- Console peak RSS under 150 MiB: **{'yes' if rss < 150 else 'no'}** ({rss:.1f} MiB).",
        "",
        "## Numbers",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| fill: {r['n']:,} dead letters, confirms, {WINDOW} outstanding "
        f"| {fill['seconds']:.1f} s ({fill['rate']:,.0f} msg/s) |",
        f"| mean header size (JSON) | {fill['header_bytes_mean'] / 1024:.2f} KiB |",
        f"| `qworker dlq stats` wall time (subprocess, Python start included) | {stats:.2f} s |",
        f"| `qworker dlq stats` again, after the console's requests | {stats_again:.2f} s |",
        f"| console start until it answers | {c['startup_seconds']:.2f} s |",
    ]
    for t in timed:
        lines.append(f"| {t.name} | {t.seconds:.3f} s |")
    lines += [
        f"| console RSS idle / after the requests | {c['rss_idle'] / MIB:.1f} / "
        f"{c['rss_end'] / MIB:.1f} MiB |",
        f"| console peak RSS (VmHWM) | {rss:.1f} MiB |",
        f"| console stop after SIGTERM (exit code {c['exit_code']}) | {c['stop_seconds']:.2f} s |",
        f"| DLQ depth after everything (browsing removes nothing) | {r['depth_after']:,} |",
        "",
        f"Overview: {overview['messages']:,} messages, oldest failure "
        f"{overview['oldest_failure']}, "
        f"scan taken in {overview['scan']['seconds']} s; {len(c['groups'])} groups, largest "
        f"{c['groups'][0]['count']:,} ({c['groups'][0]['error_type']}), smallest "
        f"{c['groups'][-1]['count']:,} ({c['groups'][-1]['error_type']}).",
        "",
        "`dlq stats` output, first lines:",
        "",
        "```",
        *r["stats_head"],
        "```",
        "",
        "## Machine",
        "",
    ]
    for label in ("machine_before", "machine_during", "machine_after"):
        m = r[label]
        lines.append(
            f"- {label.split('_')[1]}: load average {m['load']}; busiest processes: "
            + "; ".join(" ".join(p.split()) for p in m["top"][:4])
        )
    lines += [
        "",
        "Timings are single runs on a shared 2-CPU machine (other sessions ran tests and "
        "builds at the same time), so take them as an order of magnitude, with the load "
        "above. The console's scan and `dlq stats` do the same work (`qworker.dlq.stats`); "
        "the stats time includes the Python start (about 0.4 s here) that the console's "
        "answers do not pay.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--out", default=str(OUT), help="results file, or - for stdout")
    args = parser.parse_args()
    logdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"console-scale-{os.getpid()}"
    logdir.mkdir(parents=True, exist_ok=True)
    result = run(args.n, logdir)
    text = report(result)
    if args.out == "-":
        print(text)
    else:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    if result["console"]["stderr"].strip():
        print("console stderr:\n" + result["console"]["stderr"], file=sys.stderr)


if __name__ == "__main__":
    main()
