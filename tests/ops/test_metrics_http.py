"""Metrics scraped over HTTP match the outcomes of a known mix of messages."""

from __future__ import annotations

import aio_pika
import pytest

from tests.ops.mix import assert_mix_counted, publish_mix
from tests.support.broker import depth
from tests.support.workers import WorkerProcess

pytestmark = pytest.mark.rabbitmq


async def test_single_process_metrics_count_exactly_the_outcomes(
    worker: WorkerProcess, queue_name: str, amqp: aio_pika.abc.AbstractConnection
) -> None:
    """One worker with --metrics-port: 7 ok, 3 retried once, 2 permanent are counted exactly."""
    worker.start("--metrics-port", "0")
    await publish_mix(amqp, queue_name)
    await assert_mix_counted(worker, queue_name)
    assert await depth(amqp, f"{queue_name}.dlq") == 2


async def test_supervisor_metrics_are_the_sum_over_its_processes(
    worker: WorkerProcess, queue_name: str, amqp: aio_pika.abc.AbstractConnection
) -> None:
    """Two processes: the supervisor's /metrics sums both children's counts, exactly."""
    worker.launch("--processes", "2", "--metrics-port", "0")
    worker.wait_log("supervisor.ready")
    children = set(worker.children())
    assert len(children) == 2
    await publish_mix(amqp, queue_name)
    await assert_mix_counted(worker, queue_name)
    assert worker.handler_pids() == children  # both processes handled some: the counts are a sum
    assert worker.metric("qworker_processes_alive") == 2
    assert worker.metric("qworker_process_restarts_total") == 0
