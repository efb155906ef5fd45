"""The app ``qworker_p2_c`` runs with ``qworker run contenders._qworker_p2_app:app``.

Imported by the supervisor and by each worker process (``python -m qworker run ...`` in the
harness's folder, which puts it on ``sys.path``); the run context comes from ``BENCH_CTX`` in
the environment they inherit. The app is ``qworker_c``'s (``_qworker_common.build_app``, quorum
queues); handlers count into this process's own counter file (``_multiproc``).
"""

from __future__ import annotations

from bench_common import Ctx

from . import _qworker_common as common
from ._multiproc import ProcessReporter

ctx = Ctx.from_env()
app = common.build_app(ctx, "quorum", ProcessReporter(ctx.counter_path))  # type: ignore[arg-type]
