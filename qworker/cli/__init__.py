"""The ``qworker`` command line: ``run``, ``topology``, ``dlq`` and ``console``.

Exit codes: 0 success; 1 runtime failure (broker unreachable, queue missing,
unreadable file, ...); 2 bad usage or arguments; 3 the app cannot be loaded or is
misconfigured; 4 (``dlq replay``) the canaries died again. Failures are one line on
stderr, never a traceback. The commands live in submodules; the plumbing they share
(exit codes, :func:`~qworker.cli._common.fail`, loading APP) in :mod:`qworker.cli._common`.
"""

from __future__ import annotations

import click

from qworker.cli.console import console
from qworker.cli.dlq import dlq
from qworker.cli.run import run, topology


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qworker")
def cli() -> None:
    """RabbitMQ workers that fail well, and the tool to inspect and replay dead letters."""


cli.add_command(run)
cli.add_command(topology)
cli.add_command(dlq)
cli.add_command(console)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="qworker")
