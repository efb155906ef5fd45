"""``qworker run`` and ``qworker topology`` from the outside: exit codes and one-line errors."""

from __future__ import annotations

import json
import subprocess

import aio_pika
import pytest

from tests.support import ROOT
from tests.support.cli import qworker_command, run_cli, subprocess_env


def test_topology_prints_every_queue_with_its_arguments_as_json() -> None:
    """`qworker topology --json` lists the work queue, its DLQ, its quarantine and one queue
    per retry tier."""
    result = run_cli("topology", "examples.orders.app:app", "--json")
    assert result.returncode == 0, result.stderr
    specs = [json.loads(line) for line in result.stdout.splitlines()]
    names = {spec["name"]: spec for spec in specs}
    assert set(names) == {
        "orders.placed",
        "orders.placed.dlq",
        "orders.placed.quarantine",
        "orders.placed.retry.500ms",
        "orders.placed.retry.1s",
        "orders.placed.retry.2s",
    }
    assert names["orders.placed.retry.1s"]["arguments"]["x-message-ttl"] == 1000
    assert names["orders.placed"]["arguments"]["x-dead-letter-routing-key"] == "orders.placed.dlq"
    assert "guest:***@" in result.stderr  # the password is masked


@pytest.mark.parametrize(
    ("spec", "code", "fragment"),
    [
        ("no_colon", 2, "module:attribute"),
        ("nonexistent.module:app", 3, "cannot import"),
        ("examples.orders.app:charge", 3, "is not a qworker App"),
    ],
)
def test_bad_app_spec_is_one_line_and_a_documented_exit_code(
    spec: str, code: int, fragment: str
) -> None:
    """A wrong APP argument: exit 2 (usage) or 3 (app), one line on stderr, no traceback."""
    result = run_cli("topology", spec)
    assert result.returncode == code
    assert fragment in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


@pytest.mark.rabbitmq
async def test_topology_conflict_exits_3_with_one_line_and_no_traceback(
    broker_url: str, amqp: aio_pika.abc.AbstractConnection, cleanup: list[str]
) -> None:
    """An existing queue with other arguments: `qworker run` stops with exit 3 and one line."""
    channel = await amqp.channel()
    await channel.declare_queue("orders.placed.conflict-test", durable=True)
    cleanup.extend(["orders.placed.conflict-test", "orders.placed.conflict-test.dlq"])
    app_module = ROOT / "tests" / "apps" / "conflict_app.py"
    assert app_module.exists()
    result = run_cli(
        "run",
        "tests.apps.conflict_app:app",
        "--log-format",
        "json",
        env={"QWORKER_URL": broker_url},
    )
    assert result.returncode == 3
    assert "already exists with different arguments" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr + result.stdout


def test_unreachable_broker_is_retried_and_logged_with_a_masked_password() -> None:
    """No broker at the URL: the worker keeps retrying with backoff and says so, password masked."""
    proc = subprocess.Popen(
        qworker_command("run", "examples.orders.app:app", "--log-format", "json"),
        cwd=ROOT,
        env=subprocess_env({"QWORKER_URL": "amqp://u:s3cret@127.0.0.1:1/"}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=4)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0  # SIGTERM while reconnecting is a clean stop
    assert "broker.unavailable" in out
    assert "s3cret" not in out
