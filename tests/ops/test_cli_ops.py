"""`qworker run` options for operations that fail before any broker is needed."""

from __future__ import annotations

import pytest

from qworker.supervisor import Limits
from tests.support.cli import run_cli, run_python

BLOCK_PROMETHEUS = "import sys; sys.modules['prometheus_client'] = None; "


def test_qworker_imports_and_its_cli_loads_without_prometheus_client() -> None:
    """Without the metrics extra, qworker, its CLI, health server and supervisor import."""
    result = run_python(
        BLOCK_PROMETHEUS + "import qworker, qworker.cli, qworker.health, qworker.supervisor; "
        "from qworker.cli import cli; print('ok')"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_metrics_port_without_prometheus_client_is_one_line_naming_the_extra() -> None:
    """--metrics-port without prometheus-client: exit 2 and one line with the pip command."""
    result = run_python(
        BLOCK_PROMETHEUS + "sys.argv = ['qworker', 'run', 'tests.apps.ledger_app:app', "
        "'--metrics-port', '0']; from qworker.cli import main; main()"
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'qworker[metrics]'" in lines[0], result.stderr


def test_supervisor_with_an_unimportable_app_fails_before_starting_processes() -> None:
    """--processes 2 with an app that cannot be imported: exit 3, one line, no child spawned."""
    result = run_cli("run", "tests.apps.no_such_app:app", "--processes", "2", timeout=30)
    assert result.returncode == 3
    assert result.stderr.strip().splitlines() == [
        "qworker: error: cannot import 'tests.apps.no_such_app': "
        "ModuleNotFoundError: No module named 'tests.apps.no_such_app'"
    ]
    assert "supervisor.child_started" not in result.stdout


@pytest.mark.parametrize(
    ("failures", "delay"), [(1, 0.5), (2, 1.0), (3, 2.0), (6, 16.0), (7, 30.0), (500, 30.0)]
)
def test_restart_backoff_doubles_from_half_a_second_to_thirty(failures: int, delay: float) -> None:
    """The n-th consecutive failure of a slot waits 0.5 * 2**(n-1) s, at most 30 s."""
    assert Limits().backoff(failures) == delay
