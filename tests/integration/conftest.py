"""Subprocess workers for tests that kill, signal or disconnect them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class WorkerProcess:
    """A ``qworker run tests.apps.ledger_app:app`` child with its ledger files."""

    queue: str
    tmp: Path
    env: dict[str, str]
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    runs: int = 0

    @property
    def ledger(self) -> Path:
        return self.tmp / "ledger.txt"

    @property
    def started(self) -> Path:
        return self.tmp / "started.txt"

    @property
    def log(self) -> Path:
        return self.tmp / f"worker-{self.runs}.log"

    def start(self, timeout: float = 20.0) -> None:
        self.runs += 1
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "qworker",
                    "run",
                    "tests.apps.ledger_app:app",
                    "--log-format",
                    "json",
                    *self.args,
                ],
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while b"worker.consuming" not in self.log.read_bytes():
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited early:\n{self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"worker not consuming:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def lines(self, path: Path) -> list[str]:
        return path.read_text().split() if path.exists() else []

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture
def worker_process(
    broker_url: str, queue_name: str, tmp_path: Path, cleanup: list[str]
) -> Iterator[WorkerProcess]:
    """A subprocess worker on ``queue_name`` (not started); killed after the test."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "QWORKER_TEST_URL": broker_url,
        "QWORKER_TEST_QUEUE": queue_name,
        "QWORKER_TEST_LEDGER": str(tmp_path / "ledger.txt"),
        "QWORKER_TEST_STARTED": str(tmp_path / "started.txt"),
    }
    cleanup.extend([queue_name, f"{queue_name}.dlq"])
    cleanup.extend(f"{queue_name}.retry.{t}" for t in ("200ms", "400ms", "2s", "4s"))
    worker = WorkerProcess(queue_name, tmp_path, env)
    yield worker
    worker.stop()
