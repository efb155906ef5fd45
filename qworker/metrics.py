"""Prometheus metrics: an :class:`~qworker.events.Observer` that counts outcomes.

Needs the ``metrics`` extra (``pip install 'qworker[metrics]'``). Every metric lives
in the :class:`Metrics` object's own ``CollectorRegistry``, never the global one. Under
``qworker run --processes N`` the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` for its
children, prometheus-client then keeps the values in files there, and the supervisor
serves the sum over its children (:func:`render_multiprocess`).

- ``qworker_messages_total{queue,handler,outcome}``: succeeded, retried, dead_lettered
- ``qworker_retries_total{queue,tier}``: retries scheduled, by tier (``500ms``, ``2s``)
- ``qworker_dead_letters_total{queue,reason}``: by dead-letter reason
- ``qworker_failures_total{queue,handler,outcome,severity}``: retried and dead-lettered
  deliveries by :class:`~qworker.events.Severity` (``low`` for every retry)
- ``qworker_handler_seconds{queue,handler}``: histogram of handler run time
- ``qworker_in_flight{queue}``: gauge, handlers running (summed over live processes)
- ``qworker_circuit_state{queue}``: gauge, 0 closed, 1 half-open, 2 open (worst live process)
- ``qworker_dlq_messages{queue}``, ``qworker_dlq_oldest_age_seconds{queue}``: the DLQ of
  ``queue`` as the poller (:mod:`qworker.watch`) last saw it; the age is computed when
  scraped from the head's failure time. Under a supervisor only the supervisor polls and
  serves them (never summed over the children).
- ``qworker_mttd_seconds{queue}``, ``qworker_mttr_seconds{queue}``: histograms, one
  observation per failure group of the DLQ of ``queue`` (time to detect, time to resolve;
  :mod:`qworker.dlq.mttr`), fed by the poller from the audit trail (:class:`MttrHistograms`);
  like the DLQ gauges, only the polling process observes them.

Per event the cost is one dict lookup and a few increments: label children are
bound once per queue/handler (and reason, tier, severity) and cached.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

try:
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        generate_latest,
    )
    from prometheus_client import multiprocess as _multiprocess
    from prometheus_client import values as _values
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "qworker metrics need prometheus-client: pip install 'qworker[metrics]'"
    ) from exc

from qworker.alerts import DlqObserver, DlqSample
from qworker.dlq.mttr import MttrObserver, Observation
from qworker.events import CircuitState, Observer, Outcome, OutcomeKind

if TYPE_CHECKING:
    from qworker.app import App

#: Handler durations, seconds: from 1 ms to the five minutes a slow handler may take.
BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

#: MTTD and MTTR, seconds: from a minute to a week.
MTTR_BUCKETS = (60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600, 86400, 3 * 86400, 7 * 86400)

#: ``qworker_circuit_state`` values.
CIRCUIT_VALUES = {CircuitState.CLOSED: 0, CircuitState.HALF_OPEN: 1, CircuitState.OPEN: 2}

CONTENT_TYPE = CONTENT_TYPE_LATEST


_Key = tuple[str, str, str, str | None, str | None, str | None]
"""queue, handler, outcome, reason, tier, severity."""


@dataclass(slots=True)
class _Success:
    messages: Counter
    seconds: Histogram


@dataclass(slots=True)
class _Failure:
    messages: Counter
    failures: Counter
    detail: Counter
    """``qworker_retries_total`` (by tier) or ``qworker_dead_letters_total`` (by reason)."""
    seconds: Histogram | None
    """None when the handler never ran (the body could not be decoded)."""


class MttrHistograms(MttrObserver):
    """``qworker_mttd_seconds`` and ``qworker_mttr_seconds`` (label ``queue``), in ``registry``
    (a new one by default: then :attr:`registry` is a collector a supervisor can serve)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.mttd = Histogram(
            "qworker_mttd_seconds",
            "Failure groups of the DLQ of queue: first failure to first alert (once per group).",
            ["queue"],
            buckets=MTTR_BUCKETS,
            registry=self.registry,
        )
        self.mttr = Histogram(
            "qworker_mttr_seconds",
            "Failure groups of the DLQ of queue: first failure to the replay that resolved it "
            "(once per group, when the replay has not come back within the window).",
            ["queue"],
            buckets=MTTR_BUCKETS,
            registry=self.registry,
        )

    def mttr_prepare(self, queues: Iterable[str]) -> None:
        """Create the series of ``queues`` at zero (the first observation then counts in rates)."""
        for queue in queues:
            self.mttd.labels(queue)
            self.mttr.labels(queue)

    def mttr_observed(self, observation: Observation) -> None:
        """Observe one group's MTTD or MTTR."""
        histogram = self.mttd if observation.kind == "mttd" else self.mttr
        histogram.labels(observation.queue).observe(observation.seconds)


