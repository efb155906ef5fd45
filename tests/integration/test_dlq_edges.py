"""Edge cases of the DLQ tool on the real broker: per-message replay failures, grouping of
distinct ids, delivery-limit policies, and giving messages back in order."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import threading
import uuid
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractConnection
from click.testing import CliRunner, Result

from qworker import dlq, failures
from qworker import headers as h
from qworker.cli import cli
from qworker.dlq import cursor as cursor_module
from qworker.dlq import probes
from qworker.dlq.cursor import select
from qworker.dlq.management import ManagementError, queue_info
from qworker.dlq.probes import FALLBACK_COUNT
from qworker.publish import ConfirmedPublisher
from qworker.topology import declare, queue_specs

pytestmark = pytest.mark.rabbitmq


def failure_headers(queue: str, message: str) -> dict[str, Any]:
    return h.failure_headers(
        None,
        error=failures.ErrorInfo("billing.errors.UnknownCustomer", message, ""),
        attempt=1,
        classification="permanent",
        origin=h.Origin(queue, "billing.handlers:charge", "", queue, "host:1"),
        reason="permanent_error",
    )


async def make_dlq(connection: AbstractConnection, queue: str, kind: str = "quorum") -> list[str]:
    specs = queue_specs(queue, kind, 10, [])  # type: ignore[arg-type]
    await declare(connection, specs)
    return [spec.name for spec in specs]


async def put(
    connection: AbstractConnection, queue: str, messages: Sequence[tuple[str, dict[str, Any]]]
) -> None:
    """Publish ``(message_id, headers)`` pairs to ``queue`` with confirms, in order."""
    channel = await connection.channel(publisher_confirms=True)
    try:
        for start in range(0, len(messages), 200):
            await asyncio.gather(
                *(
                    channel.default_exchange.publish(
                        aio_pika.Message(
                            json.dumps({"id": mid}).encode(),
                            headers=headers,
                            message_id=mid,
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        ),
                        queue,
                    )
                    for mid, headers in messages[start : start + 200]
                )
            )
    finally:
        await channel.close()


async def depth(connection: AbstractConnection, queue: str) -> int:
    channel = await connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)
    finally:
        await channel.close()


async def drain(connection: AbstractConnection, queue: str) -> list[str]:
    """Remove every message of ``queue``; their ids in queue order."""
    ids: list[str] = []
    channel = await connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        while (message := await declared.get(no_ack=True, fail=False)) is not None:
            ids.append(str(message.message_id))
    finally:
        await channel.close()
    return ids


async def invoke(*args: str) -> Result:
    return await asyncio.to_thread(CliRunner().invoke, cli, list(args))


def ids(count: int, prefix: str = "m") -> list[str]:
    return [f"{prefix}{i:03d}" for i in range(count)]


# A. Per-message replay failures


async def test_replay_skips_the_message_that_cannot_be_published_and_replays_the_rest(
    queue_name: str, cleanup: list[str], amqp: AbstractConnection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 7th copy fails (injected): the other 9 are replayed and acked, the 7th stays in
    the DLQ, and a second run replays nothing twice."""
    cleanup.extend(await make_dlq(amqp, queue_name))
    dlq_name = f"{queue_name}.dlq"
    names = ids(10)
    await put(amqp, dlq_name, [(m, failure_headers(queue_name, "x")) for m in names])
    real = ConfirmedPublisher.publish

    async def publish(self: ConfirmedPublisher, message: aio_pika.Message, key: str) -> None:
        if message.message_id == "m006":
            raise OverflowError("float too large to pack with f format")
        await real(self, message, key)

    monkeypatch.setattr(ConfirmedPublisher, "publish", publish)
    events: list[dlq.Event] = []
    result = await dlq.replay(amqp, dlq_name, on_event=events.append)
    assert (result.replayed, result.failed, result.error) == (9, 1, None)
    failed = [e for e in events if e.outcome is dlq.ReplayOutcome.FAILED]
    assert [e.dead_letter.message_id for e in failed] == ["m006"]
    again = await dlq.replay(amqp, dlq_name)
    assert (again.replayed, again.failed) == (0, 1)
    assert await drain(amqp, dlq_name) == ["m006"]
    assert sorted(await drain(amqp, queue_name)) == [m for m in names if m != "m006"]


