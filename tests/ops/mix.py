"""``qworker run tests.apps.ops_app:app ...`` as a subprocess, with HTTP and metrics helpers."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import publish_raw

ROOT = Path(__file__).resolve().parents[2]
TIERS = ("200ms", "400ms")


@dataclass
class OpsProcess:
    """A ``qworker run`` child (one worker, or a supervisor) of the ops test app."""

    queue: str
    tmp: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    descendants: set[int] = field(default_factory=set)

    @property
    def app_name(self) -> str:
        return f"ops-{self.queue}"

    @property
    def out(self) -> Path:
        return self.tmp / "stdout.log"

    @property
    def err(self) -> Path:
        return self.tmp / "stderr.log"

    def start(self, *args: str) -> None:
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "qworker", "run", "tests.apps.ops_app:app", *args],
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )

    def wait_log(self, text: str, count: int = 1, timeout: float = 20.0) -> None:
        """Wait until ``text`` appears ``count`` times in stdout (fails if the process exits)."""
        deadline = time.monotonic() + timeout
        while self.out.read_text().count(text) < count:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"exited with {self.proc.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} x{count} not logged in time:\n{self.output()}")
            time.sleep(0.05)

    def output(self) -> str:
        return self.out.read_text()[-4000:] + "\n--- stderr\n" + self.err.read_text()[-2000:]

    def events(self, name: str) -> list[dict[str, Any]]:
        lines = (json.loads(line) for line in self.out.read_text().splitlines() if "{" in line)
        return [e for e in lines if e.get("event") == name]

    @property
    def port(self) -> int:
        """The port of the (first) metrics and health server."""
        self.wait_log('"http.serving"')
        match = re.search(r'"port": (\d+)', self.out.read_text())
        assert match, self.output()
        return int(match.group(1))

    def get(self, path: str) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` whose labels include ``labels``."""
        status, body = self.get("/metrics")
        assert status == 200
        total = 0.0
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                if sample.name == name and labels.items() <= sample.labels.items():
                    total += sample.value
        return total

    def children(self) -> list[int]:
        assert self.proc is not None
        pids = [c.pid for c in psutil.Process(self.proc.pid).children()]
        self.descendants.update(pids)
        return pids

    def ledger(self) -> list[str]:
        path = self.tmp / "ledger.txt"
        return path.read_text().split() if path.exists() else []

    def started(self) -> list[str]:
        path = self.tmp / "started.txt"
        return path.read_text().split() if path.exists() else []

    def handler_pids(self) -> set[int]:
        path = self.tmp / "pids.txt"
        return {int(p) for p in path.read_text().split()} if path.exists() else set()

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.children()
            self.proc.kill()
            self.proc.wait(timeout=10)
        for pid in self.descendants:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def ops(
    broker_url: str, queue_name: str, tmp_path: Path, cleanup: list[str]
) -> Iterator[OpsProcess]:
    """The ops app on ``queue_name`` (not started); killed and its queues deleted afterwards."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "QWORKER_OPS_URL": broker_url,
        "QWORKER_OPS_QUEUE": queue_name,
        "QWORKER_OPS_LEDGER": str(tmp_path / "ledger.txt"),
        "QWORKER_OPS_STARTED": str(tmp_path / "started.txt"),
        "QWORKER_OPS_PIDS": str(tmp_path / "pids.txt"),
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    cleanup.extend([queue_name, f"{queue_name}.dlq", *(f"{queue_name}.retry.{t}" for t in TIERS)])
    process = OpsProcess(queue_name, tmp_path, env)
    yield process
    process.kill()


async def publish(
    amqp: aio_pika.abc.AbstractConnection, queue: str, ident: str, mode: str = "ok", **extra: Any
) -> None:
    """Publish one JSON message for the ops app."""
    body = json.dumps({"id": ident, "mode": mode, **extra}).encode()
    message = aio_pika.Message(body, content_type="application/json", message_id=ident)
    await publish_raw(amqp, queue, message)


MIX = {"ok": 7, "fail_once": 3, "permanent": 2}


async def publish_mix(amqp: aio_pika.abc.AbstractConnection, queue: str) -> None:
    """7 successes, 3 retried-then-succeeded, 2 permanent failures."""
    for mode, count in MIX.items():
        for n in range(count):
            await publish(amqp, queue, f"{mode}-{n}", mode)


def assert_mix_counted(process: OpsProcess, queue: str) -> None:
    """The metrics show exactly the outcomes of :func:`publish_mix`."""
    deadline = time.monotonic() + 20
    total = "qworker_messages_total"
    while (
        process.metric(total, outcome="succeeded") < 10
        or process.metric(total, outcome="dead_lettered") < 2
    ):
        assert time.monotonic() < deadline, process.output()
        time.sleep(0.1)
    time.sleep(0.5)  # nothing more may come
    handler = "tests.apps.ops_app:handle"
    q = {"queue": queue}
    assert process.metric(total, **q, handler=handler, outcome="succeeded") == 10
    assert process.metric(total, **q, handler=handler, outcome="retried") == 3
    assert process.metric(total, **q, handler=handler, outcome="dead_lettered") == 2
    assert process.metric("qworker_retries_total", **q, tier="200ms") == 3
    assert process.metric("qworker_retries_total", **q) == 3
    assert process.metric("qworker_dead_letters_total", **q, reason="permanent_error") == 2
    assert process.metric("qworker_dead_letters_total", **q) == 2
    failures = "qworker_failures_total"
    assert process.metric(failures, **q, outcome="retried", severity="low") == 3
    assert process.metric(failures, **q, outcome="dead_lettered", severity="high") == 2
    assert process.metric("qworker_handler_seconds_count", **q, handler=handler) == 15
    assert process.metric("qworker_in_flight", **q) == 0
    assert process.metric("qworker_circuit_state", **q) == 0
