"""The Metrics observer: what each event adds to which series (no broker needed)."""

from __future__ import annotations

import prometheus_client

from qworker import App
from qworker.events import CircuitState, Outcome, OutcomeKind, Severity
from qworker.metrics import Metrics

Q, H = "orders", "app:charge"


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def success(duration: float = 0.02) -> Outcome:
    return Outcome(OutcomeKind.SUCCEEDED, Q, H, "m", 1, duration)


def retried(tier: str = "2s") -> Outcome:
    return Outcome(
        OutcomeKind.RETRIED, Q, H, "m", 1, 0.5, severity=Severity.LOW, reason=None, tier=tier
    )


def dead(reason: str, severity: Severity, duration: float = 0.1) -> Outcome:
    return Outcome(
        OutcomeKind.DEAD_LETTERED, Q, H, "m", 3, duration, severity=severity, reason=reason
    )


def test_each_outcome_lands_in_its_counters_with_severity() -> None:
    """Successes, retries by tier and dead letters by reason and severity are counted apart."""
    metrics = Metrics()
    for event in [success(), success(), retried("2s"), retried("2s"), retried("500ms")]:
        metrics.outcome(event)
    metrics.outcome(dead("permanent_error", Severity.HIGH))
    metrics.outcome(dead("decode_error", Severity.MEDIUM, duration=0.0))
    total = "qworker_messages_total"
    assert value(metrics, total, queue=Q, handler=H, outcome="succeeded") == 2
    assert value(metrics, total, queue=Q, handler=H, outcome="retried") == 3
    assert value(metrics, total, queue=Q, handler=H, outcome="dead_lettered") == 2
    assert value(metrics, "qworker_retries_total", queue=Q, tier="2s") == 2
    assert value(metrics, "qworker_retries_total", queue=Q, tier="500ms") == 1
    dead_letters = "qworker_dead_letters_total"
    assert value(metrics, dead_letters, queue=Q, reason="permanent_error") == 1
    assert value(metrics, dead_letters, queue=Q, reason="decode_error") == 1
    failures = "qworker_failures_total"
    assert value(metrics, failures, queue=Q, handler=H, outcome="retried", severity="low") == 3
    high = value(metrics, failures, queue=Q, handler=H, outcome="dead_lettered", severity="high")
    medium = value(
        metrics, failures, queue=Q, handler=H, outcome="dead_lettered", severity="medium"
    )
    assert (high, medium) == (1, 1)


def test_handler_time_is_observed_unless_the_handler_never_ran() -> None:
    """The histogram sees every execution; a body that could not be decoded is left out."""
    metrics = Metrics()
    metrics.outcome(success(0.02))
    metrics.outcome(retried())
    metrics.outcome(dead("decode_error", Severity.MEDIUM, duration=0.0))
    assert value(metrics, "qworker_handler_seconds_count", queue=Q, handler=H) == 2
    assert value(metrics, "qworker_handler_seconds_sum", queue=Q, handler=H) == 0.52
    assert value(metrics, "qworker_handler_seconds_bucket", queue=Q, handler=H, le="0.025") == 1


def test_in_flight_and_circuit_gauges_follow_the_last_report() -> None:
    """in_flight is the last count; the circuit gauge is 0 closed, 1 half-open, 2 open."""
    metrics = Metrics()
    metrics.in_flight(Q, 3)
    metrics.in_flight(Q, 1)
    assert value(metrics, "qworker_in_flight", queue=Q) == 1
    for state, expected in [
        (CircuitState.OPEN, 2),
        (CircuitState.HALF_OPEN, 1),
        (CircuitState.CLOSED, 0),
    ]:
        metrics.circuit(Q, H, state)
        assert value(metrics, "qworker_circuit_state", queue=Q) == expected


def test_attach_observes_the_app_and_starts_its_series_at_zero() -> None:
    """After attach, every handler queue has zero-valued series before any message."""
    app = App("amqp://guest:guest@127.0.0.1:5672/")

    @app.handler("q1")
    async def one(payload: bytes) -> None: ...

    metrics = Metrics().attach(app)
    assert metrics in app.observers
    name = app.handlers["q1"].name
    for outcome in ("succeeded", "retried", "dead_lettered"):
        labels = {"queue": "q1", "handler": name, "outcome": outcome}
        assert value(metrics, "qworker_messages_total", **labels) == 0
    assert value(metrics, "qworker_in_flight", queue="q1") == 0
    assert value(metrics, "qworker_circuit_state", queue="q1") == 0


def test_each_metrics_object_has_its_own_registry() -> None:
    """Two Metrics in one process do not clash, and the global registry stays untouched."""
    first, second = Metrics(), Metrics()
    first.outcome(success())
    assert value(first, "qworker_messages_total", queue=Q, handler=H, outcome="succeeded") == 1
    assert value(second, "qworker_messages_total", queue=Q, handler=H, outcome="succeeded") is None
    assert prometheus_client.REGISTRY.get_sample_value("qworker_messages_total") is None
    assert b"qworker_messages_total" in first.render()
