"""The ``qworker`` command line: ``run``, ``topology``, ``dlq`` and ``console``.

Exit codes: 0 success; 1 runtime failure (broker unreachable, queue missing,
unreadable file, ...); 2 bad usage or arguments; 3 the app cannot be loaded or is
misconfigured; 4 (``dlq replay``) the canaries died again. Failures are one line on
stderr, never a traceback. The commands live in submodules; the plumbing they share
(exit codes, :func:`~qworker.cli._common.fail`, loading APP) in :mod:`qworker.cli._common`.

Every command is imported only when it is invoked (or listed by ``--help``): a ``dlq``
command needs neither the worker nor the console, and ``run`` needs none of the DLQ
tool (its management-API client alone loads OpenSSL's digests through ``urllib.request``).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

import click

#: The commands imported when first needed: name -> ``module:attribute``.
LAZY_COMMANDS: Mapping[str, str] = {
    "console": "qworker.cli.console:console",
    "dlq": "qworker.cli.dlq:dlq",
    "run": "qworker.cli.run:run",
    "topology": "qworker.cli.run:topology",
}


class LazyGroup(click.Group):
    """A group that imports the modules of :data:`LAZY_COMMANDS` only when one is needed."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in LAZY_COMMANDS:
            module, _, attribute = LAZY_COMMANDS[cmd_name].partition(":")
            command = getattr(importlib.import_module(module), attribute)
            assert isinstance(command, click.Command)
            self.add_command(command, cmd_name)
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qworker")
def cli() -> None:
    """RabbitMQ workers that fail well, and the tool to inspect and replay dead letters."""


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="qworker")
