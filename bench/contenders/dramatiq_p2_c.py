"""Dramatiq as ``dramatiq --processes 2 --threads 8``: its main process and two worker processes.

The actor, broker, middleware and publisher are those of the harness's ``dramatiq_c`` (copied
here: the harness is read-only); the worker side is dramatiq's own command line
(``dramatiq.cli.main``) run in the process the harness started, which becomes dramatiq's main
process: it forks the two worker processes (fork is dramatiq's default start method on Linux),
forwards SIGTERM to them and relays their log output through pipes.

Per worker process: 8 threads (``--threads 8``, as ``dramatiq_c``'s one process) and a queue
prefetch of 50 (env ``dramatiq_queue_prefetch=50``), so 100 unacked deliveries in total, like
``dramatiq_c``'s one process with ``queue_prefetch = 100``; 16 handler threads in total. The
delay-queue prefetch keeps its default (1000 x threads per process). Logging as ``dramatiq_c``:
``--skip-logging`` and ``logging.basicConfig(level=WARNING)`` in each worker process (without
it the CLI logs at INFO, e.g. one "Retrying message" line per retry that ``dramatiq_c`` does not
print); the worker processes' output still goes through the main process, as the CLI does it.

Handler calls are counted per process and summed by a thread in the main process
(``_multiproc``); the harness sums RSS over the process tree (main + 2 workers).
"""

from __future__ import annotations

import os
import time

from bench_common import Ctx, PermanentError, Reporter, TransientError, make_payload

from ._multiproc import Aggregator

LABEL = "dramatiq, --processes 2"
PACKAGES = ("dramatiq", "pika")
NOT_APPLICABLE: dict[str, str] = {}
PROCESSES = 2
MECHANISMS = {
    "S1": "actor.send(payload); `dramatiq --processes 2 --threads 8 --skip-logging` "
    "(dramatiq.cli.main in the harness's worker process: main + 2 forked worker processes), "
    "each worker process 8 threads and queue prefetch 50 (env dramatiq_queue_prefetch=50; "
    "100 in total), logging.basicConfig(WARNING) in each",
    "S2": "as dramatiq_c, in each worker process: handler raises; default Retries middleware "
    "with actor options max_retries=1, min_backoff=1 ms, max_backoff=10 ms (<q> -> <q>.DQ "
    "(eta) -> worker memory -> <q>); CurrentMessage middleware to read options['retries']",
    "S3": "as dramatiq_c: handler raises with actor max_retries=0 -> message.fail() -> "
    "basic_nack(requeue=False) -> RabbitMQ dead-letters into <q>.XQ",
}
ACTOR_NAME = "bench_handle"
APP = "contenders._dramatiq_p2_app:broker"


def queues(ctx: Ctx) -> dict:
    q = ctx.queue
    dead = f"{q}.XQ" if ctx.scenario == "S3" else None
    return {"main": q, "dead": dead, "delete": [q, f"{q}.DQ", f"{q}.XQ"], "exchanges": []}


def setup(ctx: Ctx, report: object | None):
    """``dramatiq_c._setup``, with the reporter passed in (imports dramatiq: call it only after
    ``dramatiq_queue_prefetch`` is set, dramatiq reads it on import)."""
    import dramatiq
    from dramatiq.brokers.rabbitmq import RabbitmqBroker
    from dramatiq.middleware import CurrentMessage

    broker = RabbitmqBroker(url=ctx.amqp_url)
    if ctx.scenario == "S2":
        broker.add_middleware(CurrentMessage())
    dramatiq.set_broker(broker)

    options = {
        "S1": {},
        "S2": {"max_retries": 1, "min_backoff": 1, "max_backoff": 10},
        "S3": {"max_retries": 0},
    }[ctx.scenario]

    def bench_handle(payload: dict) -> None:
        report.call()
        _ = payload["id"]
        if ctx.scenario == "S2":
            msg = CurrentMessage.get_current_message()
            if msg.options.get("retries", 0) == 0:
                raise TransientError("first attempt fails")
        if ctx.scenario == "S3":
            raise PermanentError("always fails")
        report.done()

    actor = dramatiq.actor(
        bench_handle, actor_name=ACTOR_NAME, queue_name=ctx.queue, broker=broker, **options
    )
    return broker, actor


# ---------------------------------------------------------------- publisher


def publish(ctx: Ctx) -> float:
    broker, actor = setup(ctx, None)  # declares <q>, <q>.DQ, <q>.XQ on first send
    try:
        t0 = time.perf_counter()
        for i in range(ctx.n):
            actor.send(make_payload(i, ctx.run_id, ctx.body_size))
        return time.perf_counter() - t0
    finally:
        broker.close()


# ------------------------------------------------------------------- worker


def argv(ctx: Ctx) -> list[str]:
    return [APP, "--processes", str(PROCESSES), "--threads", str(ctx.threads), "--skip-logging",
            "--worker-shutdown-timeout", "10000"]  # fmt: skip


def run_worker(ctx: Ctx, report: Reporter) -> None:
    os.environ["dramatiq_queue_prefetch"] = str(ctx.prefetch // PROCESSES)  # noqa: SIM112 (its name)
    import dramatiq.cli

    counts = Aggregator(ctx.counter_path).start()
    try:
        rc = dramatiq.cli.main(dramatiq.cli.make_argument_parser().parse_args(argv(ctx)))
    finally:
        counts.close()
    if rc:
        raise SystemExit(f"dramatiq exited with {rc}")
