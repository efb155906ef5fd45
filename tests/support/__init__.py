"""The test toolkit: one of each helper the suites share.

- :mod:`tests.support.broker`: ``depth``, ``take``, ``publish_raw``, ``eventually`` (real broker).
- :mod:`tests.support.cli`: ``run_cli`` / ``qworker_command``, the CLI in a subprocess.
- :mod:`tests.support.workers`: ``WorkerProcess`` / ``WorkerPool``, ``qworker run`` children.
- :mod:`tests.support.dlq`: dead letters made with qworker's own header writer.
- :mod:`tests.support.fixtures`: the ``worker`` fixture (``tests/apps/ledger_app.py`` as a
  subprocess) and the ``management_url`` fixture (enables the management plugin if needed).
"""

from pathlib import Path

#: The checkout: the working directory (and PYTHONPATH) of every subprocess.
ROOT = Path(__file__).resolve().parents[2]
