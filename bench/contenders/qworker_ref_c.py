"""qworker at a second git ref, next to ``qworker_c`` in the same run (before/after figures).

Behaves exactly like ``qworker_c`` (quorum queues, the same ``_qworker_common`` app, publisher
and worker) but imports ``qworker`` from the tree named by ``QWORKER_REF_TREE``, a directory
holding ``qworker/``, made with e.g.::

    git archive 93c6195 qworker | tar -x -C /tmp/qworker-ref

``QWORKER_REF_LABEL`` (optional, e.g. the commit) goes into the table label. The harness runs
every publisher and worker as its own process (``bench_child.py``), so in those processes this
module puts the tree first on ``sys.path`` before anything imports ``qworker`` and refuses to run
if ``qworker`` still comes from elsewhere. Each such process prints
``qworker_ref_c: <mode> pid <pid> imports qworker from <path>`` on stderr (the worker's line ends
up in the harness's worker log) and appends the same line to ``QWORKER_REF_IMPORT_LOG`` if set.

The runner process (``peers_bench.py``) imports every contender once; there ``qworker_c`` has
already imported the other qworker, so ``queues()`` asks a short child process with the ref
tree for the app's topology instead of building the app in the runner.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bench_common import CTX_ENV, Ctx, Reporter

QUEUE_TYPE = "quorum"
TREE = os.path.abspath(os.environ["QWORKER_REF_TREE"]) if os.environ.get("QWORKER_REF_TREE") else ""
REF = os.environ.get("QWORKER_REF_LABEL") or TREE or "(QWORKER_REF_TREE unset)"
LABEL = f"qworker (quorum) @ {REF}"
# Without a tree (e.g. a plain `bench/run.sh`, which lists every contender) its cells are n/a.
OFF = (
    "" if TREE else "QWORKER_REF_TREE not set (a directory holding qworker/ at the ref to measure)"
)
if TREE and not os.path.isfile(os.path.join(TREE, "qworker", "__init__.py")):
    raise RuntimeError(f"QWORKER_REF_TREE={TREE!r} must be a directory holding qworker/")


def _from_tree(path: str) -> bool:
    return os.path.abspath(path).startswith(os.path.join(TREE, "qworker") + os.sep)


def _note(mode: str) -> None:
    import qworker

    line = f"qworker_ref_c: {mode} pid {os.getpid()} imports qworker from {qworker.__file__}"
    print(line, file=sys.stderr, flush=True)
    if os.environ.get("QWORKER_REF_IMPORT_LOG"):
        with open(os.environ["QWORKER_REF_IMPORT_LOG"], "a") as f:
            f.write(line + "\n")


_loaded = sys.modules.get("qworker")
IN_RUNNER = bool(OFF) or (_loaded is not None and not _from_tree(_loaded.__file__ or ""))
if not IN_RUNNER:
    sys.path.insert(0, TREE)
    import qworker

    if not _from_tree(qworker.__file__):
        raise RuntimeError(f"qworker_ref_c imported {qworker.__file__}, not from {TREE}")
    from . import _qworker_common as common

    PACKAGES = common.PACKAGES
    NOT_APPLICABLE = common.NOT_APPLICABLE
    MECHANISMS = common.mechanisms(QUEUE_TYPE)
else:
    PACKAGES = ("qworker", "aio-pika", "aiormq", "pamqp", "pydantic", "structlog", "tenacity")
    NOT_APPLICABLE: dict[str, str] = dict.fromkeys(("S1", "S2", "S3"), OFF) if OFF else {}
    MECHANISMS = {s: f"as qworker_c, with qworker from {REF}" for s in ("S1", "S2", "S3")}

_TOPOLOGY = """
import json, os, sys
sys.path.insert(0, os.environ["QWORKER_REF_TREE"])
import qworker
from bench_common import Ctx
from contenders import qworker_ref_c as me
print(json.dumps({"file": qworker.__file__, "queues": me.queues(Ctx.from_env())}))
"""


def queues(ctx: Ctx) -> dict:
    if not IN_RUNNER:
        return common.queues(ctx, QUEUE_TYPE)
    harness = os.path.dirname(os.path.abspath(sys.modules["bench_common"].__file__))
    env = dict(os.environ, **{CTX_ENV: ctx.to_env()})
    out = subprocess.run([sys.executable, "-c", _TOPOLOGY], env=env, cwd=harness,
                         capture_output=True, text=True, check=True, timeout=60)  # fmt: skip
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    if not _from_tree(doc["file"]):
        raise RuntimeError(f"topology child imported {doc['file']}, not from {TREE}")
    return doc["queues"]


def publish(ctx: Ctx) -> float:
    _note("publish")
    return common.publish(ctx, QUEUE_TYPE)


def run_worker(ctx: Ctx, report: Reporter) -> None:
    _note("worker")
    common.run_worker(ctx, report, QUEUE_TYPE)
