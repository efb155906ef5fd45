"""A mixed stream under one kind of fault at a time, on the shared node: nothing is lost.

Each test publishes a stream of mixed outcomes (success, transient-then-success, hang-then-success,
permanent, exhausted) to two subprocess workers and injects faults at random moments while it
flows. At the end every published id must have been processed or dead-lettered with the right
reason (lost = 0, computed from the ledger and the drained DLQ); duplicates are counted.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.faults.accounting import Summary, check
from tests.faults.scenario import Scenario
from tests.faults.size import SIZE

pytestmark = [pytest.mark.faults, pytest.mark.rabbitmq, pytest.mark.timeout(SIZE.timeout)]

SHARED_NODE = "rabbit@localhost"


async def _run(
    scenarios: Callable[..., Scenario],
    broker_url: str,
    name: str,
    kinds: list[str],
    tmp_path: Path,
    fault_report: list[Summary],
) -> Summary:
    scenario = scenarios(
        name,
        urls=[broker_url],
        node=SHARED_NODE,
        kinds=kinds,
        messages=SIZE.messages,
        faults=SIZE.faults,
    )
    summary = await scenario.run()
    check(summary, tmp_path, fault_report)
    return summary


async def test_kill_9_of_workers_loses_nothing(
    scenarios: Callable[..., Scenario],
    broker_url: str,
    tmp_path: Path,
    fault_report: list[Summary],
) -> None:
    """Workers killed with SIGKILL at random moments (and restarted): every id ends processed or
    dead-lettered; the restarted worker processes messages again."""
    summary = await _run(scenarios, broker_url, "kill9", ["kill9"], tmp_path, fault_report)
    kills = [f for f in summary.faults if f["kind"] == "kill9"]
    assert len(kills) == SIZE.faults
    assert all(f["detail"]["restarted_worker_first_success_s"] is not None for f in kills)


async def test_forced_connection_closes_lose_nothing(
    scenarios: Callable[..., Scenario],
    broker_url: str,
    tmp_path: Path,
    fault_report: list[Summary],
) -> None:
    """The broker closes the workers' connections several times: they reconnect, nothing is lost."""
    summary = await _run(scenarios, broker_url, "close", ["close"], tmp_path, fault_report)
    assert all(f["detail"]["closed"] >= 1 for f in summary.faults), summary.faults
    assert summary.worker_events["worker.connection_lost"] >= SIZE.faults


async def test_handlers_hanging_past_their_timeout_lose_nothing(
    scenarios: Callable[..., Scenario],
    broker_url: str,
    tmp_path: Path,
    fault_report: list[Summary],
) -> None:
    """Windows where every handler hangs past its timeout: the timeouts are retried (or dead-
    lettered with reason ``timeout`` once attempts run out), nothing is lost."""
    summary = await _run(scenarios, broker_url, "hang", ["hang"], tmp_path, fault_report)
    assert summary.worker_events["message.retry_scheduled"] > 0


async def test_dlq_refusing_publishes_keeps_the_originals(
    scenarios: Callable[..., Scenario],
    broker_url: str,
    tmp_path: Path,
    fault_report: list[Summary],
) -> None:
    """The DLQ rejects publishes for a while (max-length 0, reject-publish): dead letters are
    not confirmed, the originals stay in the work queue and reach the DLQ once it accepts again."""
    summary = await _run(scenarios, broker_url, "dlq_full", ["dlq_full"], tmp_path, fault_report)
    assert all(f["detail"]["set"] for f in summary.faults)
    assert summary.worker_events["message.move_failed"] > 0, "the DLQ never refused a publish"
