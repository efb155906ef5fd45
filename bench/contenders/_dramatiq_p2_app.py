"""The broker module ``dramatiq_p2_c`` runs with ``dramatiq contenders._dramatiq_p2_app:broker``.

Imported by each forked worker process (dramatiq's ``worker_process``, after it redirected
stdout/stderr to its log pipe): logging at WARNING as ``dramatiq_c``, the worker dies with
the main process, handlers count into this process's own counter file (``_multiproc``).
"""

from __future__ import annotations

import logging

from bench_common import Ctx

from . import dramatiq_p2_c
from ._multiproc import ProcessReporter, die_with_parent

logging.basicConfig(level=logging.WARNING)  # as dramatiq_c (the CLI runs with --skip-logging)
die_with_parent()
ctx = Ctx.from_env()
broker, actor = dramatiq_p2_c.setup(ctx, ProcessReporter(ctx.counter_path))
