"""Experiment: raw_copy_quorum with qworker's work-queue and DLQ arguments (at-least-once
dead-lettering to Q.dlq, reject-publish, delivery limit 10), nothing else changed.

Not a contender of the regular runs (it is not in bench/contenders). To compare S2 with and
without the arguments (bench/results/2026-11-29-s2-queue-args.md), from the harness folder:

    BENCH_CONTENDERS_PATH=<repo>/bench/experiments:<repo>/bench/contenders \
      python peers_bench.py --n 10000 --reps 3 --skip-ceiling --out /tmp/s2.json \
      --contenders raw_copy_quorum rcq_qargs qworker_c --scenarios S2
"""

from __future__ import annotations

from contenders import raw_copy as _floor

_floor.QUEUE_TYPE = "quorum"

LABEL = "raw_copy_quorum + qworker's work-queue arguments"
PACKAGES = _floor.PACKAGES
NOT_APPLICABLE = _floor.NOT_APPLICABLE
MECHANISMS = {
    k: v + " (quorum; work queue with qworker's arguments)" for k, v in _floor.MECHANISMS.items()
}
publish = _floor.publish
run_worker = _floor.run_worker


async def _declare(ch, ctx):
    await ch.declare_queue(
        ctx.dlq,
        durable=True,
        arguments=_floor._args({"x-overflow": "reject-publish", "x-delivery-limit": 1000000000}),
    )
    if ctx.scenario == "S2":
        delay = {
            "x-message-ttl": 1,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": ctx.queue,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }
        await ch.declare_queue(f"{ctx.queue}.delay", durable=True, arguments=_floor._args(delay))
    work = {
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": ctx.dlq,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        "x-delivery-limit": 10,
    }
    return await ch.declare_queue(ctx.queue, durable=True, arguments=_floor._args(work))


_floor._declare = _declare


def queues(ctx):
    q = _floor.queues(ctx)
    q["delete"] = list(dict.fromkeys([*q["delete"], ctx.dlq]))
    return q
