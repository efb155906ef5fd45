"""Broker restarts, and every kind of fault mixed, on a private node (never the shared one).

The private node (fixture ``own_node``) can be restarted (``stop_app``/``start_app``) while two
subprocess workers consume a mixed stream; the mixed test injects kill -9, forced connection
closes, broker restarts, hanging handlers and a DLQ that refuses publishes, in random order at
random moments. Full size (``QWORKER_FAULTS_SIZE=full``): 100,000 messages and 24 faults.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.faults.accounting import Summary, check
from tests.faults.nodes import RabbitNode
from tests.faults.scenario import Scenario
from tests.faults.size import SIZE

pytestmark = [pytest.mark.faults, pytest.mark.rabbitmq, pytest.mark.timeout(SIZE.timeout)]


def _on(
    node: RabbitNode, scenarios: Callable[..., Scenario], name: str, **kwargs: object
) -> Scenario:
    return scenarios(
        name,
        urls=[node.url],
        node=node.name,
        stop_app=node.stop_app,
        restart_app=node.start_app,
        **kwargs,
    )


async def test_broker_restarts_lose_nothing(
    own_node: RabbitNode,
    scenarios: Callable[..., Scenario],
    tmp_path: Path,
    fault_report: list[Summary],
) -> None:
    """The broker stops (stop_app) for 1-3 s several times while messages flow: workers, the
    publisher and the DLQ drain reconnect; every id is processed or dead-lettered."""
    scenario = _on(
        own_node,
        scenarios,
        "restart",
        kinds=["restart"],
        messages=SIZE.messages,
        faults=SIZE.faults,
    )
    summary = await scenario.run()
    check(summary, tmp_path, fault_report)
    assert summary.worker_events["worker.connection_lost"] >= len(scenario.pool.workers)
    assert summary.faults_by_kind == {"restart": SIZE.faults}


async def test_mixed_faults_lose_nothing(
    own_node: RabbitNode,
    scenarios: Callable[..., Scenario],
    tmp_path: Path,
    fault_report: list[Summary],
) -> None:
    """kill -9, forced closes, broker restarts, hanging handlers and a full DLQ, shuffled and
    injected while a mixed stream flows: lost = 0, every failing message dead-lettered with its
    reason; duplicates and the worst recovery time per kind are reported."""
    kinds = ["kill9", "close", "restart", "hang", "dlq_full"]
    scenario = _on(
        own_node,
        scenarios,
        "mixed",
        kinds=kinds,
        messages=SIZE.mixed_messages,
        faults=SIZE.mixed_faults,
        settle_timeout=300 if SIZE.name == "full" else 120,
    )
    summary = await scenario.run()
    check(summary, tmp_path, fault_report)
    assert set(summary.faults_by_kind) == set(kinds)
    assert sum(summary.faults_by_kind.values()) == SIZE.mixed_faults
