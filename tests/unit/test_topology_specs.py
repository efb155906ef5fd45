"""Queue names and declaration arguments (SPEC section 3), without a broker."""

from __future__ import annotations

import pytest

from qworker.retry import MAX_TIER_MS, RetryPolicy
from qworker.topology import (
    DEFAULT_DELIVERY_LIMIT,
    DLQ_DELIVERY_LIMIT,
    QueueSpec,
    QueueType,
    dead_letter_queue,
    dlq_name,
    queue_specs,
    retry_queue,
    retry_queue_name,
    work_queue,
)


@pytest.mark.parametrize(
    ("queue", "tier_ms", "name"),
    [
        ("orders", 500, "orders.retry.500ms"),
        ("orders", 2000, "orders.retry.2s"),
        ("orders", 1500, "orders.retry.1500ms"),
        ("orders", 90_000, "orders.retry.90s"),
        ("orders", 300_000, "orders.retry.5m"),
        ("orders", 3_600_000, "orders.retry.1h"),
        ("orders.placed", 1000, "orders.placed.retry.1s"),
        ("orders", MAX_TIER_MS, "orders.retry.168h"),
    ],
)
def test_retry_queue_names(queue: str, tier_ms: int, name: str) -> None:
    """Retry queues are named Q.retry.<tier> with the fixed tier format."""
    assert retry_queue_name(queue, tier_ms) == name


@pytest.mark.parametrize(("queue", "name"), [("orders", "orders.dlq"), ("a.b.c", "a.b.c.dlq")])
def test_dlq_name(queue: str, name: str) -> None:
    """The dead-letter queue of Q is Q.dlq."""
    assert dlq_name(queue) == name


def test_quorum_work_queue_arguments() -> None:
    """A quorum work queue dead-letters to Q.dlq at-least-once, with a delivery limit."""
    spec = work_queue("orders", "quorum", 7)
    assert spec == QueueSpec(
        "orders",
        "work",
        {
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": "orders.dlq",
            "x-delivery-limit": 7,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        },
    )


def test_classic_work_queue_arguments() -> None:
    """A classic work queue has the DLQ safety net but no delivery limit nor quorum strategy."""
    spec = work_queue("orders", "classic", 7)
    assert spec == QueueSpec(
        "orders",
        "work",
        {
            "x-queue-type": "classic",
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": "orders.dlq",
        },
    )


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
def test_retry_queue_arguments(queue_type: QueueType) -> None:
    """A retry queue holds messages for its tier, then dead-letters them back to Q."""
    spec = retry_queue("orders", 2000, queue_type)
    assert spec.name == "orders.retry.2s"
    assert spec.role == "retry"
    args = spec.arguments
    assert args["x-queue-type"] == queue_type
    assert args["x-message-ttl"] == 2000
    assert type(args["x-message-ttl"]) is int
    assert args["x-dead-letter-exchange"] == ""
    assert args["x-dead-letter-routing-key"] == "orders"
    assert "x-delivery-limit" not in args
    assert "x-expires" not in args
    if queue_type == "quorum":
        assert args["x-dead-letter-strategy"] == "at-least-once"
        assert args["x-overflow"] == "reject-publish"


@pytest.mark.parametrize(
    ("queue_type", "expected"),
    [
        (
            "quorum",
            {
                "x-queue-type": "quorum",
                "x-overflow": "reject-publish",
                "x-delivery-limit": DLQ_DELIVERY_LIMIT,
            },
        ),
        ("classic", {"x-queue-type": "classic", "x-overflow": "reject-publish"}),
    ],
)
def test_dlq_arguments(queue_type: QueueType, expected: dict[str, object]) -> None:
    """The DLQ never drops: no TTL, no dead-lettering onward, a full DLQ rejects publishes."""
    spec = dead_letter_queue("orders", queue_type)
    assert spec == QueueSpec("orders.dlq", "dlq", expected)
    assert "x-message-ttl" not in spec.arguments
    assert "x-max-length" not in spec.arguments
    assert "x-dead-letter-exchange" not in spec.arguments


def test_quorum_dlq_delivery_limit_is_out_of_reach() -> None:
    """The quorum DLQ's delivery limit is far above RabbitMQ 4.x's default of 20."""
    assert DLQ_DELIVERY_LIMIT >= 1_000_000


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
def test_queue_specs_declare_dlq_first_then_work_then_each_tier(queue_type: QueueType) -> None:
    """The DLQ exists before the work queue that dead-letters into it; then the quarantine;
    one queue per tier."""
    tiers = RetryPolicy(max_attempts=8, initial_delay=0.5, max_delay=30).tiers()
    specs = queue_specs("orders", queue_type, DEFAULT_DELIVERY_LIMIT, tiers)
    assert [s.name for s in specs] == [
        "orders.dlq",
        "orders",
        "orders.quarantine",
        "orders.retry.500ms",
        "orders.retry.1s",
        "orders.retry.2s",
        "orders.retry.4s",
        "orders.retry.8s",
        "orders.retry.16s",
        "orders.retry.30s",
    ]
    assert [s.role for s in specs] == ["dlq", "work", "quarantine", *["retry"] * 7]
    assert [s.arguments["x-message-ttl"] for s in specs[3:]] == tiers
    assert all(s.arguments["x-queue-type"] == queue_type for s in specs)
    names = [s.name for s in specs]
    assert len(set(names)) == len(names)


def test_queue_specs_without_retries_have_no_retry_queue() -> None:
    """max_attempts=1 declares only the DLQ, the work queue and its quarantine."""
    specs = queue_specs("orders", "quorum", 10, RetryPolicy(max_attempts=1).tiers())
    assert [(s.name, s.role) for s in specs] == [
        ("orders.dlq", "dlq"),
        ("orders", "work"),
        ("orders.quarantine", "quarantine"),
    ]


def test_every_dead_letter_route_targets_a_declared_queue() -> None:
    """Each x-dead-letter-routing-key names a queue of the same topology (nothing is lost)."""
    specs = queue_specs("orders", "quorum", 10, RetryPolicy().tiers())
    names = {s.name for s in specs}
    for spec in specs:
        target = spec.arguments.get("x-dead-letter-routing-key")
        if target is not None:
            assert spec.arguments["x-dead-letter-exchange"] == ""
            assert target in names


def test_specs_do_not_share_argument_dicts() -> None:
    """Each spec has its own arguments, so editing one cannot change another."""
    first = work_queue("orders", "quorum", 10)
    second = work_queue("orders", "quorum", 10)
    assert first.arguments is not second.arguments


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
def test_the_quarantine_dead_letters_to_the_dlq_like_the_work_queue(queue_type: QueueType) -> None:
    """Whatever qworker could not catch in the quarantine, the broker's safety net sends to the
    DLQ (quorum: the work queue's delivery limit, at-least-once)."""
    from qworker.topology import quarantine_queue

    spec = quarantine_queue("orders", queue_type, 10)
    assert spec.name == "orders.quarantine" and spec.role == "quarantine"
    assert spec.arguments["x-dead-letter-routing-key"] == "orders.dlq"
    assert ("x-delivery-limit" in spec.arguments) is (queue_type == "quorum")
