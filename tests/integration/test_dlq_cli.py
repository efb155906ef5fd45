"""``qworker dlq`` as operators run it: clear one-line failures, and kill -9 losing nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from aio_pika.abc import AbstractConnection

from tests.support import ROOT
from tests.support.broker import depth, eventually
from tests.support.cli import qworker_command, run_cli, subprocess_env
from tests.support.dlq import drain, invoke, letters, make_dlq, publish

pytestmark = pytest.mark.rabbitmq

UNREACHABLE = "amqp://guest:s3cret@127.0.0.1:1/"


def test_unreachable_broker_is_one_line_with_the_password_masked() -> None:
    """A real process: exit 1, one stderr line, no traceback, no password."""
    result = run_cli("dlq", "stats", "orders.dlq", "--url", UNREACHABLE)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert "cannot connect to RabbitMQ" in result.stderr
    assert "s3cret" not in result.stderr and "Traceback" not in result.stderr


def test_bad_json_line_in_a_replay_file_names_the_line(tmp_path: Path) -> None:
    """A real process: exit 1 and ``file:line: problem`` before anything is published."""
    dump = tmp_path / "dead.jsonl"
    dump.write_text('{"queue": "q.dlq", "body": "{}"}\n\n{"queue": "q.dlq", "body": \n')
    result = run_cli("dlq", "replay", "--from-file", str(dump), "--url", UNREACHABLE)
    assert result.returncode == 1
    assert result.stderr == f"qworker: error: {dump}:3: not JSON (Expecting value at column 28)\n"


@pytest.mark.parametrize(
    ("args", "code", "text"),
    [
        (["show", "{missing}"], 1, "queue '{missing}' not found"),
        (["stats", "{missing}"], 1, "queue '{missing}' not found"),
        (["export", "{missing}"], 1, "queue '{missing}' not found"),
        (["replay", "{missing}"], 1, "queue '{missing}' not found"),
        (["purge", "{missing}", "--yes"], 1, "queue '{missing}' not found"),
        (["edit", "{missing}", "m1"], 1, "queue '{missing}' not found"),
        (["show", "{dlq}", "--since", "yesterday"], 2, "cannot read time 'yesterday'"),
        (["stats", "{dlq}", "--reason", "exploded"], 2, "unknown reason 'exploded'"),
        (["purge", "{dlq}", "--until", "2024-13-45"], 2, "cannot read time"),
        (["replay", "--from-file", "/nonexistent/dead.jsonl"], 1, "cannot read"),
        (["replay"], 2, "give either QUEUE or --from-file"),
        (["export", "{dlq}", "--remove"], 2, "--remove needs -o FILE"),
        (["ls"], 2, "name an APP"),
        (["ls", "no_such_module:app"], 3, "cannot import"),
        (["edit", "{dlq}", "nobody"], 1, "message 'nobody' not found"),
    ],
)
async def test_cli_failures_are_one_line_with_their_exit_code(
    broker_url: str,
    queue_name: str,
    cleanup: list[str],
    amqp: AbstractConnection,
    args: list[str],
    code: int,
    text: str,
) -> None:
    """Missing queue, bad filter, bad file or usage: one stderr line, documented exit code."""
    cleanup.extend(await make_dlq(amqp, queue_name))
    names = {"dlq": f"{queue_name}.dlq", "missing": f"{queue_name}.missing"}
    result = await invoke("dlq", *(a.format(**names) for a in args), "--url", broker_url)
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.stderr.count("\n") == 1, result.stderr
    assert text.format(**names) in result.stderr


async def test_kill_9_during_replay_loses_nothing(
    broker_url: str, queue_name: str, cleanup: list[str], amqp: AbstractConnection
) -> None:
    """SIGKILL mid-replay: every message is in the DLQ or its origin queue (by message id)."""
    cleanup.extend(await make_dlq(amqp, queue_name))
    await publish(amqp, f"{queue_name}.dlq", letters(queue_name, 3000))
    process = subprocess.Popen(
        qworker_command(
            "dlq", "replay", f"{queue_name}.dlq", "--rate", "1500", "--url", broker_url
        ),
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        async def half_way() -> bool:
            assert process.poll() is None
            return await depth(amqp, queue_name) >= 500

        await eventually(half_way, 30, 0.01)
        process.send_signal(signal.SIGKILL)
        assert process.wait(10) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
    in_origin = {t.message_id for t in await drain(amqp, queue_name, settle=True)}
    in_dlq = {t.message_id for t in await drain(amqp, f"{queue_name}.dlq", settle=True)}
    assert 500 <= len(in_origin) < 3000
    assert in_origin | in_dlq == {f"m{i}" for i in range(3000)}


async def test_kill_9_during_export_remove_loses_nothing(
    broker_url: str, queue_name: str, cleanup: list[str], amqp: AbstractConnection, tmp_path: Path
) -> None:
    """SIGKILL mid-export --remove: every message is in the DLQ or, complete, in the file."""
    cleanup.extend(await make_dlq(amqp, queue_name))
    total = 8000
    await publish(amqp, f"{queue_name}.dlq", letters(queue_name, total))
    out = tmp_path / "dead.jsonl"
    process = subprocess.Popen(
        qworker_command(
            "dlq", "export", f"{queue_name}.dlq", "-o", str(out), "--remove", "--url", broker_url
        ),
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def a_third_written() -> bool:
            assert process.poll() is None
            return out.exists() and out.read_bytes().count(b"\n") >= 2500

        await eventually(a_third_written, 30, 0.002)
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(10) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
    in_file = set()
    for line in out.read_text().splitlines():
        try:
            in_file.add(json.loads(line)["message_id"])
        except json.JSONDecodeError:
            continue  # the line being written when the process died
    in_dlq = {t.message_id for t in await drain(amqp, f"{queue_name}.dlq", settle=True)}
    assert 2500 <= len(in_file) < total
    assert len(in_dlq) < total  # the first batches were fsynced, then removed
    assert in_file | in_dlq == {f"m{i}" for i in range(total)}