async def test_cli_replay_into_a_target_refusing_some_replays_the_others_and_exits_5(
    broker_url: str, queue_name: str, cleanup: list[str], amqp: AbstractConnection
) -> None:
    """A reject-publish target with room for 3: 3 replayed, 7 listed as failed by id with a
    one-line reason, exit 5, the 7 still in the DLQ; nothing lost, nothing duplicated."""
    target = f"{queue_name}.small"
    cleanup.extend([*await make_dlq(amqp, queue_name), target])
    channel = await amqp.channel()
    await channel.declare_queue(
        target, durable=True, arguments={"x-max-length": 3, "x-overflow": "reject-publish"}
    )
    await channel.close()
    dlq_name = f"{queue_name}.dlq"
    names = ids(10)
    await put(amqp, dlq_name, [(m, failure_headers(queue_name, "x")) for m in names])
    result = await invoke("dlq", "replay", dlq_name, "--to", target, "--url", broker_url)
    assert result.exit_code == 5, result.output
    assert "replayed 3, skipped 0, failed 7" in result.stdout
    failed_lines = [line for line in result.stderr.splitlines() if line.startswith("failed ")]
    assert len(failed_lines) == 7 and all("refused" in line for line in failed_lines)
    assert "Traceback" not in result.output
    in_target, in_dlq = await drain(amqp, target), await drain(amqp, dlq_name)
    assert len(in_target) == 3 and len(in_dlq) == 7
    assert sorted(in_target + in_dlq) == names


async def test_cli_replay_from_file_reports_an_unencodable_record_before_publishing(
    broker_url: str, queue_name: str, cleanup: list[str], amqp: AbstractConnection, tmp_path: Path
) -> None:
    """A record whose properties pamqp cannot encode: one line naming file:line, exit 1,
    nothing published."""
    cleanup.extend(await make_dlq(amqp, queue_name))
    record = {
        "queue": f"{queue_name}.dlq",
        "properties": {"message_id": "a"},
        "headers": failure_headers(queue_name, "x"),
        "body": "{}",
    }
    bad = {**record, "properties": {"message_id": "b", "app_id": "x" * 300}}
    path = tmp_path / "fixed.jsonl"
    path.write_text(json.dumps(record, default=str) + "\n" + json.dumps(bad, default=str) + "\n")
    result = await invoke("dlq", "replay", "--from-file", str(path), "--url", broker_url)
    assert result.exit_code == 1, result.output
    assert f"{path}:2: cannot be encoded" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert await depth(amqp, queue_name) == 0


# B. Grouping distinct ids, streaming show


async def test_stats_groups_2000_distinct_customer_ids_of_one_error_as_one_group(
    broker_url: str, queue_name: str, cleanup: list[str], amqp: AbstractConnection
) -> None:
    """``customer cus_<random> not found`` with 2,000 ids is one group, and show --limit 0
    streams every row."""
    cleanup.extend(await make_dlq(amqp, queue_name))
    dlq_name = f"{queue_name}.dlq"
    messages = []
    for i in range(2000):
        customer = "cus_" + uuid.uuid4().hex[:6] + "NffrFeUfNV" + uuid.uuid4().hex[:4].upper()
        messages.append((f"m{i}", failure_headers(queue_name, f"customer {customer} not found")))
    await put(amqp, dlq_name, messages)
    result = await invoke("dlq", "stats", dlq_name, "--json", "--url", broker_url)
    assert result.exit_code == 0, result.output
    groups = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(groups) == 1
    assert groups[0]["count"] == 2000
    assert groups[0]["pattern"] == "customer cus_<id> not found"
    shown = await invoke("dlq", "show", dlq_name, "--limit", "0", "--url", broker_url)
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    assert lines[0].startswith("ID") and lines[-1].startswith("2000 shown of 2000")
    assert len(lines) == 2002
    assert await depth(amqp, dlq_name) == 2000


# C. Delivery limits set by policy


