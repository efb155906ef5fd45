"""Metrics scraped over HTTP match the outcomes of a known mix of messages."""

from __future__ import annotations

import aio_pika
import pytest

from tests.helpers import depth
from tests.ops.conftest import OpsProcess, assert_mix_counted, publish_mix

pytestmark = pytest.mark.rabbitmq


async def test_single_process_metrics_count_exactly_the_outcomes(
    ops: OpsProcess, queue_name: str, amqp: aio_pika.abc.AbstractConnection
) -> None:
    """One worker with --metrics-port: 7 ok, 3 retried once, 2 permanent are counted exactly."""
    ops.start("--log-format", "json", "--metrics-port", "0")
    ops.wait_log("worker.consuming")
    await publish_mix(amqp, queue_name)
    assert_mix_counted(ops, queue_name)
    assert await depth(amqp, f"{queue_name}.dlq") == 2


async def test_supervisor_metrics_are_the_sum_over_its_processes(
    ops: OpsProcess, queue_name: str, amqp: aio_pika.abc.AbstractConnection
) -> None:
    """Two processes: the supervisor's /metrics sums both children's counts, exactly."""
    ops.start("--log-format", "json", "--processes", "2", "--metrics-port", "0")
    ops.wait_log("supervisor.ready")
    children = set(ops.children())
    assert len(children) == 2
    await publish_mix(amqp, queue_name)
    assert_mix_counted(ops, queue_name)
    assert ops.handler_pids() == children  # both processes handled some: the counts are a sum
    assert ops.metric("qworker_processes_alive") == 2
    assert ops.metric("qworker_process_restarts_total") == 0
