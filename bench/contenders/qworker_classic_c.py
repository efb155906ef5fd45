"""qworker with queue_type="classic" (like the raw aio-pika baseline's queues)."""

from __future__ import annotations

from bench_common import Ctx, Reporter

from . import _qworker_common as common

QUEUE_TYPE = "classic"
LABEL = "qworker (classic)"
PACKAGES = common.PACKAGES
NOT_APPLICABLE = common.NOT_APPLICABLE
MECHANISMS = common.mechanisms(QUEUE_TYPE)


def queues(ctx: Ctx) -> dict:
    return common.queues(ctx, QUEUE_TYPE)


def publish(ctx: Ctx) -> float:
    return common.publish(ctx, QUEUE_TYPE)


def run_worker(ctx: Ctx, report: Reporter) -> None:
    common.run_worker(ctx, report, QUEUE_TYPE)
