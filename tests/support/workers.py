"""``qworker run APP`` children that tests start, signal, kill, scrape and read the logs of.

:class:`WorkerProcess` is one child (a worker, or a supervisor of ``--processes N``);
:class:`WorkerPool` is several children of one app. The ``worker`` fixture
(:mod:`tests.support.fixtures`) gives a :class:`WorkerProcess` of ``tests/apps/ledger_app.py``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from tests.support import ROOT
from tests.support.cli import qworker_command


@dataclass
class WorkerProcess:
    """One ``qworker run APP_SPEC --log-format json ARGS`` child in the checkout.

    ``env`` is its whole environment. Its stdout and stderr go to files in ``logdir``, one pair
    per (re)start: ``runs`` counts the starts of this ``slot``, ``pids`` lists their pids.
    ``--log-format json`` is added unless ``args`` choose a format: the log readers need it.
    """

    app_spec: str
    env: dict[str, str]
    logdir: Path
    args: list[str] = field(default_factory=list)
    slot: int = 0
    proc: subprocess.Popen[bytes] | None = None
    runs: int = 0
    pids: list[int] = field(default_factory=list)
    descendants: set[int] = field(default_factory=set)

    # Starting and waiting

    @property
    def out(self) -> Path:
        """Standard output of the current run."""
        return self.logdir / f"worker-{self.slot}-{self.runs}.out"

    @property
    def err(self) -> Path:
        """Standard error of the current run."""
        return self.logdir / f"worker-{self.slot}-{self.runs}.err"

    def launch(self, *extra: str) -> None:
        """Start the child with ``args`` then ``extra``, without waiting for anything."""
        self.runs += 1
        log_format = [] if "--log-format" in [*self.args, *extra] else ["--log-format", "json"]
        command = qworker_command("run", self.app_spec, *log_format, *self.args, *extra)
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                command, cwd=ROOT, env=self.env, stdout=out, stderr=err, start_new_session=True
            )
        self.pids.append(self.proc.pid)

    def start(self, *extra: str, timeout: float = 90) -> None:
        """:meth:`launch`, then wait until the worker consumes."""
        self.launch(*extra)
        self.wait_consuming(timeout)

    def wait_consuming(self, timeout: float = 90) -> None:
        self.wait_log('"worker.consuming"', timeout=timeout)

    def wait_log(self, text: str, count: int = 1, timeout: float = 20.0) -> None:
        """Wait until ``text`` appears ``count`` times in stdout; fails if the child exits."""
        assert self.proc is not None, "not started"
        deadline = time.monotonic() + timeout
        while self.out.read_text(errors="replace").count(text) < count:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"worker {self.slot} exited with {self.proc.returncode} "
                    f"before logging {text!r} x{count}:\n{self.output()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"worker {self.slot}: {text!r} x{count} not logged in time:\n{self.output()}"
                )
            time.sleep(0.05)

    # Signals and stopping

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def kill9(self) -> None:
        """SIGKILL the child (it must have been started) and reap it."""
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

    def children(self) -> list[int]:
        """The pids of the child's own children (a supervisor's workers); remembered for kill."""
        assert self.proc is not None
        pids = [c.pid for c in psutil.Process(self.proc.pid).children()]
        self.descendants.update(pids)
        return pids

    def kill(self) -> None:
        """SIGKILL the child if it runs, and every child of it :meth:`children` has seen."""
        if self.alive():
            assert self.proc is not None
            with contextlib.suppress(psutil.NoSuchProcess):
                self.children()
            self.proc.kill()
            self.proc.wait(timeout=10)
        for pid in self.descendants:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    # Output

    def text(self) -> str:
        """The whole stdout then stderr of the current run."""
        return self.out.read_text(errors="replace") + self.err.read_text(errors="replace")

    def output(self) -> str:
        """The ends of stdout and stderr of the current run, for failure messages."""
        out = self.out.read_text(errors="replace")[-4000:]
        return out + "\n--- stderr\n" + self.err.read_text(errors="replace")[-2000:]

    def events(self, name: str) -> list[dict[str, Any]]:
        """The JSON log records of event ``name`` in the current run's stdout."""
        records = []
        for line in self.out.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("event") == name:
                    records.append(record)
        return records

    # Files the ledger app writes (see tests/apps/ledger_app.py)

    def _lines(self, variable: str) -> list[str]:
        path = Path(self.env[variable])
        return path.read_text().split() if path.exists() else []

    def ledger(self) -> list[str]:
        """Ids handled successfully, in order (QWORKER_APP_LEDGER)."""
        return self._lines("QWORKER_APP_LEDGER")

    def started(self) -> list[str]:
        """Ids whose handler started, in order (QWORKER_APP_STARTED)."""
        return self._lines("QWORKER_APP_STARTED")

    def handler_pids(self) -> set[int]:
        """The pids of the processes that handled a message successfully (QWORKER_APP_PIDS)."""
        return {int(p) for p in self._lines("QWORKER_APP_PIDS")}

    # Metrics and health (``--metrics-port 0``)

    @property
    def port(self) -> int:
        """The port of the (first) metrics and health server."""
        self.wait_log('"http.serving"')
        match = re.search(r'"port": (\d+)', self.out.read_text())
        assert match, self.output()
        return int(match.group(1))

    def get(self, path: str) -> tuple[int, bytes]:
        """``GET path`` on the metrics and health server: (status, body)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` whose labels include ``labels``."""
        from prometheus_client.parser import text_string_to_metric_families

        status, body = self.get("/metrics")
        assert status == 200
        total = 0.0
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                if sample.name == name and labels.items() <= sample.labels.items():
                    total += sample.value
        return total


class WorkerPool:
    """Several :class:`WorkerProcess` of one app; :meth:`close` kills whatever is left."""

    def __init__(
        self,
        app_spec: str,
        env: dict[str, str],
        logdir: Path,
        count: int,
        args: Sequence[str] = (),
    ) -> None:
        self.workers = [
            WorkerProcess(app_spec, env, logdir, list(args), slot=i) for i in range(count)
        ]
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
                w.signal(signal.SIGTERM)
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
