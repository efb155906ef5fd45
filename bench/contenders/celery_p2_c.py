"""Celery with its prefork pool, concurrency 2: the consumer process and two pool processes.

``celery worker --pool=prefork --concurrency=2`` (run through ``app.worker_main`` in the
process the harness started, like ``celery_c``): that process is celery's main process; it
holds the broker connection, receives the deliveries and sends the acks and rejects, and hands
each task to one of two forked pool processes (billiard), which run the handler. Prefork is
celery's default pool and its own way to use several cores (`--concurrency` defaults to the
number of CPUs), so it is what a celery user runs on this machine; two ``--pool=solo`` workers
would be two separate celery deployments (two consumers, two heartbeats) rather than one
worker with two processes. The consumer keeps prefetch 100 in total: ``worker_prefetch_multiplier``
50 x concurrency 2 (``celery_c``: 100 x 1).

Everything else is ``celery_c``'s (copied here: the harness is read-only): the same queues,
task options, acks_late, no result backend, --without-gossip --without-mingle, remote control
off, heartbeat on, --loglevel=WARNING, the same publisher. Handler calls are counted per pool
process and summed by a thread in the main process (``_multiproc``); the harness sums RSS
over the process tree (main + 2 pool processes).
"""

from __future__ import annotations

import time

from bench_common import Ctx, PermanentError, Reporter, TransientError, make_payload
from celery import Celery
from celery.exceptions import Reject
from celery.signals import worker_process_init
from kombu import Exchange, Queue

from ._multiproc import Aggregator, ProcessReporter, die_with_parent

LABEL = "celery, prefork --concurrency 2"
PACKAGES = ("celery", "kombu", "amqp", "billiard")
NOT_APPLICABLE: dict[str, str] = {}
CONCURRENCY = 2
MECHANISMS = {
    "S1": "task.delay(payload); `celery worker --pool=prefork --concurrency=2` via "
    "app.worker_main: main process (consumer, acks) + 2 pool processes (handlers), "
    "task_acks_late=True, worker_prefetch_multiplier=50 (x 2 = prefetch 100), no result "
    "backend, --without-gossip --without-mingle, remote control off, heartbeat on",
    "S2": "as celery_c: autoretry_for=(TransientError,), retry_kwargs={'countdown': 0}, "
    "max_retries=1: Task.retry republishes the task message to the same queue; the original "
    "is acked",
    "S3": "as celery_c: raise celery.exceptions.Reject(requeue=False) (acks_late) -> "
    "basic_reject -> RabbitMQ dead-letters via x-dead-letter-routing-key=<dlq>",
}
TASK_NAME = "bench.handle"


def queues(ctx: Ctx) -> dict:
    dead = ctx.dlq if ctx.scenario == "S3" else None
    # celery's default routing uses a direct exchange named like the queue
    names = [ctx.queue, ctx.dlq]
    return {"main": ctx.queue, "dead": dead, "delete": names, "exchanges": [ctx.queue]}


def _main_queue(ctx: Ctx) -> Queue:
    args = None
    if ctx.scenario == "S3":
        args = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": ctx.dlq}
    return Queue(ctx.queue, Exchange(ctx.queue, type="direct"), routing_key=ctx.queue,
                 durable=True, queue_arguments=args)  # fmt: skip


def make_app(ctx: Ctx, report: object | None = None) -> Celery:
    app = Celery("bench", broker=ctx.amqp_url, set_as_current=True)
    app.conf.update(
        broker_connection_retry_on_startup=True,
        task_queues=(_main_queue(ctx),),
        task_default_queue=ctx.queue,
        task_default_exchange=ctx.queue,
        task_default_routing_key=ctx.queue,
        task_acks_late=True,
        worker_prefetch_multiplier=ctx.prefetch // CONCURRENCY,  # x concurrency 2 = 100
        task_ignore_result=True,
        worker_enable_remote_control=False,  # no per-worker pidbox queue
        task_serializer="json",
        accept_content=["json"],
    )

    @app.task(name=TASK_NAME, bind=True, autoretry_for=(TransientError,),
              retry_kwargs={"countdown": 0}, max_retries=1)  # fmt: skip
    def handle(self, payload: dict) -> None:
        report.call()
        _ = payload["id"]
        if ctx.scenario == "S2" and self.request.retries == 0:
            raise TransientError("first attempt fails")
        if ctx.scenario == "S3":
            raise Reject(PermanentError("always fails"), requeue=False)
        report.done()

    return app


# ---------------------------------------------------------------- publisher


def publish(ctx: Ctx) -> float:
    app = make_app(ctx)
    with app.connection_for_write() as conn:
        ch = conn.default_channel
        _main_queue(ctx)(ch).declare()
        if ctx.scenario == "S3":
            ch.queue_declare(queue=ctx.dlq, durable=True, auto_delete=False)
    task = app.tasks[TASK_NAME]
    t0 = time.perf_counter()
    for i in range(ctx.n):
        task.delay(make_payload(i, ctx.run_id, ctx.body_size))
    elapsed = time.perf_counter() - t0
    app.close()
    return elapsed


# ------------------------------------------------------------------- worker


def _pool_process_init(**_: object) -> None:
    die_with_parent()  # a pool process must not outlive a main process the harness killed


def run_worker(ctx: Ctx, report: Reporter) -> None:
    app = make_app(ctx, ProcessReporter(ctx.counter_path))
    worker_process_init.connect(_pool_process_init, weak=False)
    argv = [
        "worker",
        "--pool=prefork",
        f"--concurrency={CONCURRENCY}",
        "--loglevel=WARNING",
        "--without-gossip",
        "--without-mingle",
        f"--queues={ctx.queue}",
        f"--hostname=bench-{ctx.run_id}@%h",
    ]
    counts = Aggregator(ctx.counter_path).start()
    try:
        app.worker_main(argv=argv)  # returns/exits on SIGTERM (warm shutdown)
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    finally:
        counts.close()
