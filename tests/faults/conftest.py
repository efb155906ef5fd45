"""Fixtures of the fault suite: private RabbitMQ nodes (single with TLS, 3-node cluster), the
scenario factory, and the report printed at the end of the session.

The shared node ``rabbit@localhost`` is only ever used through ``broker_url`` for ordinary
traffic, closing this suite's own connections and policies on this suite's own uuid queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.faults.accounting import Summary
from tests.faults.nodes import (
    ROOT,
    Certificates,
    RabbitNode,
    free_port,
    make_certificates,
    port_free,
)
from tests.faults.scenario import Scenario
from tests.faults.size import SIZE

_REPORT: list[Summary] = []


@pytest.fixture(scope="session")
def fault_report() -> list[Summary]:
    """Summaries of every scenario run in this session (printed at the end)."""
    return _REPORT


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _REPORT:
        return
    terminalreporter.section(f"qworker fault suite ({SIZE.name} size)")
    for summary in _REPORT:
        terminalreporter.write_line(summary.line())


@pytest.fixture(scope="session")
def node_dir() -> Iterator[Path]:
    """A temporary directory for private nodes and certificates, deleted at the end."""
    path = Path(tempfile.mkdtemp(prefix="qwf-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def certs(node_dir: Path) -> Certificates:
    """A test CA, a server certificate for localhost/127.0.0.1, and an unrelated CA."""
    return make_certificates(node_dir / "certs")


@pytest.fixture(scope="session")
def own_node(node_dir: Path, certs: Certificates) -> Iterator[RabbitNode]:
    """A private RabbitMQ node with a TCP and a TLS listener; halted at the end."""
    node = RabbitNode(
        node_dir / "node",
        f"qwf{uuid.uuid4().hex[:6]}@localhost",
        free_port(),
        free_port(),
        free_port(),
        certs,
    )
    try:
        node.start()
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="module")
def scratch_node() -> Iterator[RabbitNode]:
    """A private node for one test module whose input may break the broker (forged headers,
    hostile input), so that a regression cannot spill into other tests; deleted after it."""
    directory = Path(tempfile.mkdtemp(prefix="qwf-scratch-"))
    node = RabbitNode(directory, f"qwfs{uuid.uuid4().hex[:6]}@localhost", free_port(), free_port())
    try:
        node.start()
        yield node
    finally:
        node.stop()
        shutil.rmtree(directory, ignore_errors=True)


@dataclass
class Cluster:
    """A private 3-node cluster run by ``scripts/cluster.sh``."""

    env: dict[str, str]
    urls: list[str]
    name: str

    def node(self, n: int) -> str:
        return f"{self.name}{n}@localhost"

    def script(self, *args: str, timeout: float = 300) -> str:
        done = subprocess.run(
            [str(ROOT / "scripts" / "cluster.sh"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"cluster.sh {' '.join(args)} failed: {done.stderr[-2000:]}")
        return done.stdout

    def stop(self, n: int) -> None:
        self.script("stop", str(n))

    def start(self, n: int) -> None:
        self.script("start", str(n))


def _free_base() -> int:
    for _ in range(50):
        base = free_port()
        ports = [base + i for i in range(3)] + [base + 20000 + i for i in range(3)]
        if base + 20002 < 65536 and all(port_free(p) for p in ports):
            return base
    raise RuntimeError("no free port range for the cluster")


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """``scripts/cluster.sh up`` on free ports and a temp dir; ``down`` at the end."""
    name = f"qwc{uuid.uuid4().hex[:5]}"
    directory = tempfile.mkdtemp(prefix="qwc-")
    env = {**os.environ, "QWC_NAME": name, "QWC_PORT": str(_free_base()), "QWC_DIR": directory}
    c = Cluster(env, [], name)
    try:
        c.urls = c.script("up").split()
        assert len(c.urls) == 3, c.urls
        yield c
    finally:
        with contextlib.suppress(Exception):
            c.script("down")
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def scenarios(tmp_path: Path) -> AsyncIterator[Callable[..., Scenario]]:
    """Build :class:`Scenario` objects in ``tmp_path``; their workers and queues are removed."""
    made: list[Scenario] = []

    def make(name: str, **kwargs: Any) -> Scenario:
        scenario = Scenario(name=name, tmp=tmp_path / f"s{len(made)}", **kwargs)
        made.append(scenario)
        return scenario

    yield make
    for scenario in made:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(scenario.cleanup(), 60)
