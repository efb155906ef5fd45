"""``python -m qworker`` runs the command line."""

from qworker.cli import main

main()
