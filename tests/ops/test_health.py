"""/healthz and /readyz of a single worker follow its broker connection."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from tests.apps import ledger_app
from tests.support.broker import eventually
from tests.support.workers import WorkerProcess

pytestmark = pytest.mark.rabbitmq


def _ctl(*args: str) -> str:
    return subprocess.run(
        ["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True
    ).stdout


@pytest.fixture
def own_user(broker_url: str) -> Iterator[tuple[str, str]]:
    """A broker user of our own (url, name): breaking its login touches no other test."""
    name = f"ops-{uuid.uuid4().hex[:12]}"
    parts = urlsplit(broker_url)
    vhost = parts.path.lstrip("/") or "/"
    _ctl("add_user", name, "right")
    _ctl("set_permissions", "-p", vhost, name, ".*", ".*", ".*")
    yield (
        parts._replace(netloc=f"{name}:right@{parts.hostname}:{parts.port or 5672}").geturl(),
        name,
    )
    _ctl("delete_user", name)


def close_connections_named(name: str) -> int:
    """Close (broker side) only the connections whose connection_name contains ``name``."""
    closed = 0
    for line in _ctl("list_connections", "pid", "client_properties").splitlines():
        pid, _, properties = line.partition("\t")
        if f'"connection_name","{name}' in properties:
            _ctl("close_connection", pid, "test: forced close")
            closed += 1
    return closed


async def wait_status(
    process: WorkerProcess, path: str, status: int, timeout: float = 20.0
) -> dict:
    got: tuple[int, bytes] = (0, b"")

    def answered() -> bool:
        nonlocal got
        got = process.get(path)
        return got[0] == status

    await eventually(
        answered, timeout, message=lambda: f"{path}: {got[0]} {got[1]!r}\n{process.output()}"
    )
    return dict(json.loads(got[1]))


async def test_readiness_is_503_while_the_connection_is_gone_and_liveness_stays_200(
    worker: WorkerProcess, queue_name: str, own_user: tuple[str, str]
) -> None:
    """Readiness: 200 while consuming; 503 after the broker closes the connection and while
    it cannot reconnect; 200 again once it has reconnected and consumes. Liveness stays 200
    throughout: a restart would not bring the broker back (issue 9, finding 10)."""
    url, user = own_user
    worker.env["QWORKER_APP_URL"] = url
    worker.start("--metrics-port", "0")
    assert (await wait_status(worker, "/healthz", 200))["consumers"] == 1
    assert (await wait_status(worker, "/readyz", 200))["ready"] is True

    _ctl("change_password", user, "wrong")  # reconnecting fails until the password is back
    assert close_connections_named(ledger_app.app_name(queue_name)) >= 1
    facts = await wait_status(worker, "/readyz", 503)
    assert facts["ok"] is False and facts["connected"] is False
    time.sleep(1.0)
    assert worker.get("/readyz")[0] == 503
    status, body = worker.get("/healthz")
    assert status == 200 and json.loads(body)["connected"] is False

    _ctl("change_password", user, "right")
    assert (await wait_status(worker, "/readyz", 200, timeout=30))["connections"] == 2
    assert (await wait_status(worker, "/healthz", 200))["consumers"] == 1
