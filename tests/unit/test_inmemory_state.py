"""The in-memory broker's rules without sockets (qworker/testing/inmemory/state.py).

Whether these rules are RabbitMQ's is what tests/contract/ checks against the real
broker; here each rule is pinned down case by case.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from pamqp.commands import Basic

from qworker.testing.inmemory.state import (
    ChannelError,
    Consumer,
    Message,
    Queue,
    State,
    is_cycle,
    record_death,
)
from qworker.wire import LongLongInt


@dataclass
class FakeChannel:
    """Takes deliveries; room for ``room`` unsettled ones per consumer."""

    room: int = 1000
    got: list[tuple[str, bytes, bool]] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)

    def has_room(self, consumer: Consumer) -> bool:
        return consumer.unacked < self.room

    def deliver(self, consumer: Consumer, message: Message) -> None:
        consumer.unacked += 1
        self.got.append((consumer.tag, message.body, message.redelivered))

    def cancelled_by_broker(self, consumer: Consumer) -> None:
        self.cancelled.append(consumer.tag)


def declare(state: State, name: str, **arguments: Any) -> Queue:
    return state.declare(
        name,
        passive=False,
        durable=True,
        exclusive=False,
        auto_delete=False,
        arguments=arguments,
        owner=object(),
    )


def publish(state: State, queue: str, body: bytes, **properties: Any) -> str:
    return state.publish("", queue, body, Basic.Properties(**properties))


def take(state: State, queue: Queue) -> Message:
    message = state.get(queue)
    assert message is not None
    queue.unacked += 1
    return message


def bodies(queue: Queue) -> list[bytes]:
    return [m.body for m in (*queue.returns, *queue.ready)]


# Requeue order


@pytest.mark.parametrize(
    ("kind", "returned", "expected"),
    [
        # classic: back to the original position, whatever order they come back in
        ("classic", [b"2", b"1"], [b"1", b"2", b"3", b"4"]),
        ("classic", [b"2"], [b"2", b"3", b"4"]),
        # quorum with a delivery limit: returned messages first, in the order returned
        ("quorum", [b"2", b"1"], [b"2", b"1", b"3", b"4"]),
        ("quorum", [b"1", b"2"], [b"1", b"2", b"3", b"4"]),
        # quorum without a limit (3.10): a requeue is a new enqueue at the back
        ("quorum-no-limit", [b"2", b"1"], [b"3", b"4", b"2", b"1"]),
    ],
)
def test_returned_messages_go_back_as_the_queue_type_does(
    kind: str, returned: list[bytes], expected: list[bytes]
) -> None:
    state = State()
    arguments: dict[str, Any] = {"x-queue-type": kind.split("-")[0]}
    if kind == "quorum":
        arguments["x-delivery-limit"] = 10
    queue = declare(state, "q", **arguments)
    for body in (b"1", b"2", b"3", b"4"):
        publish(state, "q", body)
    held = {m.body: m for m in (take(state, queue) for _ in range(2))}
    for body in set(held) - set(returned):  # acked
        state.settle(queue, held[body], requeue=None)
    for body in returned:
        state.settle(queue, held[body], requeue=True)
    assert bodies(queue) == expected
    assert all(m.redelivered for m in queue.ready if m.body in returned)
    assert queue.unacked == 0


# Expiry


@pytest.mark.parametrize(
    ("queue_ttl", "expiration", "after", "expired"),
    [
        (1000, None, 0.999, False),
        (1000, None, 1.0, True),
        (None, "500", 0.5, True),
        (None, "500", 0.4, False),
        (1000, "200", 0.2, True),  # the lower of the two
        (200, "1000", 0.2, True),
        (None, None, 1e9, False),
        (None, "0", 0.0, True),
    ],
)
def test_a_message_expires_at_the_lower_of_queue_and_message_ttl(
    queue_ttl: int | None, expiration: str | None, after: float, expired: bool
) -> None:
    state = State()
    state.now = lambda: 1000.0  # type: ignore[method-assign]
    arguments: dict[str, Any] = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "dl"}
    if queue_ttl is not None:
        arguments["x-message-ttl"] = queue_ttl
    queue = declare(state, "q", **arguments)
    dl = declare(state, "dl")
    publish(state, "q", b"m", expiration=expiration)
    state.now = lambda: 1000.0 + after  # type: ignore[method-assign]
    state.expire_all()
    assert (queue.depth, dl.depth) == ((0, 1) if expired else (1, 0))


def test_only_the_head_expires() -> None:
    """A short-lived message behind a long-lived one waits for it (RabbitMQ: head only)."""
    state = State()
    state.now = lambda: 0.0  # type: ignore[method-assign]
    queue = declare(state, "q")
    publish(state, "q", b"long", expiration="10000")
    publish(state, "q", b"short", expiration="10")
    state.now = lambda: 1.0  # type: ignore[method-assign]
    state.expire_all()
    assert bodies(queue) == [b"long", b"short"]
    assert state.next_expiry() == 10.0


def test_an_invalid_expiration_closes_the_channel_with_406() -> None:
    state = State()
    declare(state, "q")
    with pytest.raises(ChannelError) as caught:
        publish(state, "q", b"m", expiration="soon")
    assert caught.value.code == 406


# Dead-lettering and x-death


def test_the_first_death_writes_an_entry_and_the_first_death_headers() -> None:
    headers = record_death(
        {"app": "kept"},
        queue="q",
        reason="expired",
        exchange="ex",
        routing_key="rk",
        expiration="5000",
        now=1_700_000_000.7,
    )
    assert headers == {
        "app": "kept",
        "x-first-death-reason": "expired",
        "x-first-death-queue": "q",
        "x-first-death-exchange": "ex",
        "x-death": [
            {
                "count": 1,
                "reason": "expired",
                "queue": "q",
                "time": datetime.fromtimestamp(1_700_000_000, UTC),
                "exchange": "ex",
                "routing-keys": ["rk"],
                "original-expiration": "5000",
            }
        ],
    }
    assert isinstance(headers["x-death"][0]["count"], LongLongInt)
    assert list(headers["x-death"][0]) == [  # 3.10's order for a new entry
        "count",
        "reason",
        "queue",
        "time",
        "exchange",
        "routing-keys",
        "original-expiration",
    ]
    assert "x-last-death-queue" not in headers  # 3.13+ only


def test_the_same_death_again_counts_in_the_first_entry_and_keeps_its_fields() -> None:
    first = record_death(
        {}, queue="q", reason="expired", exchange="", routing_key="a", expiration=None, now=10
    )
    again = record_death(
        first, queue="q", reason="expired", exchange="x2", routing_key="b", expiration=None, now=99
    )
    [entry] = again["x-death"]
    assert entry["count"] == 2
    assert (entry["exchange"], entry["routing-keys"], entry["time"].timestamp()) == ("", ["a"], 10)
    assert list(entry) == sorted(entry)  # an updated entry has its keys sorted
    assert again["x-first-death-queue"] == "q"


def test_a_new_death_goes_first_and_the_others_are_regrouped() -> None:
    deaths = [
        {"count": 1, "queue": "a", "reason": "expired"},
        {"count": 3, "queue": "b", "reason": "rejected"},
        {"count": 1, "queue": "a", "reason": "expired"},  # a duplicate (pre-#78 history)
    ]
    headers = record_death(
        {"x-death": deaths},
        queue="c",
        reason="expired",
        exchange="",
        routing_key="c",
        expiration=None,
        now=0,
    )
    assert [(d["queue"], d["count"]) for d in headers["x-death"]] == [("c", 1), ("b", 3), ("a", 1)]
    assert "x-first-death-queue" not in headers  # only when there was no x-death


def test_an_x_death_that_is_not_a_list_is_replaced() -> None:
    headers = record_death(
        {"x-death": "forged"},
        queue="q",
        reason="rejected",
        exchange="",
        routing_key="q",
        expiration=None,
        now=0,
    )
    assert [d["queue"] for d in headers["x-death"]] == ["q"]


def test_a_dead_letter_loses_its_expiration() -> None:
    state = State()
    queue = declare(state, "q", **{"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "dl"})
    dl = declare(state, "dl")
    publish(state, "q", b"m", expiration="99999")
    state.dead_letter(queue, take(state, queue), "rejected")
    assert dl.ready[0].properties.expiration is None
    assert dl.ready[0].routing_key == "dl"


@pytest.mark.parametrize(
    ("deaths", "target", "cycle"),
    [
        ([{"queue": "tier", "reason": "expired"}], "work", False),
        ([{"queue": "work", "reason": "expired"}], "work", True),  # a queue into itself
        (
            [{"queue": "tier", "reason": "expired"}, {"queue": "work", "reason": "expired"}],
            "work",
            True,
        ),
        # a rejection on the way means a client took part: not a cycle
        (
            [{"queue": "tier", "reason": "expired"}, {"queue": "work", "reason": "rejected"}],
            "work",
            False,
        ),
        (["malformed", {"queue": "work", "reason": "expired"}], "work", False),
        ([{"queue": "other", "reason": "expired"}], "work", False),
        ([], "work", False),
    ],
)
def test_cycle_detection(deaths: list[Any], target: str, cycle: bool) -> None:
    assert is_cycle(target, deaths) is cycle


def test_a_ttl_queue_dead_lettering_into_itself_drops_the_message() -> None:
    state = State()
    state.now = lambda: 0.0  # type: ignore[method-assign]
    queue = declare(
        state,
        "q",
        **{"x-message-ttl": 10, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": "q"},
    )
    publish(state, "q", b"m")
    state.now = lambda: 1.0  # type: ignore[method-assign]
    state.expire_all()
    assert queue.depth == 0


def test_no_dead_letter_exchange_drops_the_message() -> None:
    state = State()
    queue = declare(state, "q")
    publish(state, "q", b"m")
    state.settle(queue, take(state, queue), requeue=False)
    assert queue.depth == 0 and queue.unacked == 0


# Quorum delivery counts


def test_quorum_counts_returns_and_dead_letters_above_the_limit() -> None:
    state = State()
    queue = declare(
        state,
        "q",
        **{
            "x-queue-type": "quorum",
            "x-delivery-limit": 2,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": "dl",
        },
    )
    dl = declare(state, "dl")
    publish(state, "q", b"m")
    counts = []
    for _ in range(3):
        message = take(state, queue)
        counts.append(message.delivery_count)
        state.settle(queue, message, requeue=True)
    assert counts == [0, 1, 2]
    assert queue.depth == 0
    headers = dl.ready[0].properties.headers
    assert headers is not None
    assert headers["x-death"][0]["reason"] == "delivery_limit"


# Publishing


@pytest.mark.parametrize(
    ("arguments", "outcomes"),
    [
        ({"x-max-length": 2, "x-overflow": "reject-publish"}, ["routed", "routed", "rejected"]),
        ({"x-max-length": 2}, ["routed", "routed", "routed"]),  # drop-head
        ({}, ["routed", "routed", "routed"]),
    ],
)
def test_overflow(arguments: dict[str, Any], outcomes: list[str]) -> None:
    state = State()
    queue = declare(state, "q", **arguments)
    assert [publish(state, "q", str(i).encode()) for i in range(3)] == outcomes
    assert queue.depth == min(3, arguments.get("x-max-length", 3))


def test_unknown_queue_is_unroutable_and_unknown_exchange_is_404() -> None:
    state = State()
    assert publish(state, "nowhere", b"m") == "unroutable"
    with pytest.raises(ChannelError) as caught:
        state.publish("no-such-exchange", "q", b"m", Basic.Properties())
    assert caught.value.code == 404


def test_fail_next_publish_nacks_that_many() -> None:
    state = State()
    queue = declare(state, "q")
    state.fail_publish["q"] = 2
    assert [publish(state, "q", b"m") for _ in range(3)] == ["rejected", "rejected", "routed"]
    assert queue.depth == 1


# Declaring


@pytest.mark.parametrize(
    ("first", "again", "error"),
    [
        ({"x-queue-type": "quorum"}, {"x-queue-type": "quorum"}, None),
        ({"x-queue-type": "quorum"}, {}, None),  # no type matches any type
        ({"x-queue-type": "quorum"}, {"x-queue-type": "classic"}, 406),
        ({"x-message-ttl": 100}, {"x-message-ttl": 200}, 406),
        ({"x-message-ttl": 100}, {}, 406),
        ({}, {"x-delivery-limit": 5}, 406),
        ({"x-custom": 1}, {"x-custom": 2}, None),  # not an argument RabbitMQ compares
    ],
)
def test_declaring_again_must_be_equivalent(
    first: dict[str, Any], again: dict[str, Any], error: int | None
) -> None:
    state = State()
    declare(state, "q", **first)
    if error is None:
        declare(state, "q", **again)
        return
    with pytest.raises(ChannelError) as caught:
        declare(state, "q", **again)
    assert caught.value.code == error
    assert "inequivalent arg" in caught.value.text


def test_the_amq_prefix_is_reserved_for_names_the_broker_makes() -> None:
    state = State()
    with pytest.raises(ChannelError) as caught:
        declare(state, "amq.mine")
    assert caught.value.code == 403
    assert caught.value.text.endswith("contains reserved prefix 'amq.*'")
    made = state.declare(
        "amq.gen-1",
        passive=False,
        durable=False,
        exclusive=True,
        auto_delete=False,
        arguments={},
        owner=None,
        named_by_broker=True,
    )
    assert made.name == "amq.gen-1"


def test_passive_declare_of_a_missing_queue_is_404() -> None:
    state = State()
    with pytest.raises(ChannelError) as caught:
        state.declare(
            "q",
            passive=True,
            durable=True,
            exclusive=False,
            auto_delete=False,
            arguments={},
            owner=None,
        )
    assert (caught.value.code, caught.value.text) == (404, "NOT_FOUND - no queue 'q' in vhost '/'")


# Delivering


def test_consumers_take_turns_and_respect_their_room() -> None:
    state = State()
    queue = declare(state, "q")
    channel = FakeChannel(room=2)
    for tag in ("a", "b"):
        queue.consumers.append(Consumer(tag, queue, channel, no_ack=False, prefetch=2))
    for i in range(6):
        publish(state, "q", str(i).encode())
    assert [(tag, body) for tag, body, _ in channel.got] == [
        ("a", b"0"),
        ("b", b"1"),
        ("a", b"2"),
        ("b", b"3"),
    ]
    assert queue.depth == 2 and queue.unacked == 4


def test_streams_keep_what_is_read() -> None:
    state = State()
    queue = declare(state, "s", **{"x-queue-type": "stream"})
    channel = FakeChannel()
    for i in range(3):
        publish(state, "s", str(i).encode())
    consumer = Consumer("c", queue, channel, no_ack=False, prefetch=10)
    queue.consumers.append(consumer)
    state.dispatch(queue)
    assert [body for _, body, _ in channel.got] == [b"0", b"1", b"2"]
    state.settle(queue, queue.log[0], requeue=None)
    assert len(queue.log) == 3
