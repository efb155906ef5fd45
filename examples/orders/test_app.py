"""Tests of the orders example's handler on qworker's in-memory broker: no RabbitMQ needed.

Each test runs the example's app (``examples/orders/app.py``) in :func:`qworker.testing.memory`:
its real worker, connected over AMQP to an in-memory broker with RabbitMQ's queue rules,
whose clock jumps over retry delays. The app is module-level: ``memory()`` points it at the
in-memory broker for the block and restores its URL after, the harness removes its observer,
and ``_app_left_as_found`` checks both. See docs/testing.md.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from examples.orders import app as orders
from qworker import dlq
from qworker.testing import memory

QUEUE = "orders.placed"
#: ``RetryPolicy(initial_delay=0.5, multiplier=2.0)``: the tiers of retries 1, 2 and 3.
TIERS = ["500ms", "1s", "2s"]


def order(order_id: str, customer: str = "alice") -> dict[str, object]:
    return {"order_id": order_id, "amount_cents": 1250, "customer": customer}


class Gateway:
    """The example's flaky payment gateway, scripted.

    ``charge`` fails when ``random.random() < ORDERS_FAILURE_RATE``. With the rate at 0.5
    and this object standing in for the example module's ``random`` (only that module's:
    qworker's retry jitter keeps the real one), the next ``down`` calls fail and every
    other call answers.
    """

    def __init__(self) -> None:
        self.down = 0
        self.calls = 0

    def random(self) -> float:
        self.calls += 1
        if self.down:
            self.down -= 1
            return 0.0  # below the rate: PaymentGatewayDown
        return 0.99


@pytest.fixture
def gateway(monkeypatch: pytest.MonkeyPatch) -> Gateway:
    scripted = Gateway()
    monkeypatch.setenv("ORDERS_FAILURE_RATE", "0.5")
    monkeypatch.setattr(orders, "random", scripted)
    return scripted


@pytest.fixture(autouse=True)
def _app_left_as_found() -> Iterator[None]:
    """The module-level app ends each test with the URL and observers it started with."""
    urls, observers = list(orders.app.urls), list(orders.app.observers)
    yield
    assert orders.app.urls == urls
    assert orders.app.observers == observers


async def test_gateway_down_once_is_retried_after_its_delay_then_charged(
    gateway: Gateway,
) -> None:
    gateway.down = 1
    async with memory(orders.app) as h:
        started = time.monotonic()
        await h.publish(QUEUE, order("o-1"), message_id="o-1")
        await h.run_until_idle()
        elapsed = time.monotonic() - started

        [retry] = h.retried(QUEUE)
        assert (retry.message_id, retry.attempt, retry.tier) == ("o-1", 1, "500ms")
        assert retry.error_type == "examples.orders.app.PaymentGatewayDown"
        assert retry.classification == "transient"
        [charged] = h.handled(QUEUE)
        assert (charged.message_id, charged.attempt) == ("o-1", 2)
        assert gateway.calls == 2
        assert await h.dead_letters(QUEUE) == []
    # The retry waited about 0.5 s in orders.placed.retry.500ms, on the broker's virtual clock.
    assert elapsed < 0.5, f"publish to charge took {elapsed:.3f} s of real time"


async def test_unknown_customer_is_dead_lettered_at_once(gateway: Gateway) -> None:
    async with memory(orders.app) as h:
        await h.publish(QUEUE, order("o-2", customer="nobody"), message_id="o-2")
        await h.run_until_idle()

        dead = await h.assert_dead_lettered("o-2", reason="permanent_error")
        assert dead.error_type == "builtins.LookupError"
        assert dead.error_message == "customer 'nobody' does not exist"
        assert dead.attempt == 1
        assert dead.handler == "examples.orders.app:charge"
        assert h.retried(QUEUE) == []  # permanent: not retried
        assert h.handled(QUEUE) == []
        assert gateway.calls == 0  # it failed before reaching the gateway


@pytest.mark.parametrize(
    ("body", "content_type", "says"),
    [
        (b"this is not an order", "text/plain", "content type 'text/plain' is not JSON"),
        (b"this is not an order", "application/json", "Invalid JSON"),
        (b'{"order_id": "o-3", "amount_cents": 0, "customer": "alice"}', None, "amount_cents"),
    ],
    ids=["text", "not-json", "invalid-order"],
)
async def test_bad_body_is_dead_lettered_as_decode_error(
    gateway: Gateway, body: bytes, content_type: str | None, says: str
) -> None:
    async with memory(orders.app) as h:
        await h.publish_raw(QUEUE, body, content_type=content_type, message_id="bad")
        await h.run_until_idle()

        dead = await h.assert_dead_lettered("bad", reason="decode_error")
        assert dead.error_type == "qworker.errors.DecodeError"
        assert says in dead.error_message
        assert dead.body == body  # kept as sent, for whoever fixes it
        assert h.handled(QUEUE) == []
        assert gateway.calls == 0  # the handler never ran


async def test_replay_after_the_fixes_charges_everything_and_empties_the_dlq(
    gateway: Gateway,
) -> None:
    gateway.down = 4  # down for all 4 attempts (max_attempts=4)
    async with memory(orders.app) as h:
        await h.publish(QUEUE, order("o-4"), message_id="o-4")
        await h.publish(QUEUE, order("o-5", customer="nobody"), message_id="o-5")
        await h.run_until_idle()  # 0.5 + 1 + 2 s of retry delays, on the virtual clock

        exhausted = await h.assert_dead_lettered("o-4", reason="retries_exhausted")
        assert exhausted.attempt == 4
        assert [r.tier for r in h.retried(QUEUE)] == TIERS
        await h.assert_dead_lettered("o-5", reason="permanent_error")

        # Fix 1: the gateway is back. Replay only the group it caused.
        result = await h.replay(QUEUE, dlq.Filter(reason="retries_exhausted"))
        assert (result.replayed, result.skipped, result.failed) == (1, 0, 0)
        await h.run_until_idle()
        assert [o.message_id for o in h.handled(QUEUE)] == ["o-4"]
        [left] = await h.dead_letters(QUEUE)
        assert left.message_id == "o-5"

        # Fix 2: o-5 was for a known customer. Correct its body and replay it
        # (what `qworker dlq edit` does).
        await dlq.replace(h.connection, left, left.body.replace(b'"nobody"', b'"alice"'))
        await h.run_until_idle()
        assert [o.message_id for o in h.handled(QUEUE)] == ["o-4", "o-5"]
        assert await h.dead_letters(QUEUE) == []


async def test_refused_retry_copy_is_published_again_and_the_order_retried(
    gateway: Gateway,
) -> None:
    gateway.down = 1
    async with memory(orders.app) as h:
        assert h.broker is not None
        # The retry tier nacks the next copy (as a full reject-publish queue would).
        h.broker.fail_next_publish(f"{QUEUE}.retry.500ms")
        await h.publish(QUEUE, order("o-6"), message_id="o-6")
        await h.run_until_idle()

        # The refused copy was published again after the worker's back-off while the original
        # was held (not acked, not given back): the retry happened as planned and the order was
        # charged on its second attempt, the gateway called once per attempt.
        [retry] = h.retried(QUEUE)
        assert retry.message_id == "o-6"
        [charged] = h.handled(QUEUE)
        assert charged.message_id == "o-6"
        assert charged.attempt == 2
        assert gateway.calls == 2
        assert await h.dead_letters(QUEUE) == []


async def test_connection_lost_before_the_ack_charges_again_rather_than_losing(
    gateway: Gateway,
) -> None:
    async with memory(orders.app) as h:
        assert h.broker is not None
        h.broker.drop_connection_on_next_settle(QUEUE)
        await h.publish(QUEUE, order("o-7"), message_id="o-7")
        await h.run_until_idle()

        # The first charge succeeded but its ack was lost with the connection: the broker
        # delivered the order again after the worker reconnected (at-least-once, so
        # charging must be idempotent in a real app).
        assert [o.message_id for o in h.handled(QUEUE)] == ["o-7", "o-7"]
        assert gateway.calls == 2
        assert await h.dead_letters(QUEUE) == []
