"""Fixtures of the toolkit, registered for every suite by ``tests/conftest.py``.

- ``worker``: ``tests/apps/ledger_app.py`` as a subprocess (a :class:`WorkerProcess`).
- ``management_url``: the broker's management API, the plugin enabled first if it is off.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from qworker.topology import quarantine_name
from tests.apps import ledger_app
from tests.support.broker import answers
from tests.support.cli import subprocess_env
from tests.support.workers import WorkerProcess

#: The retry tiers of the ledger app: 200ms/400ms by default, 2s/4s with QWORKER_APP_DELAY=2.
LEDGER_TIERS = ("200ms", "400ms", "2s", "4s")


@pytest.fixture
def worker(
    broker_url: str, queue_name: str, tmp_path: Path, cleanup: list[str]
) -> Iterator[WorkerProcess]:
    """The ledger app on ``queue_name``, not started; killed and its queues deleted afterwards.

    ``worker.env`` and ``worker.args`` may be changed before ``start()`` / ``launch()``.
    """
    env = subprocess_env(ledger_app.env(broker_url, queue_name, tmp_path))
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    cleanup.extend([queue_name, f"{queue_name}.dlq", quarantine_name(queue_name)])
    cleanup.extend(f"{queue_name}.retry.{tier}" for tier in LEDGER_TIERS)
    process = WorkerProcess("tests.apps.ledger_app:app", env, tmp_path)
    yield process
    process.kill()


MANAGEMENT_URL = os.environ.get("QWORKER_TEST_MANAGEMENT_URL", "http://guest:guest@127.0.0.1:15672")
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
PLUGIN_WAIT = 60.0


@pytest.fixture(scope="session")
def management_url(broker_url: str) -> str:
    """The management API (QWORKER_TEST_MANAGEMENT_URL, else 127.0.0.1:15672) of the broker.

    RabbitMQ as installed has the management plugin off. When the API does not answer and the
    broker is the local one, this runs ``rabbitmq-plugins enable rabbitmq_management`` and
    waits (at most 60 s) for the port. When that cannot be done, the test fails, saying what to
    do; it never skips.
    """
    api = urlsplit(MANAGEMENT_URL)
    host, port = api.hostname or "127.0.0.1", api.port or 15672
    if answers(host, port):
        return MANAGEMENT_URL
    shown = api._replace(netloc=f"{host}:{port}").geturl()
    todo = (
        f"the RabbitMQ management API does not answer on {shown}: enable it on the broker's node "
        "with `rabbitmq-plugins enable rabbitmq_management` (or set QWORKER_TEST_MANAGEMENT_URL "
        "to the broker's management API)"
    )
    broker = urlsplit(broker_url)
    if broker.hostname not in LOCAL_HOSTS or (broker.port or 5672) != 5672:
        where = f"{broker.hostname}:{broker.port or 5672}"
        pytest.fail(f"{todo}; the broker {where} is not local", pytrace=False)
    if host not in LOCAL_HOSTS:
        pytest.fail(f"{todo}; {host} is not local", pytrace=False)
    plugins = shutil.which("rabbitmq-plugins")
    if plugins is None:
        pytest.fail(f"{todo}; rabbitmq-plugins is not on PATH", pytrace=False)
    done = subprocess.run(
        [plugins, "enable", "rabbitmq_management"], capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
        pytest.fail(f"{todo}; rabbitmq-plugins failed ({done.returncode}): {why[0]}", pytrace=False)
    deadline = time.monotonic() + PLUGIN_WAIT
    while not answers(host, port):
        if time.monotonic() > deadline:
            pytest.fail(f"{todo}; enabled, but port {port} still closed after 60 s", pytrace=False)
        time.sleep(0.5)
    return MANAGEMENT_URL