class Metrics(Observer, DlqObserver, MttrObserver):
    """Counts every outcome, in-flight change and circuit change in Prometheus metrics.

    ``app.add_observer(Metrics())`` (or :meth:`attach`, which also creates the
    series of the app's queues at zero); serve :meth:`render` on ``/metrics``.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.messages = Counter(
            "qworker_messages",
            "Deliveries by outcome.",
            ["queue", "handler", "outcome"],
            registry=r,
        )
        self.retries = Counter(
            "qworker_retries", "Retries scheduled, by delay tier.", ["queue", "tier"], registry=r
        )
        self.dead_letters = Counter(
            "qworker_dead_letters", "Messages dead-lettered, by reason.", ["queue", "reason"],
            registry=r,
        )  # fmt: skip
        self.failures = Counter(
            "qworker_failures",
            "Failed deliveries (retried or dead-lettered) by severity.",
            ["queue", "handler", "outcome", "severity"],
            registry=r,
        )
        self.seconds = Histogram(
            "qworker_handler_seconds",
            "Time the handler ran (its last execution), every outcome.",
            ["queue", "handler"],
            buckets=BUCKETS,
            registry=r,
        )
        self.in_flight_gauge = Gauge(
            "qworker_in_flight",
            "Handlers running now.",
            ["queue"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.circuit_gauge = Gauge(
            "qworker_circuit_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open (worst live process).",
            ["queue"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self._successes: dict[tuple[str, str], _Success] = {}
        self._failures: dict[_Key, _Failure] = {}
        self._in_flight: dict[str, Gauge] = {}
        # Live gauges are files in multiprocess mode; in one process, values read at scrape time.
        self._multiprocess = _values.ValueClass is not _values.MutexValue
        self._counts: dict[str, int] = {}
        self._circuits: dict[str, Gauge] = {}
        self._dlq: dict[str, DlqSample] = {}
        r.register(dlq_collector(lambda: list(self._dlq.values())))
        self.durations = MttrHistograms(r)

    def attach(self, app: App, queues: Sequence[str] | None = None) -> Metrics:
        """Observe ``app`` and create its queues' series at zero (so rates start from 0)."""
        app.add_observer(self)
        self.prepare((h.queue, h.name) for h in app.select(queues))
        return self

    def prepare(self, handlers: Iterable[tuple[str, str]]) -> None:
        """Create the series of ``(queue, handler)`` pairs at zero."""
        for queue, handler in handlers:
            for kind in OutcomeKind:
                self.messages.labels(queue, handler, kind.value)
            self._success(queue, handler)
            self.in_flight(queue, 0)
            self.circuit(queue, handler, CircuitState.CLOSED)

    # Observer

    def outcome(self, event: Outcome) -> None:
        """Count one delivery's outcome and observe its handler time."""
        if event.kind is OutcomeKind.SUCCEEDED:
            bound = self._successes.get((event.queue, event.handler))
            if bound is None:
                bound = self._success(event.queue, event.handler)
            bound.messages.inc()
            bound.seconds.observe(event.duration)
            return
        key = (
            event.queue,
            event.handler,
            event.kind.value,
            event.reason,
            event.tier,
            event.severity.value if event.severity is not None else None,
        )
        failure = self._failures.get(key)
        if failure is None:
            failure = self._failure(key, decoded=event.reason != "decode_error")
        failure.messages.inc()
        failure.failures.inc()
        failure.detail.inc()
        if failure.seconds is not None:
            failure.seconds.observe(event.duration)

    def in_flight(self, queue: str, count: int) -> None:
        """Set ``qworker_in_flight{queue}`` (in one process: a dict store, read when scraped)."""
        if queue in self._counts:
            self._counts[queue] = count
            return
        gauge = self._in_flight.get(queue)
        if gauge is None:
            gauge = self._in_flight[queue] = self.in_flight_gauge.labels(queue)
            if not self._multiprocess:
                counts = self._counts
                gauge.set_function(lambda: counts[queue])
                counts[queue] = count
                return
        gauge.set(count)

    def dlq(self, sample: DlqSample) -> None:
        """Keep the last DLQ sample of ``sample.queue`` (served as the ``qworker_dlq_*`` gauges)."""
        self._dlq[sample.queue] = sample

    def mttr_prepare(self, queues: Iterable[str]) -> None:
        """The poller tracks ``queues``: their MTTD/MTTR series start at zero."""
        self.durations.mttr_prepare(queues)

    def mttr_observed(self, observation: Observation) -> None:
        """Observe one failure group's MTTD or MTTR (``qworker_mttd_seconds`` / ``_mttr_``)."""
        self.durations.mttr_observed(observation)

    def circuit(self, queue: str, handler: str, state: CircuitState) -> None:
        """Set ``qworker_circuit_state{queue}`` (0 closed, 1 half-open, 2 open)."""
        gauge = self._circuits.get(queue)
        if gauge is None:
            gauge = self._circuits[queue] = self.circuit_gauge.labels(queue)
        gauge.set(CIRCUIT_VALUES.get(state, 2))

    # Exposition

    def render(self) -> bytes:
        """This process's metrics in the Prometheus text format."""
        return generate_latest(self.registry)

    # Label binding (once per series)

    def _success(self, queue: str, handler: str) -> _Success:
        bound = _Success(
            self.messages.labels(queue, handler, OutcomeKind.SUCCEEDED.value),
            self.seconds.labels(queue, handler),
        )
        self._successes[(queue, handler)] = bound
        return bound

    def _failure(
        self,
        key: _Key,
        *,
        decoded: bool,
    ) -> _Failure:
        queue, handler, outcome, reason, tier, severity = key
        if outcome == OutcomeKind.RETRIED.value:
            detail = self.retries.labels(queue, tier or "unknown")
        else:
            detail = self.dead_letters.labels(queue, reason or "unknown")
        bound = _Failure(
            self.messages.labels(queue, handler, outcome),
            self.failures.labels(queue, handler, outcome, severity or "none"),
            detail,
            self.seconds.labels(queue, handler) if decoded else None,
        )
        self._failures[key] = bound
        return bound


