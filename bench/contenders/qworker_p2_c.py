"""qworker (quorum) as ``qworker run --processes 2``: a supervisor and two worker processes.

The same app, publisher and topology as ``qworker_c`` (``_qworker_common``: quorum queues,
the same handler and retry policy). The worker side is qworker's own command line, run in the
process the harness started (``qworker.cli`` with the arguments below, exactly what the
``qworker`` script does)::

    qworker run contenders._qworker_p2_app:app --processes 2 --concurrency 50 --prefetch 50 \
        --log-format json

so that process is the **supervisor** (it imports the app, starts, watches and drains the
workers) and the two workers are ``python -m qworker run ...`` children, each with its own
broker connection and channel. Per process: concurrency 50 and prefetch 50; together 100
handlers and 100 unacked deliveries, the same totals as ``qworker_c``'s one process
(``Worker(app, concurrency=100, prefetch=100)``). Log level INFO and JSON logs, as
``qworker_c`` (``configure_logging("json")``).

The harness sums RSS over the whole process tree (supervisor + 2 workers). Handler calls are
counted per process and summed by a thread in the supervisor (``_multiproc``).
"""

from __future__ import annotations

from bench_common import Ctx, Reporter

from . import _qworker_common as common
from ._multiproc import Aggregator

QUEUE_TYPE = "quorum"
PROCESSES = 2
LABEL = "qworker (quorum), --processes 2"
PACKAGES = common.PACKAGES
NOT_APPLICABLE = common.NOT_APPLICABLE
PROCESS_NOTE = (
    "`qworker run --processes 2 --concurrency 50 --prefetch 50`: supervisor + 2 worker "
    "processes, each concurrency=prefetch=50 (100 in total)"
)
MECHANISMS = {
    scenario: text.replace("qworker Worker(concurrency=prefetch=100)", PROCESS_NOTE)
    if scenario == "S1"
    else f"{PROCESS_NOTE}; {text}"
    for scenario, text in common.mechanisms(QUEUE_TYPE).items()
}


def queues(ctx: Ctx) -> dict:
    return common.queues(ctx, QUEUE_TYPE)


def publish(ctx: Ctx) -> float:
    return common.publish(ctx, QUEUE_TYPE)


def argv(ctx: Ctx) -> list[str]:
    per = str(ctx.prefetch // PROCESSES)
    return ["run", "contenders._qworker_p2_app:app", "--processes", str(PROCESSES),
            "--concurrency", per, "--prefetch", per, "--log-format", "json"]  # fmt: skip


def run_worker(ctx: Ctx, report: Reporter) -> None:
    from qworker.cli import cli

    counts = Aggregator(ctx.counter_path).start()
    try:
        cli.main(args=argv(ctx), prog_name="qworker")  # returns through SystemExit
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    finally:
        counts.close()
