"""Subprocess workers (``python -m qworker run ...``) that tests start, kill and stop."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.faults.nodes import ROOT


@dataclass
class WorkerProc:
    """One ``python -m qworker run`` child; ``runs`` counts (re)starts of this slot."""

    slot: int
    app_spec: str
    env: dict[str, str]
    logdir: Path
    args: list[str]
    proc: subprocess.Popen[bytes] | None = None
    runs: int = 0
    pids: list[int] = field(default_factory=list)

    @property
    def out(self) -> Path:
        return self.logdir / f"worker-{self.slot}-{self.runs}.out"

    @property
    def err(self) -> Path:
        return self.logdir / f"worker-{self.slot}-{self.runs}.err"

    def launch(self) -> None:
        self.runs += 1
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "qworker", "run", self.app_spec, *self.args],
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        self.pids.append(self.proc.pid)

    def wait_consuming(self, timeout: float = 90) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while b'"worker.consuming"' not in self.out.read_bytes():
            if self.proc.poll() is not None:
                raise AssertionError(f"worker {self.slot} exited early: {self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"worker {self.slot} not consuming: {self.tail()}")
            time.sleep(0.05)

    def start(self, timeout: float = 90) -> None:
        self.launch()
        self.wait_consuming(timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self, timeout: float, *, send: bool = True) -> int | None:
        """SIGTERM (once) and wait; the exit code, or None if it had to be killed."""
        if self.proc is None:
            return None
        if send and self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def tail(self) -> str:
        text = self.out.read_text(errors="replace")[-2000:]
        return text + self.err.read_text(errors="replace")[-2000:]


class WorkerPool:
    """Several subprocess workers of one app; :meth:`close` kills whatever is left."""

    def __init__(
        self,
        app_spec: str,
        env: dict[str, str],
        logdir: Path,
        count: int,
        args: Sequence[str] = (),
    ) -> None:
        self.workers = [WorkerProc(i, app_spec, env, logdir, list(args)) for i in range(count)]
        self.logdir = logdir

    def start(self) -> None:
        for w in self.workers:
            w.launch()
        for w in self.workers:
            w.wait_consuming()

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers if w.proc is not None and w.alive()]

    def terminate(self, grace: float) -> list[int | None]:
        for w in self.workers:
            if w.alive():
                assert w.proc is not None
                w.proc.send_signal(signal.SIGTERM)
        return [w.terminate(grace + 15, send=False) for w in self.workers]

    def close(self) -> None:
        for w in self.workers:
            w.kill()

    def log_paths(self) -> list[Path]:
        return sorted(self.logdir.glob("worker-*.out")) + sorted(self.logdir.glob("worker-*.err"))

    def events(self) -> Counter[str]:
        """How many times each structlog event appears in all workers' JSON logs."""
        counts: Counter[str] = Counter()
        for path in self.logdir.glob("worker-*.out"):
            for line in path.read_bytes().splitlines():
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if isinstance(record, dict):
                        counts[str(record.get("event"))] += 1
        return counts


def worker_env(
    urls: Sequence[str], name: str, queue: str, ledger: Path, control: Path, **extra: str
) -> dict[str, str]:
    """The environment of a fault-app worker (see ``tests/faults/fault_app.py``)."""
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "QWF_URL": ",".join(urls),
        "QWF_NAME": name,
        "QWF_QUEUE": queue,
        "QWF_LEDGER": str(ledger),
        "QWF_CONTROL": str(control),
        **extra,
    }
