"""Counting handler calls across processes, for the multi-process contenders (``*_p2_c``).

The harness's counter (``bench_common.Reporter`` on ``ctx.counter_path``) has one writer: each
``Reporter`` keeps its own totals and overwrites the whole 64-byte record on every event, so two
processes writing it would overwrite each other's counts. Here every process that runs handlers
gets its own counter file, ``<counter_path>.p<pid>`` (same layout, created on its first event,
a new one after a fork), and an :class:`Aggregator` thread in the process the harness started
(the framework's main process: qworker's supervisor, dramatiq's and celery's parent) sums them
into ``ctx.counter_path`` every 5 ms: calls and completions added, first call the earliest,
last completion and last call the latest. The time stamps are the workers' own
``time.monotonic()`` values, so the measured interval is exact; only the harness's view of
the progress lags by up to 5 ms (it polls every 20 ms anyway).

The leading underscore keeps ``contenders.discover()`` from listing this module.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import mmap
import os
import signal
import sys
import threading

from bench_common import _LAYOUT, COUNTER_SIZE, CounterReader, Reporter, create_counter

INTERVAL = 0.005  # seconds between two sums
RESCAN = 20  # look for new per-process files every RESCAN sums (0.1 s)


class ProcessReporter:
    """``report.call()`` / ``report.done()`` for handlers that may run in any process."""

    def __init__(self, counter_path: str) -> None:
        self._base = counter_path
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._rep: Reporter | None = None

    def _mine(self) -> Reporter:
        rep = self._rep
        if rep is None:
            with self._lock:  # dramatiq runs 8 handler threads per process
                if self._rep is None:
                    path = f"{self._base}.p{os.getpid()}"
                    create_counter(path)
                    self._rep = Reporter(path)
                rep = self._rep
        return rep

    def call(self) -> int:
        return self._mine().call()

    def done(self) -> None:
        self._mine().done()


class Aggregator:
    """A daemon thread summing every ``<counter_path>.p*`` into ``counter_path``."""

    def __init__(self, counter_path: str) -> None:
        self._base = counter_path
        self._f = open(counter_path, "r+b")  # noqa: SIM115 -- closed in close()
        self._mm = mmap.mmap(self._f.fileno(), COUNTER_SIZE)
        self._readers: dict[str, CounterReader] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-aggregator", daemon=True)

    def start(self) -> Aggregator:
        self._thread.start()
        return self

    def _scan(self) -> None:
        for path in glob.glob(glob.escape(self._base) + ".p*"):
            if path not in self._readers:
                with contextlib.suppress(OSError, ValueError):  # not yet 64 bytes long
                    if os.path.getsize(path) >= COUNTER_SIZE:
                        self._readers[path] = CounterReader(path)

    def collect(self) -> None:
        calls = done = 0
        t_first = t_last = t_call = 0.0
        for reader in self._readers.values():
            c = reader.read()
            calls += c["calls"]
            done += c["done"]
            if c["t_first"] and (not t_first or c["t_first"] < t_first):
                t_first = c["t_first"]
            t_last = max(t_last, c["t_last"])
            t_call = max(t_call, c["t_call"])
        _LAYOUT.pack_into(self._mm, 0, calls, done, t_first, t_last, t_call)

    def _run(self) -> None:
        i = 0
        while not self._stop.wait(INTERVAL):
            if i % RESCAN == 0:
                self._scan()
            self.collect()
            i += 1

    def close(self) -> None:
        """Stop the thread, write the final sums, remove the per-process files."""
        self._stop.set()
        self._thread.join(5)
        self._scan()
        self.collect()
        split = {path.rsplit(".p", 1)[1]: (r.read()["calls"], r.read()["done"])
                 for path, r in self._readers.items()}  # fmt: skip
        print(f"bench-aggregator: calls/done per process: {split}", file=sys.stderr, flush=True)
        for path, reader in self._readers.items():
            reader.close()
            with contextlib.suppress(OSError):
                os.remove(path)
        self._mm.close()
        self._f.close()


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Linux: get ``sig`` when the parent process dies (for forked worker processes, which
    would otherwise outlive a harness that killed their parent)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
