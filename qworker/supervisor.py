"""``qworker run APP --processes N``: a supervisor that keeps N worker processes running.

Each worker is a separate ``python -m qworker run APP ...`` child (same options, minus
``--processes`` and the metrics server) with its own broker connection, in its own
process group, so a terminal's Ctrl-C reaches the supervisor only and it decides.

- **Restarts.** A child that exits while the supervisor is not stopping is started
  again after a backoff of 0.5 s doubling to 30 s (reset once a child has lived 60 s).
- **Crash loop.** 10 unexpected exits within 120 s (``--crash-limit``, ``--crash-window``)
  stop everything: one line on stderr, exit code 1. The limit is above a handler's
  ``max_deliveries`` (5) so that a poison message, which kills a worker on each of its
  deliveries, is dead-lettered as ``poison`` before the fleet stops. Children that die
  before they were ever ready cannot have been killed by a message: 5 such exits within
  60 s are a crash loop already (a child that dies on every start ends here within seconds).
- **Configuration failure.** A child exiting with code 2 or 3 (bad usage, the app
  cannot be imported, its topology conflicts with existing queues) cannot be fixed by
  a restart: everything stops at once, one line on stderr, the child's exit code.
- **Signals.** SIGTERM or SIGINT is forwarded as SIGTERM to every child, which drains
  (``--grace``); children still alive ``grace + 15`` s later are killed. Exit code 0
  when every child drained cleanly, else 1.
- **Readiness.** The supervisor gives its children a fresh temp directory
  (``QWORKER_SUPERVISOR_DIR``). A child keeps the file ``ready-<pid>`` there exactly
  while its worker is ready (checked every 0.2 s), and stops itself if the supervisor
  goes away. With ``--metrics-port`` the same directory is the children's
  ``PROMETHEUS_MULTIPROC_DIR``; it is removed when the supervisor exits.
- **Alerts and the DLQ poller.** With the app (``app=``), the supervisor evaluates its
  alert rules for all children: each child forwards the outcomes the rules look at as JSON
  datagrams to the Unix socket ``outcomes.sock`` in that directory
  (``QWORKER_SUPERVISOR_OUTCOMES``) and suspends its own rules. A child enqueues a small
  record per outcome (bounded, 10,000) and a loop callback sends batches without blocking;
  a full socket buffer is retried 50 ms later, a vanished supervisor drops the reports. The
  supervisor alone polls the DLQs (:mod:`qworker.watch`), so their gauges are not summed.

The children's side of all this (the readiness file, the outcome relay) is
:mod:`qworker.supervised`, which a worker imports without this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import tempfile
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from qworker.alerts import AlertRule, rules_of
from qworker.health import DEFAULT_HOST, Endpoint, HttpServer, Response, metrics_route
from qworker.supervised import (
    ENV_DIR,
    ENV_METRICS,
    ENV_OUTCOMES,
    ENV_PID,
    MAX_DATAGRAM,
    POLL,
    decode_outcomes,
)

if TYPE_CHECKING:
    from qworker.app import App
    from qworker.metrics import MttrHistograms
    from qworker.watch import Watcher

OUTCOMES_SOCKET = "outcomes.sock"
EXIT_FAILURE = 1
FATAL_CODES = (2, 3)  # bad usage, app cannot be loaded or topology conflicts: restarts won't help
CLEAN_CODES = (0, -signal.SIGTERM)  # after a stop; -SIGTERM: stopped before it could drain
KILL_MARGIN = 15.0


@dataclass(frozen=True, slots=True)
class Exit:
    """How the supervisor ended: the process exit code and, on failure, one line to print."""

    code: int
    error: str | None = None


@dataclass(slots=True)
class _Slot:
    index: int
    proc: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    generation: int = 0
    ready: bool = False
    ever_ready: bool = False
    failures: int = 0
    stop_code: int = 0
    """Exit code of the child that was running when the stop came (0 when none was)."""

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


@dataclass(slots=True)
class Limits:
    """Restart and crash-loop settings."""

    crash_limit: int = 10
    """Unexpected exits within ``crash_window`` that stop everything (above max_deliveries)."""
    crash_window: float = 120.0
    start_limit: int = 5
    """Exits of children that were never ready, within ``start_window``, that stop everything."""
    start_window: float = 60.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    stable_after: float = 60.0

    def backoff(self, failures: int) -> float:
        """Seconds before the restart after ``failures`` consecutive failures (1-based)."""
        return float(min(self.backoff_initial * 2 ** min(failures - 1, 30), self.backoff_max))


@dataclass
class Supervisor:
    """Runs ``processes`` copies of ``command`` until stopped (see the module docstring)."""

    command: Sequence[str]
    processes: int
    grace: float
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    metrics_host: str = DEFAULT_HOST
    metrics_port: int | None = None
    limits: Limits = field(default_factory=Limits)
    app: App | None = None
    """The app (imported by the supervisor too): its alert rules and DLQs are served here."""
    queues: Sequence[str] | None = None
    dlq_poll: float = 15.0

    def __post_init__(self) -> None:
        self._slots = [_Slot(i) for i in range(1, self.processes + 1)]
        self._crashes: deque[float] = deque()
        self._start_crashes: deque[float] = deque()
        self._rules: list[AlertRule] = rules_of(self.app.observers) if self.app else []
        self._inbox: socket.socket | None = None
        self._watcher: Watcher | None = None
        self._durations: MttrHistograms | None = None
        #: Outcomes received from children (for tests and facts).
        self.received = 0
        self._restarts = 0
        self._stopping = asyncio.Event()
        self._fatal: Exit | None = None
        self._all_ready = False
        self._ever_ready = False
        self._killer: asyncio.Task[None] | None = None
        self._dir = ""
        self._log = structlog.get_logger("qworker")

    async def run(self) -> Exit:
        """Start the children and keep them running until a signal or a fatal failure."""
        self._dir = tempfile.mkdtemp(prefix="qworker-")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop, sig)
        server: HttpServer | None = None
        monitor = asyncio.create_task(self._monitor())
        watch: asyncio.Task[None] | None = None
        try:
            self._log.info("supervisor.starting", processes=self.processes, pid=os.getpid())
            self._open_inbox(loop)
            if self.app is not None:
                from qworker.watch import Watcher

                if self.metrics_port is not None:
                    from qworker.metrics import MttrHistograms

                    self._durations = MttrHistograms()
                self._watcher = Watcher(
                    self.app,
                    self.queues,
                    interval=self.dlq_poll,
                    export=self.metrics_port is not None,
                    durations=[self._durations] if self._durations is not None else (),
                )
                if self._watcher.needed:
                    watch = asyncio.create_task(self._watcher.run())
            if self.metrics_port is not None:
                server = HttpServer(self._routes(), self.metrics_host, self.metrics_port)
                await server.start()
            await asyncio.gather(*(self._keep(slot) for slot in self._slots))
        finally:
            monitor.cancel()
            if self._inbox is not None:
                loop.remove_reader(self._inbox.fileno())
                self._inbox.close()
            if self._rules:  # notifications under way get a few seconds
                await asyncio.gather(*(rule.wait(5.0) for rule in self._rules))
            if watch is not None:
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await watch
            if self._killer is not None:
                self._killer.cancel()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            if server is not None:
                await server.close()
            for slot in self._slots:  # only after an internal error
                if slot.alive and slot.proc is not None:
                    slot.proc.kill()
            shutil.rmtree(self._dir, ignore_errors=True)
        if self._fatal is not None:
            return self._fatal
        clean = all(slot.stop_code in CLEAN_CODES for slot in self._slots)
        self._log.info("supervisor.stopped", clean=clean)
        return Exit(0 if clean else EXIT_FAILURE)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop restarting and ask every child to drain (SIGTERM); idempotent."""
        if not self._stopping.is_set():
            self._log.info("supervisor.stopping", signal=signal.Signals(sig).name)
            self._stopping.set()
            self._killer = asyncio.create_task(self._kill_after(self.grace + KILL_MARGIN))
        for slot in self._slots:
            if slot.alive and slot.proc is not None:
                slot.proc.send_signal(signal.SIGTERM)

    # Children

    async def _keep(self, slot: _Slot) -> None:
        """Run one slot's child, restarting it, until stopping."""
        while not self._stopping.is_set():
            proc = await self._spawn(slot)
            code = await proc.wait()
            was_ready = slot.ever_ready or self._ready_file(proc.pid).exists()
            self._forget(proc.pid)
            slot.ready = False
            if self._stopping.is_set():
                slot.stop_code = code
                self._log.info("supervisor.child_stopped", slot=slot.index, pid=proc.pid, code=code)
                return
            uptime = time.monotonic() - slot.started_at
            self._log.error(
                "supervisor.child_exited",
                slot=slot.index,
                pid=proc.pid,
                code=code,
                signal=_signal_name(code),
                uptime=round(uptime, 3),
                was_ready=was_ready,
            )
            self._ever_ready = self._ever_ready or was_ready
            if code in FATAL_CODES:
                when = "after" if was_ready else "before"
                self._give_up(
                    f"worker process {slot.index} (pid {proc.pid}) exited with code {code} "
                    f"{when} it was ready; stopped the others (its error is above)",
                    code,
                )
                return
            if self._crash_loop(was_ready, code):
                return
            slot.failures = 1 if uptime >= self.limits.stable_after else slot.failures + 1
            delay = self.limits.backoff(slot.failures)
            self._log.warning("supervisor.restarting", slot=slot.index, delay=delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    def _crash_loop(self, was_ready: bool, code: int) -> bool:
        """Count an unexpected exit; True (and giving up) when it makes a crash loop."""
        now, limits = time.monotonic(), self.limits
        windows = [(self._crashes, limits.crash_limit, limits.crash_window)]
        if not was_ready:  # a child that never took a message: a start failure
            windows.append((self._start_crashes, limits.start_limit, limits.start_window))
        for times, _limit, window in windows:
            times.append(now)
            while times and times[0] < now - window:
                times.popleft()
        for times, limit, window in windows:
            if len(times) >= limit:
                never = "" if self._ever_ready else ", none of them ever ready"
                self._give_up(
                    f"crash loop: worker processes exited {len(times)} times within "
                    f"{window:g}s{never} (last exit code {code}); stopped",
                    EXIT_FAILURE,
                )
                return True
        return False

    async def _spawn(self, slot: _Slot) -> asyncio.subprocess.Process:
        env = dict(self.env)
        env[ENV_DIR] = self._dir
        env[ENV_PID] = str(os.getpid())
        env.pop(ENV_OUTCOMES, None)
        if self._inbox is not None:
            env[ENV_OUTCOMES] = str(Path(self._dir, OUTCOMES_SOCKET))
        if self.metrics_port is not None:
            env["PROMETHEUS_MULTIPROC_DIR"] = self._dir
            env.pop("prometheus_multiproc_dir", None)
            env[ENV_METRICS] = "1"
        proc = await asyncio.create_subprocess_exec(*self.command, env=env, process_group=0)
        slot.proc, slot.started_at, slot.ever_ready = proc, time.monotonic(), False
        slot.generation += 1
        if slot.generation > 1:
            self._restarts += 1
        self._log.info(
            "supervisor.child_started", slot=slot.index, pid=proc.pid, generation=slot.generation
        )
        if self._stopping.is_set():  # a stop arrived while it was being spawned
            proc.send_signal(signal.SIGTERM)
        return proc

    def _give_up(self, message: str, code: int) -> None:
        if self._fatal is None:
            self._fatal = Exit(code, message)
            self._log.error("supervisor.giving_up", reason=message)
        self.stop()

    async def _kill_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        for slot in self._slots:
            if slot.alive and slot.proc is not None:
                self._log.error("supervisor.child_killed", slot=slot.index, pid=slot.proc.pid)
                slot.proc.kill()

    # Outcomes from the children (alert rules evaluated here)

    def _open_inbox(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind ``outcomes.sock`` when rules count outcomes; children send datagrams to it."""
        if not any(rule.kinds for rule in self._rules):
            return
        inbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            inbox.bind(str(Path(self._dir, OUTCOMES_SOCKET)))
        except OSError as exc:  # e.g. a TMPDIR too long for a socket path
            inbox.close()
            self._log.warning(
                "supervisor.alerts_per_process", why="cannot bind outcomes.sock", error=str(exc)
            )
            return
        with contextlib.suppress(OSError):
            inbox.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        inbox.setblocking(False)
        loop.add_reader(inbox.fileno(), self._receive)
        self._inbox = inbox

    def _receive(self) -> None:
        assert self._inbox is not None
        for _ in range(256):  # then let the loop breathe; the reader is called again
            try:
                data = self._inbox.recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            for event in decode_outcomes(data):
                self.received += 1
                for rule in self._rules:
                    try:
                        rule.outcome(event)
                    except Exception:
                        self._log.exception("alert.rule_failed", rule=rule.description)

    # Readiness and health

    def _ready_file(self, pid: int) -> Path:
        return Path(self._dir, f"ready-{pid}")

    def _forget(self, pid: int) -> None:
        """Remove a dead child's ready file and live gauges (its counters stay in the sum)."""
        self._ready_file(pid).unlink(missing_ok=True)
        if self.metrics_port is not None:
            from qworker.metrics import mark_process_dead

            mark_process_dead(pid, self._dir)

    async def _monitor(self) -> None:
        """Track which children are ready; log when all are, and when that changes."""
        while True:
            for slot in self._slots:
                proc = slot.proc
                slot.ready = bool(proc and slot.alive and self._ready_file(proc.pid).exists())
                slot.ever_ready = slot.ever_ready or slot.ready
                self._ever_ready = self._ever_ready or slot.ready
            all_ready = all(slot.ready for slot in self._slots)
            if all_ready != self._all_ready and not self._stopping.is_set():
                self._all_ready = all_ready
                event = "supervisor.ready" if all_ready else "supervisor.not_ready"
                self._log.info(event, pids=[s.proc.pid for s in self._slots if s.proc])
            await asyncio.sleep(POLL)

    def facts(self) -> dict[str, Any]:
        """The children as health endpoints report them."""
        children = [
            {
                "slot": s.index,
                "pid": s.proc.pid if s.proc else None,
                "alive": s.alive,
                "ready": s.ready and s.alive,
            }
            for s in self._slots
        ]
        return {
            "processes": self.processes,
            "alive": sum(c["alive"] for c in children),
            "ready": sum(c["ready"] for c in children),
            "restarts": self._restarts,
            "stopping": self._stopping.is_set(),
            "children": children,
            "outcomes_received": self.received,
        }

    def _routes(self) -> dict[str, Endpoint]:
        from qworker.metrics import dlq_collector, render_multiprocess, supervisor_collector

        collector = supervisor_collector(
            lambda: self._restarts, lambda: sum(s.alive for s in self._slots)
        )
        watcher = self._watcher
        dlqs = dlq_collector(lambda: list(watcher.latest.values()) if watcher else [])
        extra = [collector, dlqs] + ([self._durations.registry] if self._durations else [])

        async def healthz() -> Response:
            # Liveness: the supervisor answers. It restarts its children itself; a
            # restart of the whole pod would only reset that work (and the breakers).
            return Response.check(True, self.facts())

        async def readyz() -> Response:
            facts = self.facts()
            ok = facts["ready"] == self.processes and not facts["stopping"]
            return Response.check(ok, facts)

        return {
            "/healthz": healthz,
            "/readyz": readyz,
            "/metrics": metrics_route(lambda: render_multiprocess(self._dir, extra)),
        }


def _signal_name(code: int) -> str | None:
    """``SIGKILL`` for a child killed by signal 9 (exit code -9); None for a normal exit."""
    if code >= 0:
        return None
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"
