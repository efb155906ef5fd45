"""Secrets in failures never leave the worker: not in dead-letter headers, not in its logs.

The handler of ``tests/faults/fault_app.py:secrets_app`` fails with a password (``password=``),
a bearer token, an AMQP URL with credentials, an ``api_key``/``token`` pair in a chained cause,
and a dict repr holding a password. The worker itself connects with a broker user whose password
is a secret too. The raw bytes of every dead letter's headers and of the worker's stdout and
stderr (at DEBUG level) are searched for each secret value.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from tests.faults.fault_app import SECRETS, worker_env
from tests.faults.nodes import ROOT, RabbitNode, ctl, free_port
from tests.faults.scenario import delete_queues
from tests.faults.size import SIZE
from tests.support.cli import qworker_command
from tests.support.workers import WorkerPool

pytestmark = [pytest.mark.faults, pytest.mark.rabbitmq, pytest.mark.timeout(SIZE.timeout)]

KINDS = ["password", "bearer", "url", "chained", "dict"]
BROKER_PASSWORD = "Brok3r-Pw-" + uuid.uuid4().hex[:10]


def flatten(value: Any) -> bytes:
    """Every string and byte string in a header value, as raw bytes."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    if isinstance(value, dict):
        return b"\n".join(flatten(k) + b"=" + flatten(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return b"\n".join(flatten(v) for v in value)
    return repr(value).encode()


@pytest.fixture
def secret_user(own_node: RabbitNode) -> Iterator[str]:
    """A broker user on the private node whose password is a secret; its AMQP URL."""
    user = f"qwf-{uuid.uuid4().hex[:8]}"
    ctl(own_node.name, "add_user", user, BROKER_PASSWORD)
    ctl(own_node.name, "set_permissions", "-p", "/", user, ".*", ".*", ".*")
    yield f"amqp://{user}:{BROKER_PASSWORD}@127.0.0.1:{own_node.port}/"
    ctl(own_node.name, "delete_user", user, check=False)


async def test_secrets_reach_neither_dead_letter_headers_nor_logs(
    secret_user: str, own_node: RabbitNode, tmp_path: Path
) -> None:
    """Five failures carrying secrets are dead-lettered with redacted error headers; no secret
    value (nor the broker password) appears in the raw header bytes or in the worker's output."""
    queue = f"qwf.s{uuid.uuid4().hex[:10]}"
    for sub in ("ledger", "logs"):
        (tmp_path / sub).mkdir()
    env = worker_env([secret_user], f"qwf-w-{queue}", queue, tmp_path / "ledger", tmp_path)
    pool = WorkerPool(
        "tests.faults.fault_app:secrets_app",
        env,
        tmp_path / "logs",
        1,
        ["--log-format", "json", "--log-level", "DEBUG"],
    )
    names = [queue, f"{queue}.dlq", f"{queue}.retry.100ms"]
    dead: list[aio_pika.abc.AbstractIncomingMessage] = []
    try:
        await asyncio.to_thread(pool.start)
        connection = await aio_pika.connect(own_node.url)
        try:
            channel = await connection.channel(publisher_confirms=True)
            for kind in KINDS:
                await channel.default_exchange.publish(
                    aio_pika.Message(f'{{"kind": "{kind}"}}'.encode(), message_id=kind),
                    routing_key=queue,
                )
            dlq = await channel.get_queue(f"{queue}.dlq", ensure=False)
            for _ in range(200):
                message = await dlq.get(fail=False)
                if message is not None:
                    await message.ack()
                    dead.append(message)
                elif len(dead) == len(KINDS):
                    break
                else:
                    await asyncio.sleep(0.1)
        finally:
            await connection.close()
        assert await asyncio.to_thread(pool.terminate, 5.0) == [0]
    finally:
        pool.close()
        await delete_queues([own_node.url], names)

    assert sorted(m.message_id or "" for m in dead) == sorted(KINDS)
    for message in dead:
        headers = message.headers or {}
        assert "***" in str(headers["x-qworker-error-message"]) or message.message_id == "chained"
        assert "***" in str(headers["x-qworker-error-traceback"]), message.message_id
    raw_headers = b"\n".join(flatten(m.headers or {}) for m in dead)
    raw_logs = b"\n".join(path.read_bytes() for path in pool.log_paths())
    assert b'"message.dead_lettered"' in raw_logs
    secrets = {**SECRETS, "broker": BROKER_PASSWORD}
    for name, value in secrets.items():
        assert value.encode() not in raw_headers, f"{name} secret in dead-letter headers"
        assert value.encode() not in raw_logs, f"{name} secret in the worker's output"


def test_unreachable_broker_url_password_never_printed(tmp_path: Path) -> None:
    """``qworker run`` against a URL (with a password) where nothing listens: whatever it prints
    while it retries and after SIGTERM never contains the password."""
    password = "Unreach-" + uuid.uuid4().hex[:10]
    url = f"amqp://someone:{password}@127.0.0.1:{free_port()}/"
    out, err = tmp_path / "out", tmp_path / "err"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen(
            qworker_command("run", "tests.faults.fault_app:app", "--url", url),
            cwd=ROOT,
            env=worker_env([url], "qwf-unreach", "qwf.unreach", tmp_path, tmp_path),
            stdout=o,
            stderr=e,
        )
    try:
        try:
            proc.wait(timeout=4)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    printed = out.read_bytes() + err.read_bytes()
    assert printed, "nothing printed while the broker is unreachable"
    assert password.encode() not in printed
