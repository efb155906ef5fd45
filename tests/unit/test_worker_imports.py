"""What a lone worker imports (issue 15 part 1, peak RSS): neither the supervisor of
``--processes`` nor the HTTP server of its endpoints, which only a supervisor or
``--metrics-port`` use, nor the DLQ tool, whose management-API client loads
``urllib.request`` and with it OpenSSL's digests (``hashlib``). Each check runs in a fresh
interpreter."""

from __future__ import annotations

from tests.support.cli import run_python

#: Modules only a supervisor (or a worker serving /metrics) needs.
NOT_FOR_A_LONE_WORKER = (
    "qworker.supervisor",
    "qworker.health",
    "http",
    "http.server",
    "qworker.dlq",
    "qworker.cli.dlq",
    "urllib.request",
    "hashlib",
)


def test_a_worker_and_the_run_command_import_neither_the_supervisor_nor_the_dlq_tool() -> None:
    """Building an app and its ``Worker`` and loading ``qworker run`` leaves those modules
    unimported; a supervisor still finds the child's side it uses."""
    code = (
        "import sys\n"
        "from qworker import App, Worker\n"
        "from qworker.cli import cli\n"
        "import click\n"
        "assert cli.get_command(click.Context(cli), 'run') is not None\n"
        "app = App('amqp://guest:guest@127.0.0.1:1/')\n"
        "@app.handler('q')\n"
        "async def handle(payload: dict) -> None: ...\n"
        "Worker(app)\n"
        f"print(sorted(m for m in {NOT_FOR_A_LONE_WORKER!r} if m in sys.modules))\n"
        "from qworker import supervised, supervisor\n"
        "print(supervisor.decode_outcomes is supervised.decode_outcomes)\n"
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[]", "True"]
