"""Queue names and arguments for a handler queue, and their idempotent declaration.

For a work queue ``Q``: ``Q`` itself, one ``Q.retry.<tier>`` waiting room per
delay tier (TTL, then dead-lettered back to ``Q``), ``Q.quarantine`` (deliveries that came
back without an outcome, run one at a time: see :mod:`qworker.verdict`), and ``Q.dlq``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import aio_pika
import aiormq
import structlog

from qworker.errors import ConfigurationError
from qworker.retry import tier_name

QueueType = Literal["quorum", "classic"]

DEFAULT_DELIVERY_LIMIT = 10
#: Quorum DLQs get a delivery limit no inspection can reach, because RabbitMQ 4.x
#: gives quorum queues a default limit of 20 and drops messages past it.
DLQ_DELIVERY_LIMIT = 1_000_000_000
_MAX_NAME_BYTES = 255
_LONGEST_SUFFIX = len(".retry.") + len("604800000ms")


#: A handler queue's DLQ is named after it with this suffix (``orders`` -> ``orders.dlq``).
DLQ_SUFFIX = ".dlq"


def dlq_name(queue: str) -> str:
    """The dead-letter queue of ``queue``."""
    return queue + DLQ_SUFFIX


#: A handler queue's quarantine: ``orders`` -> ``orders.quarantine``.
QUARANTINE_SUFFIX = ".quarantine"


def quarantine_name(queue: str) -> str:
    """The quarantine of ``queue``: where a delivery that came back without an outcome waits
    to run alone."""
    return queue + QUARANTINE_SUFFIX


def retry_queue_name(queue: str, tier_ms: int) -> str:
    """The waiting room of ``queue`` for ``tier_ms``: ``orders.retry.2s``."""
    return tier_queue_name(queue, tier_name(tier_ms))


def tier_queue_name(queue: str, tier: str) -> str:
    """The waiting room of ``queue`` for a tier named as outcomes name it (``2s``)."""
    return f"{queue}.retry.{tier}"


def validate_queue_name(queue: str) -> None:
    """Reject names the broker would refuse, or that leave no room for the suffixes."""
    if not queue or not isinstance(queue, str):
        raise ConfigurationError("a handler needs a non-empty queue name")
    if queue.startswith("amq."):
        raise ConfigurationError(f"queue names starting with 'amq.' are reserved: {queue!r}")
    if len(queue.encode()) + _LONGEST_SUFFIX > _MAX_NAME_BYTES:
        raise ConfigurationError(f"queue name too long (max ~230 bytes): {queue[:40]!r}...")


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """A queue to declare: its name, its role and its arguments."""

    name: str
    role: Literal["work", "retry", "dlq", "quarantine"]
    arguments: dict[str, Any] = field(default_factory=dict)


def _at_least_once(queue_type: QueueType) -> dict[str, Any]:
    # Quorum queues dead-letter at-most-once unless told otherwise; at-least-once
    # needs reject-publish overflow. Classic queues dead-letter internally.
    if queue_type == "quorum":
        return {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
    return {}


def work_queue(queue: str, queue_type: QueueType, delivery_limit: int) -> QueueSpec:
    """The work queue: broker-side dead-letter route to the DLQ as a safety net."""
    args: dict[str, Any] = {
        "x-queue-type": queue_type,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": dlq_name(queue),
        **_at_least_once(queue_type),
    }
    if queue_type == "quorum":
        args["x-delivery-limit"] = delivery_limit
    return QueueSpec(queue, "work", args)


def retry_queue(queue: str, tier_ms: int, queue_type: QueueType) -> QueueSpec:
    """A waiting room: holds messages ``tier_ms``, then dead-letters them back to ``queue``."""
    args: dict[str, Any] = {
        "x-queue-type": queue_type,
        "x-message-ttl": tier_ms,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": queue,
        **_at_least_once(queue_type),
    }
    return QueueSpec(retry_queue_name(queue, tier_ms), "retry", args)


def dead_letter_queue(queue: str, queue_type: QueueType) -> QueueSpec:
    """The DLQ: no TTL, a full DLQ rejects publishes instead of dropping its head."""
    args: dict[str, Any] = {"x-queue-type": queue_type, "x-overflow": "reject-publish"}
    if queue_type == "quorum":
        args["x-delivery-limit"] = DLQ_DELIVERY_LIMIT
    return QueueSpec(dlq_name(queue), "dlq", args)


def quarantine_queue(queue: str, queue_type: QueueType, delivery_limit: int) -> QueueSpec:
    """The quarantine: consumed one message at a time; the broker's safety net as on ``Q``.

    qworker counts a quarantined message's crashes itself (``x-qworker-crashes``, every
    queue type) and dead-letters it as poison first; the delivery limit only catches what
    qworker could not (it is the work queue's, and quorum only).
    """
    args: dict[str, Any] = {
        "x-queue-type": queue_type,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": dlq_name(queue),
        **_at_least_once(queue_type),
    }
    if queue_type == "quorum":
        args["x-delivery-limit"] = delivery_limit
    return QueueSpec(quarantine_name(queue), "quarantine", args)


def queue_specs(
    queue: str, queue_type: QueueType, delivery_limit: int, tiers: list[int]
) -> list[QueueSpec]:
    """Every queue of one handler, DLQ first so that the safety net exists before work arrives."""
    return [
        dead_letter_queue(queue, queue_type),
        work_queue(queue, queue_type, delivery_limit),
        quarantine_queue(queue, queue_type, delivery_limit),
        *(retry_queue(queue, tier, queue_type) for tier in tiers),
    ]


async def declare(connection: aio_pika.abc.AbstractConnection, specs: list[QueueSpec]) -> None:
    """Declare ``specs`` durably; a queue that exists with other arguments is a clear error,
    and so is a user without ``configure`` permission (it would fail the same way every time).

    Raises:
        ConfigurationError: arguments differ, or the user may not declare the queue.
    """
    channel = await connection.channel(publisher_confirms=False)
    try:
        for spec in specs:
            try:
                await channel.declare_queue(spec.name, durable=True, arguments=spec.arguments)
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                raise ConfigurationError(
                    f"queue {spec.name!r} already exists with different arguments "
                    f"({_reply_text(exc)}); delete it or declare it with matching settings"
                ) from None
            except aiormq.exceptions.ChannelAccessRefused as exc:
                raise ConfigurationError(
                    f"not allowed to declare queue {spec.name!r} ({_reply_text(exc)}): grant "
                    "the user configure permission, or pre-declare the topology "
                    "(qworker topology APP) and run with --no-declare"
                ) from None
    finally:
        if not channel.is_closed:
            await channel.close()


async def check(connection: aio_pika.abc.AbstractConnection, specs: list[QueueSpec]) -> None:
    """Check that every queue of ``specs`` exists, without declaring (for ``declare=False``).

    A passive declare cannot see a queue's arguments, so only missing queues are found
    here. It needs no ``configure`` permission, except on RabbitMQ 4.2.6 and 4.3.0
    (release notes: "configure permission checks now apply to passive queue
    declarations", relaxed again to any permission in 4.2.7 and 4.3.1); there the check
    is skipped with a warning, and a missing work queue is reported when consuming it.

    Raises:
        ConfigurationError: a queue is missing (every missing one is named).
    """
    missing: list[str] = []
    for spec in specs:
        channel = await connection.channel(publisher_confirms=False)
        try:
            await channel.declare_queue(spec.name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            missing.append(spec.name)
        except aiormq.exceptions.ChannelAccessRefused as exc:
            structlog.get_logger("qworker").warning(
                "topology.check_refused",
                queue=spec.name,
                error=_reply_text(exc),
                note="passive declares need configure permission on RabbitMQ 4.2.6 and 4.3.0",
            )
            return
        finally:
            if not channel.is_closed:
                await channel.close()
    if missing:
        raise ConfigurationError(
            "declare=False, but these queues do not exist: "
            + ", ".join(repr(name) for name in missing)
            + "; declare them (qworker topology APP shows their arguments) or drop --no-declare"
        )


def _reply_text(exc: aiormq.exceptions.AMQPError) -> str:
    frame = exc.args[1] if len(exc.args) > 1 else None
    text = getattr(frame, "reply_text", None) or str(exc)
    return str(text)[:200]