def render_multiprocess(directory: str, extra: Iterable[Collector] = ()) -> bytes:
    """The sum of every process's metrics kept in ``directory`` (plus ``extra`` collectors)."""
    registry = CollectorRegistry()
    _multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    for collector in extra:
        registry.register(collector)
    return generate_latest(registry)


def mark_process_dead(pid: int, directory: str) -> None:
    """Forget a dead process's live gauges (its counters keep counting in the sum)."""
    _multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


class _SupervisorCollector(Collector):
    def __init__(self, restarts: Callable[[], int], alive: Callable[[], int]) -> None:
        self._restarts, self._alive = restarts, alive

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "qworker_process_restarts", "Worker processes restarted by the supervisor.",
            value=self._restarts(),
        )  # fmt: skip
        yield GaugeMetricFamily(
            "qworker_processes_alive", "Worker processes alive.", value=self._alive()
        )


class _DlqCollector(Collector):
    def __init__(self, samples: Callable[[], Iterable[DlqSample]]) -> None:
        self._samples = samples

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "qworker_dlq_messages",
            "Messages in the DLQ of queue (polled).",
            labels=["queue"],
        )
        age = GaugeMetricFamily(
            "qworker_dlq_oldest_age_seconds",
            "Seconds since the oldest message of the DLQ of queue failed (polled head; 0: empty).",
            labels=["queue"],
        )
        now = time.time()
        for sample in self._samples():
            depth.add_metric([sample.queue], sample.depth)
            oldest = sample.oldest_age(now)
            if oldest is not None:
                age.add_metric([sample.queue], oldest)
        yield depth
        yield age


def dlq_collector(samples: Callable[[], Iterable[DlqSample]]) -> Collector:
    """``qworker_dlq_messages`` and ``qworker_dlq_oldest_age_seconds`` from the last samples."""
    return _DlqCollector(samples)


def supervisor_collector(restarts: Callable[[], int], alive: Callable[[], int]) -> Collector:
    """The supervisor's own metrics: restarts so far and live worker processes."""
    return _SupervisorCollector(restarts, alive)