@contextlib.contextmanager
def policy(name: str, pattern: str, definition: dict[str, Any]) -> Iterator[None]:
    subprocess.run(
        [
            "rabbitmqctl",
            "set_policy",
            "--apply-to",
            "queues",
            name,
            pattern,
            json.dumps(definition),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    try:
        yield
    finally:
        subprocess.run(["rabbitmqctl", "clear_policy", name], capture_output=True, timeout=60)


@contextlib.contextmanager
def management_api(dlq_name: str, limit: int) -> Iterator[str]:
    """The broker's management API if it is reachable, else a stand-in answering like it
    for ``dlq_name`` with the policy's delivery limit (RabbitMQ without the plugin)."""
    real = "http://guest:guest@127.0.0.1:15672/"
    try:
        queue_info(real, "/", dlq_name, timeout=2)
        yield real
        return
    except ManagementError:
        pass
    answer = {
        "name": dlq_name,
        "type": "quorum",
        "arguments": {"x-queue-type": "quorum", "x-delivery-limit": 1_000_000_000},
        "effective_policy_definition": {"delivery-limit": limit},
    }

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(answer if "/api/queues/" in self.path else {}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://guest:guest@127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()


async def test_delivery_limit_policy_on_the_dlq_refuses_browsing_and_loses_nothing(
    broker_url: str, queue_name: str, cleanup: list[str], amqp: AbstractConnection
) -> None:
    """A policy ``delivery-limit: 2`` on a quorum DLQ: three shows are refused (one line,
    exit 1) before reading anything; the DLQ keeps every message."""
    cleanup.extend(await make_dlq(amqp, queue_name))
    dlq_name = f"{queue_name}.dlq"
    await put(amqp, dlq_name, [(m, failure_headers(queue_name, "x")) for m in ids(5)])
    name = f"qworker-test-{uuid.uuid4().hex[:8]}"
    with policy(name, f"^{dlq_name}$", {"delivery-limit": 2}):
        await asyncio.sleep(1)  # policies apply asynchronously
        with management_api(dlq_name, 2) as url:
            for _ in range(3):
                result = await invoke(
                    "dlq", "show", dlq_name, "--url", broker_url, "--management-url", url
                )
                assert result.exit_code == 1, result.output
                assert "refusing to read" in result.stderr and "delivery limit is 2" in (
                    result.stderr
                )
                assert len(result.stderr.splitlines()) == 1
                assert await depth(amqp, dlq_name) == 5
    assert sorted(await drain(amqp, dlq_name)) == ids(5)


async def test_unknown_delivery_limit_refuses_once_delivery_counts_grow_and_loses_nothing(
    broker_url: str, queue_name: str, cleanup: list[str], amqp: AbstractConnection
) -> None:
    """Without the management API the tool cannot see a ``delivery-limit: 20`` policy: it
    refuses once it sees FALLBACK_COUNT deliveries, and refused attempts cost one delivery of
    the first message only, so nothing is lost (RabbitMQ < 4.3 counts every return)."""
    cleanup.extend(await make_dlq(amqp, queue_name))
    dlq_name = f"{queue_name}.dlq"
    await put(amqp, dlq_name, [(m, failure_headers(queue_name, "x")) for m in ids(5)])
    name = f"qworker-test-{uuid.uuid4().hex[:8]}"
    unreachable = "http://guest:guest@127.0.0.1:1/"
    outcomes = []
    with policy(name, f"^{dlq_name}$", {"delivery-limit": 20}):
        await asyncio.sleep(1)
        for _ in range(FALLBACK_COUNT + 8):
            result = await invoke(
                "dlq", "show", dlq_name, "--url", broker_url, "--management-url", unreachable
            )
            outcomes.append(result.exit_code)
            if result.exit_code:
                assert result.exit_code == 1 and "refusing to read" in result.stderr
                assert len(result.stderr.splitlines()) == 1
            assert await depth(amqp, dlq_name) == 5
    if any(outcomes):  # RabbitMQ < 4.3: every browse counted
        assert outcomes == [0] * FALLBACK_COUNT + [1] * 8
    assert sorted(await drain(amqp, dlq_name)) == ids(5)


# D. Giving messages back in order


@pytest.mark.parametrize("kind", ["quorum", "classic"])
async def test_browse_rolling_more_than_ten_consumers_keeps_the_queue_order(
    queue_name: str, cleanup: list[str], amqp: AbstractConnection, kind: str
) -> None:
    """30 messages read with a window of 2 (15 consumers): read in order, given back in
    order, depth unchanged; twice."""
    cleanup.extend(await make_dlq(amqp, queue_name, kind))
    dlq_name = f"{queue_name}.dlq"
    names = ids(30)
    await put(amqp, dlq_name, [(m, failure_headers(queue_name, "x")) for m in names])
    for _ in range(2):
        seen: list[str | None] = []
        async with select(amqp, dlq_name, dlq.Filter(), window=2) as selection:
            async for held in selection:
                seen.append(held.dead_letter.message_id)
            assert selection.cursor._consumers > 10
        assert seen == names
        assert await depth(amqp, dlq_name) == 30
    assert await drain(amqp, dlq_name) == names


def quorum_member(queue: str, action: str) -> None:
    """``ra:<action>`` (``stop_server``, ``restart_server``) for the quorum queue ``queue``'s
    member on the broker's node: a queue without a leader to ask, as after a node restart."""
    expression = (
        f'{{ok, Q}} = rabbit_amqqueue:lookup(rabbit_misc:r(<<"/">>, queue, <<"{queue}">>)), '
        f"ok = ra:{action}(quorum_queues, amqqueue:get_pid(Q))."
    )
    subprocess.run(["rabbitmqctl", "eval", expression], check=True, capture_output=True, timeout=60)


async def test_a_read_counted_while_the_quorum_dlq_had_no_leader_still_reads_every_message(
    queue_name: str, cleanup: list[str], amqp: AbstractConnection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RabbitMQ answers a passive declare with "0 messages, 0 consumers" at once while a quorum
    queue has no leader (``rabbit_quorum_queue:stat/2``). A read that counted the DLQ then, and
    consumed once the leader was back, showed an empty DLQ (a console page of 0 records after a
    node restart); it must count again with its consumer registered and read them all."""
    cleanup.extend(await make_dlq(amqp, queue_name))
    dlq_name = f"{queue_name}.dlq"
    names = ids(20)
    await put(amqp, dlq_name, [(m, failure_headers(queue_name, "x")) for m in names])
    await asyncio.to_thread(quorum_member, dlq_name, "stop_server")
    counted_empty = await depth(amqp, dlq_name)
    real_guard = cursor_module.delivery_guard

    async def leader_back_after_the_count(
        connection: AbstractConnection, name: str
    ) -> probes.DeliveryGuard:
        # Between the cursor's count and its consumer: the leader comes back.
        await asyncio.to_thread(quorum_member, dlq_name, "restart_server")
        for _ in range(200):  # at most 10 s
            if await depth(connection, name) == len(names):
                break
            await asyncio.sleep(0.05)
        return await real_guard(connection, name)

    monkeypatch.setattr(cursor_module, "delivery_guard", leader_back_after_the_count)
    seen: list[str | None] = []
    async with select(amqp, dlq_name, dlq.Filter()) as selection:
        async for held in selection:
            seen.append(held.dead_letter.message_id)
    assert counted_empty == 0
    assert seen == names
    assert await drain(amqp, dlq_name) == names


async def test_cli_browse_gives_back_with_nacks_not_by_closing_the_channel(
    queue_name: str, cleanup: list[str], amqp: AbstractConnection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closing the cursor cancels its consumer and nacks (multiple, requeue) before the
    channel closes, at most 32 messages a frame, oldest first: the channel close itself
    returns nothing."""
    cleanup.extend(await make_dlq(amqp, queue_name))
    dlq_name = f"{queue_name}.dlq"
    await put(amqp, dlq_name, [(m, failure_headers(queue_name, "x")) for m in ids(70)])
    nacks: list[tuple[int, bool, bool]] = []
    real = aiormq.Channel.basic_nack

    async def spy(
        self: Any,
        delivery_tag: int,
        multiple: bool = False,
        requeue: bool = True,
        wait: bool = True,
    ) -> None:
        nacks.append((delivery_tag, multiple, requeue))
        await real(self, delivery_tag, multiple, requeue, wait)

    monkeypatch.setattr(aiormq.Channel, "basic_nack", spy)
    seen = []
    await dlq.browse(amqp, dlq_name, lambda d: seen.append(d.message_id))
    assert nacks == [(32, True, True), (64, True, True), (70, True, True)]
    assert len(seen) == 70
    assert await drain(amqp, dlq_name) == ids(70)


def test_test_policies_are_cleared() -> None:
    """Every test policy is cleared afterwards (they are named qworker-test-*)."""
    listed = subprocess.run(
        ["rabbitmqctl", "list_policies", "-q"], capture_output=True, text=True, timeout=60
    )
    assert "qworker-test-" not in listed.stdout
