"""A DLQ pass over a quorum queue whose leader is too busy to answer in time.

RabbitMQ (3.10 to 4.3, ``rabbit_quorum_queue:stat/1``) answers a passive declare with
0 messages and 0 consumers when a quorum queue's leader does not reply within 250 ms.
On a DLQ of a million dead letters that happened within minutes of a ``stats`` pass,
after a second without deliveries, and the pass ended at 221,001 of 1,000,000. The
in-memory broker reproduces the condition (``MemoryBroker.busy_leader``); a real broker
shows it only at a size no test can fill.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import aio_pika
import pytest

from qworker.dlq import cursor as cursor_module
from qworker.dlq import probes
from qworker.dlq.cursor import Cursor
from qworker.dlq.probes import QueueStat, queue_depth
from qworker.errors import BrokerStalled
from qworker.testing.inmemory import MemoryBroker

DLQ = "orders.dlq"
N = 60


@pytest.mark.parametrize(
    ("ready", "consumers", "seconds", "suspect"),
    [
        (0, 0, 0.26, True),  # RabbitMQ's timeout answer
        (0, 0, 0.001, False),  # an empty queue nobody consumes, answered at once
        (0, 1, 0.3, False),  # a consumer is counted: a real answer, however slow
        (5, 0, 0.3, False),  # messages are counted: a real answer
        (0, 0, probes.SUSPECT_AFTER, True),
    ],
)
def test_only_a_late_zero_with_no_consumer_may_be_the_brokers_timeout(
    ready: int, consumers: int, seconds: float, suspect: bool
) -> None:
    assert QueueStat(ready, consumers, seconds).suspect is suspect


@dataclass
class Setup:
    broker: MemoryBroker
    connection: aio_pika.abc.AbstractConnection


@pytest.fixture
async def filled(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Setup]:
    """A fresh in-memory broker with N messages in the quorum queue DLQ, and a connection.

    Idle checks come every 0.2 s, and a probe takes one answer (the cursor's own rule must
    hold, not queue_depth's retries); tests change more where they need to.
    """
    monkeypatch.setattr(cursor_module, "IDLE_SECONDS", 0.2)
    monkeypatch.setattr(probes, "DEPTH_ATTEMPTS", 1)
    async with MemoryBroker() as broker:
        connection = await aio_pika.connect(broker.url)
        channel = await connection.channel()
        await channel.declare_queue(DLQ, durable=True, arguments={"x-queue-type": "quorum"})
        for i in range(N):
            await channel.default_exchange.publish(
                aio_pika.Message(b"{}", message_id=f"m-{i}"), routing_key=DLQ
            )
        await channel.close()
        yield Setup(broker, connection)
        broker.state.busy_until.clear()  # the leader answers again: nothing was lost
        assert await queue_depth(connection, DLQ) == N
        await connection.close()


async def test_a_pass_reads_every_message_through_a_busy_leader(filled: Setup) -> None:
    seen: list[str | None] = []
    async with Cursor(filled.connection, DLQ, window=10) as cursor:
        async for held in cursor:
            seen.append(held.dead_letter.message_id)
            if len(seen) == 15:
                # Idle checks fall inside the silence: each is answered "0, 0" late.
                filled.broker.busy_leader(DLQ, 1.0)
    assert seen == [f"m-{i}" for i in range(N)]


async def test_a_silence_longer_than_the_stall_limit_ends_the_pass_with_a_clear_error(
    filled: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cursor_module, "STALL_SECONDS", 0.6)
    monkeypatch.setattr(cursor_module, "RETURN_SECONDS", 0.3)
    read = 0
    with pytest.raises(BrokerStalled, match=r"delivered nothing from 'orders\.dlq'") as stalled:
        async with Cursor(filled.connection, DLQ, window=10) as cursor:
            async for _ in cursor:
                read += 1
                if read == 15:
                    filled.broker.busy_leader(DLQ, 30.0)
    assert "of 60 read" in str(stalled.value)


async def test_queue_depth_asks_again_about_a_suspect_zero(
    filled: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(probes, "DEPTH_ATTEMPTS", 8)
    filled.broker.busy_leader(DLQ, 0.3)
    # The first answer (after 0.25 s) says 0; asked again after the silence: N.
    assert await queue_depth(filled.connection, DLQ) == N


async def test_a_pass_does_not_report_an_empty_queue_the_broker_only_failed_to_count(
    filled: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(probes, "DEPTH_ATTEMPTS", 2)
    filled.broker.busy_leader(DLQ, 5.0)
    with pytest.raises(BrokerStalled, match="did not say how many messages"):
        async with Cursor(filled.connection, DLQ, window=10):
            pass


async def test_a_pass_opened_while_the_queue_has_no_leader_reads_it_once_the_leader_is_back(
    filled: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a leader RabbitMQ answers "0, 0" at once (not late): only an answer that counts
    the pass's own consumer is believed, so a pass opened just after a node restart reads the
    whole queue rather than reporting it empty."""
    monkeypatch.setattr(probes, "DEPTH_ATTEMPTS", 8)
    filled.broker.leader_unavailable(DLQ, 0.5)
    false_zero = await probes.queue_stat(filled.connection, DLQ)
    assert (false_zero.ready, false_zero.suspect) == (0, False)  # fast: queue_depth believes it
    filled.broker.leader_unavailable(DLQ, 0.5)
    async with Cursor(filled.connection, DLQ, window=10) as cursor:
        assert cursor.depth == N
        seen = [held.dead_letter.message_id async for held in cursor]
    assert seen == [f"m-{i}" for i in range(N)]


async def test_a_queue_that_stays_without_a_leader_ends_the_pass_with_a_clear_error(
    filled: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No answer that counts the consumer: a clear error, and no consumer left behind to hold
    the messages once the leader is back."""
    monkeypatch.setattr(probes, "DEPTH_ATTEMPTS", 3)
    filled.broker.leader_unavailable(DLQ, 5.0)
    with pytest.raises(BrokerStalled, match="did not count this reader's consumer"):
        await Cursor(filled.connection, DLQ, window=10).__aenter__()
    filled.broker.state.busy_until.clear()
    filled.broker.state.expire_all()  # the leader is back: a consumer left behind gets them now
    stat = await probes.queue_stat(filled.connection, DLQ)
    assert (stat.ready, stat.consumers) == (N, 0)


async def test_an_empty_queue_is_empty_after_one_more_answer(filled: Setup) -> None:
    """The extra answer, which counts the consumer, confirms a real zero at once."""
    channel = await filled.connection.channel()
    await channel.declare_queue("empty.dlq", durable=True, arguments={"x-queue-type": "quorum"})
    await channel.close()
    async with Cursor(filled.connection, "empty.dlq", window=10) as cursor:
        assert cursor.depth == 0
        assert [held async for held in cursor] == []
