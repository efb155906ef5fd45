"""What the command line imports (issue 15 part 2): ``qworker dlq show`` loads neither the
worker, the console nor export, replay and the audit trail, and every way to a broker
connection still has qworker's AMQP codec in pamqp before a frame is decoded.

Each check runs in a fresh interpreter (``sys.modules`` of this one holds everything). No
timing is asserted here: the start-up time is measured in
``bench/results/2026-11-29-cli-startup.md``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.cli import run_python

UNREACHABLE = "amqp://guest:guest@127.0.0.1:1/"

#: Modules ``qworker dlq show`` used to import and no longer needs (imported on first use).
NOT_FOR_SHOW = (
    # qworker/__init__.py: the public names of the worker side
    "qworker.alerts",
    "qworker.app",
    "qworker.breaker",
    "qworker.consumer",
    "qworker.context",
    "qworker.events",
    "qworker.handler",
    "qworker.worker",
    # qworker.cli: the other commands
    "qworker.cli.console",
    "qworker.cli.run",
    "qworker.console",
    "qworker.logging",
    # qworker.dlq: export (and its pydantic models), replay, stats, the audit trail
    "qworker.dlq.audit",
    "qworker.dlq.jsonl",
    "qworker.dlq.mttr",
    "qworker.dlq.replay",
    "qworker.dlq.send",
    "qworker.dlq.stats",
    "qworker.dlq.trail",
    "qworker.publish",
)

#: Writes the names in ``sys.modules`` to the file ``$MODULES_OUT`` when the process exits.
RECORD_MODULES = (
    "import atexit, json, os, sys\n"
    "def _record():\n"
    "    with open(os.environ['MODULES_OUT'], 'w') as out:\n"
    "        json.dump(sorted(sys.modules), out)\n"
    "atexit.register(_record)\n"
)

#: Prints the pamqp table codec's modules each time aio-pika opens a connection.
SPY_ON_CONNECT = (
    "import aio_pika\n"
    "from pamqp import decode, encode\n"
    "_connect = aio_pika.Connection.connect\n"
    "async def _spy(self, *args, **kwargs):\n"
    "    print('codec', decode.METHODS['table'].__module__, encode.METHODS['table'].__module__)\n"
    "    return await _connect(self, *args, **kwargs)\n"
    "aio_pika.Connection.connect = _spy\n"
)

QWORKER_CODEC = "codec qworker.wire._decode qworker.wire._encode"


def cli_code(*args: str) -> str:
    """Python code running ``qworker ARGS`` as the console script does."""
    argv = ["qworker", *args]
    return f"import sys\nsys.argv = {argv!r}\nfrom qworker.cli import main\nmain()\n"


def test_dlq_show_imports_neither_the_worker_nor_the_console_nor_export_and_replay(
    tmp_path: Path,
) -> None:
    """``qworker dlq show`` (to the point where it connects) leaves every module of
    :data:`NOT_FOR_SHOW` unimported; the codec and the reading modules are there."""
    out = tmp_path / "modules.json"
    done = run_python(
        RECORD_MODULES + cli_code("dlq", "show", "q.dlq", "--limit", "20", "--url", UNREACHABLE),
        env={"MODULES_OUT": str(out)},
    )
    assert done.returncode == 1, done.stderr
    assert "cannot connect to RabbitMQ" in done.stderr
    loaded = set(json.loads(out.read_text()))
    assert sorted(loaded.intersection(NOT_FOR_SHOW)) == []
    assert {"qworker.wire", "qworker.dlq.cursor", "qworker.cli._terminal"} <= loaded


def test_the_public_names_are_imported_on_first_use_and_are_the_same_objects() -> None:
    """``import qworker`` and ``import qworker.dlq`` import the worker and export/replay
    modules only when a name that lives there is used; ``qworker.App`` and
    ``from qworker.dlq import replay`` are then the objects defined in those modules."""
    code = (
        "import sys, qworker, qworker.dlq\n"
        f"print(sorted(m for m in {NOT_FOR_SHOW!r} if m in sys.modules))\n"
        "from qworker import App, Worker\n"
        "from qworker.dlq import replay, Stats\n"
        "import qworker.app, qworker.worker, qworker.dlq.replay, qworker.dlq.stats\n"
        "m = sys.modules\n"
        "print(App is m['qworker.app'].App, Worker is m['qworker.worker'].Worker,"
        " replay is m['qworker.dlq.replay'].replay, Stats is m['qworker.dlq.stats'].Stats)\n"
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[]", "True True True True"]


@pytest.mark.parametrize("first", ["qworker.dlq.replay", "qworker.dlq.stats", "qworker.dlq.trail"])
def test_a_submodule_imported_later_does_not_replace_the_function_of_the_same_name(
    first: str,
) -> None:
    """``qworker.dlq.replay`` and ``qworker.dlq.stats`` name functions of the package; importing
    those submodules after the package (directly, or through another module) keeps them."""
    done = run_python(
        f"import {first}\nfrom qworker import dlq\n"
        "print(dlq.replay.__module__, dlq.stats.__module__, callable(dlq.replay))"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["qworker.dlq.replay", "qworker.dlq", "True"]


@pytest.mark.parametrize(
    "module",
    [
        "qworker",
        "qworker.connection",
        "qworker.cli",
        "qworker.cli.dlq",
        "qworker.cli._dlq_options",
        "qworker.dlq",
        "qworker.dlq.cursor",
        "qworker.dlq.probes",
        "qworker.app",
        "qworker.worker",
        "qworker.watch",
        "qworker.console.broker",
        "qworker.testing",
    ],
)
def test_importing_any_module_that_connects_installs_the_amqp_codec(module: str) -> None:
    """Whichever module a program imports first, pamqp's table codec is qworker's afterwards
    (:mod:`qworker.wire` is imported by the package, before any of its modules)."""
    done = run_python(
        f"import {module}\nfrom pamqp import decode, encode\n"
        "print('codec', decode.METHODS['table'].__module__, encode.METHODS['table'].__module__)"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == QWORKER_CODEC


@pytest.mark.parametrize(
    "args",
    [
        ["show", "q.dlq"],
        ["show", "q.dlq", "--json"],
        ["stats", "q.dlq"],
        ["ls", "--queue", "q.dlq"],
        ["export", "q.dlq"],
        ["purge", "q.dlq"],
        ["purge", "q.dlq", "--yes"],
        ["replay", "q.dlq"],
        ["replay", "--from-file", "{records}"],
        ["edit", "q.dlq", "m1"],
        ["history"],
        ["history", "--mttr"],
    ],
    ids=" ".join,
)
def test_every_dlq_command_has_the_amqp_codec_when_it_connects(
    tmp_path: Path, args: list[str]
) -> None:
    """Each ``qworker dlq`` command opens its connection with qworker's codec in pamqp."""
    records = tmp_path / "dead.jsonl"
    records.write_text('{"queue": "q.dlq", "body": "{}"}\n')
    command = [a.format(records=records) for a in args]
    done = run_python(SPY_ON_CONNECT + cli_code("dlq", *command, "--url", UNREACHABLE))
    assert done.returncode == 1, done.stderr
    assert "cannot connect to RabbitMQ" in done.stderr
    assert done.stdout.splitlines() == [QWORKER_CODEC], done.stdout
