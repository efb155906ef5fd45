"""qworker (quorum) with tracing on and OpenTelemetry's no-op tracer provider configured.

Exactly ``qworker_c`` except that its publisher and worker processes first call
``opentelemetry.trace.set_tracer_provider(NoOpTracerProvider())``: a provider is configured,
so qworker's traced path runs for every delivery (extract, a ``process`` span, context attach
and detach, settle), while the spans themselves cost what a no-op costs. Next to ``qworker_c``
(tracing off: no provider) in one run, its ratio to raw aio-pika is the price of tracing
minus the price of an SDK and exporter, which the application chooses.
"""

from __future__ import annotations

import sys

from bench_common import Ctx, Reporter

from . import _qworker_common as common

QUEUE_TYPE = "quorum"
LABEL = "qworker (quorum), no-op tracer provider"
PACKAGES = (*common.PACKAGES, "opentelemetry-api")
NOT_APPLICABLE = common.NOT_APPLICABLE
MECHANISMS = {
    scenario: f"{text}; tracing on: opentelemetry NoOpTracerProvider configured"
    for scenario, text in common.mechanisms(QUEUE_TYPE).items()
}


def _configure_no_op_provider(mode: str) -> None:
    # In the child processes only: the runner imports every contender, and the global
    # provider can be set once per process.
    from opentelemetry import trace

    from qworker import tracing

    trace.set_tracer_provider(trace.NoOpTracerProvider())
    on = tracing.resolve() is not None
    print(f"qworker_otel_c: {mode}: tracing {'on' if on else 'OFF'}", file=sys.stderr, flush=True)
    if not on:
        raise RuntimeError("qworker_otel_c: tracing did not turn on")


def queues(ctx: Ctx) -> dict:
    return common.queues(ctx, QUEUE_TYPE)


def publish(ctx: Ctx) -> float:
    _configure_no_op_provider("publisher")
    return common.publish(ctx, QUEUE_TYPE)


def run_worker(ctx: Ctx, report: Reporter) -> None:
    _configure_no_op_provider("worker")
    common.run_worker(ctx, report, QUEUE_TYPE)
