"""``qworker console``: usage errors as one line with exit 2, a taken port as one line with
exit 1, the warning for a console reachable from other hosts without a token, and a real
start as a subprocess that answers and stops on SIGTERM.

Usage errors run in-process (click's ``CliRunner``): each is decided before the server
would start. Starts are subprocesses, as an operator runs them.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pytest
from click.testing import CliRunner, Result

from qworker.cli import cli
from qworker.console.security import MIN_TOKEN_LENGTH
from tests.support import ROOT
from tests.support.cli import qworker_command, subprocess_env

TOKEN = "cli-test-token-0123456789abcdef"
#: Bounds of a console subprocess's start and stop.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    """``qworker ARGS`` in-process, without the token variable unless ``env`` sets it."""
    return CliRunner().invoke(cli, list(args), env={"QWORKER_CONSOLE_TOKEN": "", **(env or {})})


def one_line_error(result: Result) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("qworker: error: "), lines[0]
    assert "Traceback" not in result.output
    return lines[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# Usage errors


def test_nothing_to_show_is_a_usage_error() -> None:
    """No APP, no --management-url, no --queue: exit 2 and one line saying what to name."""
    result = invoke("console")
    assert result.exit_code == 2
    assert "name an APP (module:attribute), --management-url or DLQs with --queue" in (
        one_line_error(result)
    )


@pytest.mark.parametrize("where", ["env", "file"])
def test_a_short_token_is_a_usage_error(where: str, tmp_path: Path) -> None:
    """A token under 16 characters (from the variable or the file): exit 2, one line."""
    short = "x" * (MIN_TOKEN_LENGTH - 1)
    if where == "env":
        result = invoke("console", "--queue", "orders.dlq", env={"QWORKER_CONSOLE_TOKEN": short})
    else:
        (tmp_path / "token").write_text(short + "\nsecond line ignored\n")
        result = invoke("console", "--queue", "orders.dlq", "--token-file", str(tmp_path / "token"))
    assert result.exit_code == 2
    assert f"at least {MIN_TOKEN_LENGTH} characters" in one_line_error(result)
    assert short not in result.stderr  # the token itself is never printed


@pytest.mark.parametrize("problem", ["missing", "unreadable", "not utf-8"])
def test_an_unreadable_token_file_is_a_usage_error(problem: str, tmp_path: Path) -> None:
    """A token file that does not exist, cannot be read or is not text: exit 2, one line."""
    path = tmp_path / "token"
    if problem == "unreadable":
        path.symlink_to(path)  # a symlink loop: ELOOP, even for root (who reads mode 000)
    elif problem == "not utf-8":
        path.write_bytes(b"\xff\xfe" + TOKEN.encode())
    result = invoke("console", "--queue", "orders.dlq", "--token-file", str(path))
    assert result.exit_code == 2, result.output
    assert "cannot read --token-file" in one_line_error(result)


def test_a_port_in_use_is_one_line_and_exit_1() -> None:
    """Another process listens on the port: exit 1, one line naming the address, no traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = invoke("console", "--queue", "orders.dlq", "--port", str(port))
    assert result.exit_code == 1, result.output
    line = one_line_error(result)
    assert f"cannot listen on 127.0.0.1:{port}" in line and "in use" in line


# Real starts


@dataclass
class Running:
    """A ``qworker console`` subprocess and where it listens."""

    proc: subprocess.Popen[bytes]
    port: int
    err: Path

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def get(self, path: str, token: str | None = None) -> tuple[int, bytes]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}")
        if token:
            request.add_header("authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=20) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, float]:
        """Send ``sig``; the exit code and how long it took (killed after STOP_TIMEOUT)."""
        began = time.monotonic()
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise AssertionError(
                f"not stopped {STOP_TIMEOUT} s after SIGTERM:\n{self.stderr()}"
            ) from None
        return code, time.monotonic() - began


class StartConsole(Protocol):
    def __call__(self, *args: str, env: dict[str, str] | None = None) -> Running: ...


@pytest.fixture
def start_console(tmp_path: Path) -> Iterator[StartConsole]:
    """Start ``qworker console ARGS`` on a free port; waits until it answers; killed after."""
    started: list[Running] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Running:
        port = free_port()
        err = tmp_path / f"console-{len(started)}.err"
        with open(err, "wb") as err_file:
            proc = subprocess.Popen(
                qworker_command("console", *args, "--port", str(port)),
                cwd=ROOT,
                env=subprocess_env({"QWORKER_CONSOLE_TOKEN": "", **(env or {})}),
                stdout=subprocess.DEVNULL,
                stderr=err_file,
                start_new_session=True,
            )
        running = Running(proc, port, err)
        started.append(running)
        deadline = time.monotonic() + START_TIMEOUT
        while "qworker console on http://" not in running.stderr():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"console not started ({proc.poll()}):\n{running.stderr()}")
            time.sleep(0.05)
        while True:  # the socket listens before uvicorn serves: wait for an answer
            try:
                running.get("/api/openapi.json")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"console not answering:\n{running.stderr()}") from None
                time.sleep(0.05)
        return running

    yield start
    for running in started:
        if running.proc.poll() is None:
            running.proc.kill()
            running.proc.wait(timeout=10)


@pytest.mark.rabbitmq
def test_a_console_reachable_from_other_hosts_without_a_token_warns_then_serves(
    broker_url: str, queue_name: str, start_console: StartConsole
) -> None:
    """--host 0.0.0.0 without a token: one warning line at start; GET /api/dlqs answers with
    the --queue DLQ; SIGTERM stops it within a few seconds."""
    dlq = f"{queue_name}.dlq"
    running = start_console("--queue", dlq, "--host", "0.0.0.0", "--url", broker_url)
    lines = running.stderr().splitlines()
    warnings = [line for line in lines if "warning" in line]
    assert len(warnings) == 1, lines
    assert warnings[0].startswith(
        "qworker: warning: the console listens on 0.0.0.0 without a token"
    )
    assert "guest:guest" not in running.stderr()
    assert any("read-only (no token)" in line for line in lines), lines

    status, body = running.get("/api/dlqs")
    assert status == 200
    [row] = json.loads(body)
    assert (row["queue"], row["exists"]) == (dlq, False)  # no such queue: said, not an error

    _, took = running.stop()
    assert took < 5, took


@pytest.mark.rabbitmq
def test_a_console_with_a_token_on_localhost_does_not_warn_and_needs_the_token(
    broker_url: str, queue_name: str, start_console: StartConsole, tmp_path: Path
) -> None:
    """--token-file on 127.0.0.1: no warning; reads need the bearer token."""
    (tmp_path / "token").write_text(TOKEN + "\n")
    running = start_console(
        "--queue", f"{queue_name}.dlq", "--token-file", str(tmp_path / "token"), "--url", broker_url
    )
    assert "warning" not in running.stderr()
    assert "changes need the token" in running.stderr()
    assert TOKEN not in running.stderr()
    assert running.get("/api/dlqs")[0] == 401
    assert running.get("/api/dlqs", token=TOKEN)[0] == 200
    running.stop()


@pytest.mark.rabbitmq
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stopped_console_exits_0(
    broker_url: str, queue_name: str, start_console: StartConsole, sig: int
) -> None:
    """Exit codes of ``qworker console``: 0 when stopped by SIGTERM or Ctrl-C."""
    running = start_console("--queue", f"{queue_name}.dlq", "--url", broker_url)
    code, _ = running.stop(sig)
    assert code == 0, running.stderr()
