"""The worker's acks written together (``qworker.acking``), on the real broker.

A multiple ack that covered a delivery still being handled would remove it from the
queue before its handler ended (lost if the worker then died), and the delivery's own
ack would later name a tag the broker no longer holds, which closes the channel
(406 PRECONDITION_FAILED). These tests hold deliveries in the middle of a burst of acks
and check both, on classic and quorum queues.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aio_pika
import aiormq
import pytest

from qworker import App, Context, Permanent, RetryPolicy
from qworker.acking import ChannelAcks
from qworker.delivery import Delivery
from qworker.testing import running
from tests.support.broker import depth, eventually, eventually_depth, take

pytestmark = pytest.mark.rabbitmq


class _AckSpy:
    """Records every ``basic.ack`` the client writes (tag, multiple)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.frames: list[tuple[int, bool]] = []
        original = aiormq.Channel.basic_ack

        async def basic_ack(
            channel: aiormq.Channel, delivery_tag: int, multiple: bool = False, wait: bool = True
        ) -> None:
            self.frames.append((delivery_tag, multiple))
            await original(channel, delivery_tag, multiple=multiple, wait=wait)

        monkeypatch.setattr(aiormq.Channel, "basic_ack", basic_ack)


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_acks_of_one_moment_become_one_multiple_ack_that_skips_held_deliveries(
    amqp: aio_pika.abc.AbstractConnection,
    queue_name: str,
    cleanup: list[str],
    queue_type: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """20 deliveries: 5 and 12 held, 8 rejected, the rest acked in one turn of the loop.

    One multiple ack up to 4, singles above the held 5 (8 is passed, it was rejected); the
    channel stays open; closing it gives back exactly 5 and 12 (8 was requeued before)."""
    spy = _AckSpy(monkeypatch)
    cleanup.append(queue_name)
    setup = await amqp.channel()
    await setup.declare_queue(queue_name, durable=True, arguments={"x-queue-type": queue_type})
    for i in range(1, 21):
        await setup.default_exchange.publish(
            aio_pika.Message(json.dumps(i).encode()), routing_key=queue_name
        )
    await setup.close()

    channel = await amqp.channel()
    underlay = await channel.get_underlay_channel()
    await underlay.basic_qos(prefetch_count=20)
    received: list[aiormq.abc.DeliveredMessage] = []

    async def on_message(raw: aiormq.abc.DeliveredMessage) -> None:
        received.append(raw)

    consume_ok = await underlay.basic_consume(queue_name, on_message)
    await eventually(lambda: len(received) == 20)
    await underlay.basic_cancel(consume_ok.consumer_tag)  # the rejected one stays ready
    acks = ChannelAcks(underlay)
    deliveries = {d.delivery_tag: d for d in (Delivery(raw, acks) for raw in received)}
    assert sorted(deliveries) == list(range(1, 21))
    assert {tag: json.loads(d.body) for tag, d in deliveries.items()} == {t: t for t in deliveries}

    await deliveries[8].reject()
    held = {5, 12}
    acked = [t for t in deliveries if t not in held | {8}]
    await asyncio.gather(*(deliveries[t].ack() for t in acked))
    await acks.written(5)

    assert spy.frames == [(4, True)] + [(t, False) for t in acked if t > 4]
    assert not underlay.is_closed
    await eventually_depth(amqp, queue_name, 1)  # 8, requeued

    await deliveries[5].ack()  # below the gap now: the run reaches up to 11
    await acks.written(5)
    assert spy.frames[-1] == (5, True)
    assert not underlay.is_closed
    await channel.close()  # 12 was never acked: the broker has it back
    back = await take(amqp, queue_name, 2)
    assert sorted(json.loads(m.body) for m in back) == [8, 12]
    assert await depth(amqp, queue_name) == 0


async def _one_delivery(
    amqp: aio_pika.abc.AbstractConnection, queue_name: str, cleanup: list[str]
) -> tuple[aio_pika.abc.AbstractChannel, Delivery, ChannelAcks]:
    """One message in a fresh queue, fetched (``basic.get``) as a Delivery with its acks."""
    cleanup.append(queue_name)
    channel = await amqp.channel()
    await channel.declare_queue(queue_name, durable=True)
    await channel.default_exchange.publish(aio_pika.Message(b"1"), routing_key=queue_name)
    underlay = await channel.get_underlay_channel()
    acks = ChannelAcks(underlay)
    return channel, Delivery(await underlay.basic_get(queue_name), acks), acks


async def test_acks_after_the_channel_closed_raise_so_the_worker_logs_them_lost(
    amqp: aio_pika.abc.AbstractConnection, queue_name: str, cleanup: list[str]
) -> None:
    """An ack booked on a closed channel raises, as aiormq's single ack did."""
    channel, delivery, _ = await _one_delivery(amqp, queue_name, cleanup)
    await channel.close()
    with pytest.raises(aiormq.exceptions.ChannelInvalidStateError):
        await delivery.ack()
    assert await depth(amqp, queue_name) == 1


async def test_a_delivery_settles_once_a_reject_after_its_ack_is_nothing(
    amqp: aio_pika.abc.AbstractConnection, queue_name: str, cleanup: list[str]
) -> None:
    """A delivery acked and then given back (the worker's grace ran out around the ack): the
    booked ack is written, the reject is not (written first, it would requeue the message,
    and the ack would then name a tag the broker no longer holds and close the channel)."""
    channel, delivery, acks = await _one_delivery(amqp, queue_name, cleanup)
    await delivery.ack()
    await delivery.reject()
    await delivery.nack()
    await acks.written(5)
    await asyncio.sleep(0.3)
    assert not channel.is_closed
    await channel.close()
    assert await depth(amqp, queue_name) == 0


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_a_worker_coalesces_acks_around_a_slow_delivery_without_losing_it(
    broker_url: str,
    amqp: aio_pika.abc.AbstractConnection,
    queue_name: str,
    cleanup: list[str],
    queue_type: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Message 30 is held while 59 others succeed or are dead-lettered (copy, then ack):
    acks below it go as multiple acks, acks above it singly; message 30 is not covered (its
    own ack later closes nothing, it runs once), and exactly the failed ones are in the DLQ."""
    spy = _AckSpy(monkeypatch)
    app = App(broker_url)
    release = asyncio.Event()
    all_in = asyncio.Event()  # every handler starts together, as in a burst
    calls: dict[int, int] = {}

    @app.handler(queue_name, retry=RetryPolicy(max_attempts=1), queue_type=queue_type)
    async def handle(payload: dict[str, Any], ctx: Context) -> None:
        ident = payload["id"]
        calls[ident] = calls.get(ident, 0) + 1
        if len(calls) == 60:
            all_in.set()
        await all_in.wait()
        if ident == 30:
            await release.wait()
        if ident % 2 == 0:
            raise Permanent(f"order {ident} cannot be charged")

    cleanup.extend(s.name for s in app.topology())
    async with running(app, concurrency=60, prefetch=60):
        for ident in range(60):
            await app.publish(queue_name, {"id": ident})
        await eventually(lambda: len(calls) == 60 and sum(calls.values()) == 60)
        await eventually_depth(amqp, f"{queue_name}.dlq", 29)
        release.set()
        await eventually_depth(amqp, f"{queue_name}.dlq", 30)
        await asyncio.sleep(0.3)  # a wrong ack of message 30 would close the channel now
    frames = list(spy.frames)
    assert calls == dict.fromkeys(range(60), 1)
    assert any(multiple for _, multiple in frames), frames
    assert len(frames) < 59, frames  # 60 acks, fewer frames
    assert await depth(amqp, queue_name) == 0
    dead = await take(amqp, f"{queue_name}.dlq", 30)
    assert sorted(json.loads(m.body)["id"] for m in dead) == list(range(0, 60, 2))
