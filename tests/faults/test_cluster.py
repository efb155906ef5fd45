"""Failover on a private 3-node cluster (``scripts/cluster.sh``): a node stops mid-run.

Workers get the three node URLs (``qworker run --url u1,u2,u3``) and connect to the first; that
node is halted while the stream flows and booted again later. Quorum queues are replicated on all
three nodes, so the queues survive; workers, publisher and DLQ drain fail over to the next URL.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.faults.accounting import Summary, check
from tests.faults.conftest import Cluster
from tests.faults.nodes import ctl
from tests.faults.scenario import Scenario, queue_names
from tests.faults.size import SIZE

pytestmark = [pytest.mark.faults, pytest.mark.rabbitmq, pytest.mark.timeout(SIZE.timeout + 120)]


def members(cluster: Cluster, node: int, queues: list[str]) -> dict[str, set[str]]:
    """Each quorum queue's members, as one node of the cluster sees them."""
    out = ctl(cluster.node(node), "list_queues", "name", "type", "members", "--no-table-headers")
    found: dict[str, set[str]] = {}
    for line in out.splitlines():
        name, _, rest = line.partition("\t")
        kind, _, nodes = rest.partition("\t")
        if name in queues and kind == "quorum":
            found[name] = {n.strip() for n in nodes.strip("[] ").split(",") if n.strip()}
    return found


async def test_node_stop_in_a_three_node_cluster_loses_nothing(
    cluster: Cluster,
    scenarios: Callable[..., Scenario],
    tmp_path: Path,
    fault_report: list[Summary],
) -> None:
    """Quorum queues on all 3 nodes; the node the workers use is halted mid-run and restarted:
    every id is processed or dead-lettered, and the workers keep consuming through another node.

    Retries that the broker strands in a tier after the leader change are counted and released
    by restarting that tier's leader node; lost is computed after that."""
    all_nodes = {cluster.node(n) for n in (1, 2, 3)}
    seen: dict[str, set[str]] = {}

    async def replicated() -> None:
        names = queue_names(scenario.queue)
        seen.update(await asyncio.to_thread(members, cluster, 2, names))

    async def unstick(tiers: list[str]) -> None:
        """Move the leadership of stranded retry tiers: restart each one's leader node."""
        out = await asyncio.to_thread(
            ctl, cluster.node(2), "list_queues", "name", "leader", "--no-table-headers"
        )
        rows = (line.partition("\t") for line in out.splitlines())
        leaders = {name: leader.strip() for name, _, leader in rows}
        for n in sorted({int(leaders[t].split("@")[0][-1]) for t in tiers if t in leaders}):
            await asyncio.to_thread(cluster.stop, n)
            await asyncio.sleep(3)  # a new leader settles before the node rejoins
            await asyncio.to_thread(cluster.start, n)

    # The app's own URL list (QWF_URL) names only node 1: failover comes from --url u1,u2,u3.
    scenario = scenarios(
        "node_stop",
        urls=cluster.urls,
        worker_args=["--url", ",".join(cluster.urls)],
        app_urls=cluster.urls[:1],
        node=cluster.node(2),
        kinds=["node_stop"],
        messages=SIZE.messages,
        faults=1 if SIZE.name == "ci" else 3,
        stop_node=lambda: cluster.stop(1),
        start_node=lambda: cluster.start(1),
        before_faults=replicated,
        unstick=unstick,
    )
    summary = await scenario.run()
    check(summary, tmp_path, fault_report)
    assert set(seen) == set(queue_names(scenario.queue)), seen
    assert all(nodes == all_nodes for nodes in seen.values()), seen
    assert summary.worker_events["worker.connection_lost"] >= len(scenario.pool.workers)
    if summary.stranded:
        # RabbitMQ 3.10.8: after the leader of a quorum retry tier moved, its at-least-once
        # dead-letter worker may stop moving expired messages back to the work queue until the
        # leader moves again (reported in docs/reliability.md; nothing is lost).
        print(f"  stranded in retry tiers after the node stop: {summary.stranded}")
