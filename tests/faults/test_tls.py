"""TLS: ``amqps://`` to the private node's TLS listener, with certificates made at test time.

The CA, the server certificate (localhost, 127.0.0.1) and an unrelated CA come from
``nodes.make_certificates`` (``cryptography``); the node listens with them on a free port.
"""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aio_pika
import pytest

from qworker import App, Context, Permanent, RetryPolicy
from qworker.errors import QworkerError
from qworker.testing import running
from tests.faults.fault_app import worker_env
from tests.faults.nodes import ROOT, Certificates, RabbitNode, ctl
from tests.faults.scenario import delete_queues
from tests.faults.size import SIZE
from tests.faults.stream import Ledger
from tests.support.workers import WorkerPool

pytestmark = [pytest.mark.faults, pytest.mark.rabbitmq, pytest.mark.timeout(SIZE.timeout)]


def _tls_connections(node: RabbitNode, name: str) -> list[str]:
    """The ``ssl`` flag of every connection whose client named itself ``name``."""
    out = ctl(node.name, "list_connections", "ssl", "client_properties", "--no-table-headers")
    needle = f'{{"connection_name","{name}"}}'
    return [line.split("\t", 1)[0] for line in out.splitlines() if needle in line]


async def test_amqps_with_a_ca_file_retries_and_dead_letters(
    own_node: RabbitNode, certs: Certificates
) -> None:
    """``App(amqps://..., ssl_ca=CA)``: the worker's connection is TLS; a message fails once and
    is retried through the broker, another is dead-lettered with its reason."""
    queue = f"qwf.tls.{uuid.uuid4().hex[:8]}"
    name = f"qwf-tls-{queue}"
    app = App(own_node.tls_url, name=name, ssl_ca=str(certs.ca))
    attempts: dict[str, list[int]] = {}

    @app.handler(queue, retry=RetryPolicy(max_attempts=3, initial_delay=0.1, jitter=0))
    async def handle(payload: dict[str, str], ctx: Context) -> None:
        attempts.setdefault(payload["id"], []).append(ctx.attempt)
        if payload["id"] == "flaky" and ctx.attempt == 1:
            raise ConnectionError("first attempt fails")
        if payload["id"] == "bad":
            raise Permanent("cannot handle")

    try:
        async with running(app):
            assert _tls_connections(own_node, name) == ["true"]
            await app.publish(queue, {"id": "flaky"}, message_id="flaky")
            await app.publish(queue, {"id": "bad"}, message_id="bad")
            context = ssl.create_default_context(cafile=str(certs.ca))
            connection = await aio_pika.connect(own_node.tls_url, ssl_context=context)
            try:
                channel = await connection.channel()
                dlq = await channel.get_queue(f"{queue}.dlq", ensure=False)
                dead = None
                for _ in range(100):
                    if dead is None:
                        dead = await dlq.get(fail=False)
                    if dead is not None and attempts.get("flaky") == [1, 2]:
                        break
                    await asyncio.sleep(0.1)
                assert dead is not None
                await dead.ack()
            finally:
                await connection.close()
    finally:
        await delete_queues([own_node.url], [s.name for s in app.topology()])
    assert attempts["flaky"] == [1, 2]
    assert dead.message_id == "bad"
    assert (dead.headers or {})["x-qworker-reason"] == "permanent_error"


def test_qworker_run_over_amqps_with_cafile_in_the_url(
    own_node: RabbitNode, certs: Certificates, tmp_path: Path
) -> None:
    """``qworker run --url 'amqps://...?cafile=CA'`` consumes over TLS (no ssl_ca in the app)."""
    queue = f"qwf.tls.{uuid.uuid4().hex[:8]}"
    url = f"{own_node.tls_url}?cafile={certs.ca}"
    for sub in ("ledger", "logs"):
        (tmp_path / sub).mkdir()
    env = worker_env([own_node.url], f"qwf-w-{queue}", queue, tmp_path / "ledger", tmp_path)
    pool = WorkerPool(
        "tests.faults.fault_app:app",
        env,
        tmp_path / "logs",
        1,
        ["--url", url, "--log-format", "json"],
    )
    try:
        pool.start()
        assert _tls_connections(own_node, f"qwf-w-{queue}") == ["true"]
        publisher = App(own_node.url, name=f"qwf-p-{queue}")

        async def publish() -> None:
            try:
                await publisher.publish(queue, {"id": "over-tls", "mode": "ok"})
            finally:
                await publisher.close()

        asyncio.run(publish())
        ledger = Ledger(tmp_path / "ledger")
        deadline = time.monotonic() + 20
        while "over-tls" not in ledger.processed and time.monotonic() < deadline:
            time.sleep(0.1)
            ledger.refresh()
        assert "over-tls" in ledger.processed
        assert pool.terminate(5.0) == [0]
    finally:
        pool.close()
        asyncio.run(delete_queues([own_node.url], [queue, f"{queue}.dlq"]))


def _run_with_wrong_ca(
    node: RabbitNode, certs: Certificates, wait: float
) -> tuple[bool, int, str, str]:
    """``qworker run`` with an unrelated CA: (exited by itself within ``wait`` s, exit code,
    stdout, stderr); a worker still running then gets SIGTERM (its exit code is returned)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "QWF_URL": node.tls_url,
        "QWF_CA": str(certs.wrong_ca),
        "QWF_QUEUE": "qwf.tls.wrongca",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qworker",
            "run",
            "tests.faults.fault_app:app",
            "--log-format",
            "json",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    exited = True
    try:
        out, err = proc.communicate(timeout=wait)
    except subprocess.TimeoutExpired:
        exited = False
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    return exited, proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def test_wrong_ca_makes_qworker_run_exit_with_one_clear_line(
    own_node: RabbitNode, certs: Certificates
) -> None:
    """A certificate that cannot be verified will not verify on the next try: ``qworker run``
    exits non-zero within 10 s with one line on stderr naming the certificate problem, and no
    traceback. (Before d51859c it retried forever.)"""
    exited, code, out, err = _run_with_wrong_ca(own_node, certs, 10)
    assert exited and code != 0, "qworker run did not exit"
    assert ":guest@" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "certificate" in lines[0].lower(), err
    assert "Traceback" not in err


def test_wrong_ca_makes_app_publish_raise_broker_unavailable(
    own_node: RabbitNode, certs: Certificates
) -> None:
    """With an unrelated CA, ``App.publish`` raises at once, naming the certificate failure
    (the URL's password masked)."""

    async def publish() -> BaseException | None:
        app = App(own_node.tls_url, ssl_ca=str(certs.wrong_ca))
        try:
            await asyncio.wait_for(app.publish("qwf.tls.never", {"n": 1}), 30)
        except BaseException as exc:
            return exc
        finally:
            await app.close()
        return None

    error = asyncio.run(publish())
    assert isinstance(error, QworkerError), repr(error)
    assert "CERTIFICATE_VERIFY_FAILED" in str(error) and ":guest@" not in str(error)
