"""The one way to run the CLI (and Python) in a subprocess, as an operator would."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping

from tests.support import ROOT


def qworker_command(*args: str) -> list[str]:
    """The ``qworker ARGS`` command line, run with this interpreter (for ``Popen``)."""
    return [sys.executable, "-m", "qworker", *args]


def subprocess_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment with the checkout on PYTHONPATH, then ``env`` on top."""
    return {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}


def run_cli(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``qworker ARGS`` in the checkout and wait; ``env`` adds to the environment."""
    return _run(qworker_command(*args), env=env, timeout=timeout)


def run_python(
    code: str, env: Mapping[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``python -c CODE`` in the checkout and wait; ``env`` adds to the environment."""
    return _run([sys.executable, "-c", code], env=env, timeout=timeout)


def _run(
    command: list[str], env: Mapping[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``command`` in the checkout, its output captured as text, never raising on exit codes."""
    return subprocess.run(
        command,
        cwd=ROOT,
        env=subprocess_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
