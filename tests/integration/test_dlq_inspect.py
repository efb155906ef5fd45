"""Inspecting DLQs on the real broker: never destructive, every filter, broker dead letters."""

from __future__ import annotations

import io
import json
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from aio_pika.abc import AbstractConnection

from qworker import App, dlq
from qworker.topology import QueueType
from tests.support.broker import depth
from tests.support.dlq import (
    Letter,
    broker_dead_letters,
    drain,
    failure,
    invoke,
    letters,
    make_dlq,
    publish,
)

pytestmark = pytest.mark.rabbitmq

#: An app for ``dlq ls APP`` (imported by name, like an operator's app).
LS_QUEUE = f"test.ls.{uuid.uuid4().hex[:8]}"
LS_APP = App(name="ls-test")


@LS_APP.handler(LS_QUEUE, queue_type="classic")
async def ls_handler(payload: dict) -> None:  # type: ignore[type-arg]
    """Never runs: the app only names its DLQ."""


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_25_rounds_of_show_stats_export_leave_the_dlq_unchanged(
    broker_url: str,
    queue_name: str,
    cleanup: list[str],
    amqp: AbstractConnection,
    queue_type: QueueType,
) -> None:
    """show, stats and export (no --remove) return every message: same ids, bodies and count."""
    cleanup.extend(await make_dlq(amqp, queue_name, queue_type))
    dlq_name = f"{queue_name}.dlq"
    seeded = letters(queue_name, 40)
    await publish(amqp, dlq_name, seeded)
    for _ in range(25):
        for args in (
            ["show", dlq_name, "--limit", "0"],
            ["show", dlq_name, "--json", "--limit", "0", "--error-type", "KeyError"],
            ["stats", dlq_name],
            ["export", dlq_name, "--grep", "n"],
        ):
            result = await invoke("dlq", *args, "--url", broker_url)
            assert result.exit_code == 0, result.output
        assert await depth(amqp, dlq_name) == 40
    taken = await drain(amqp, dlq_name)
    assert Counter((t.message_id, t.body) for t in taken) == Counter(
        (s.message_id, s.body) for s in seeded
    )


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_stats_reads_past_the_prefetch_window(
    queue_name: str, cleanup: list[str], amqp: AbstractConnection, queue_type: QueueType
) -> None:
    """A DLQ longer than the 1000-message window is read whole, and is whole afterwards."""
    cleanup.extend(await make_dlq(amqp, queue_name, queue_type))
    dlq_name = f"{queue_name}.dlq"
    await publish(amqp, dlq_name, letters(queue_name, 2400))
    await publish(amqp, dlq_name, letters(queue_name, 3, prefix="late", error_type="x.Late"))
    aggregate, report = await dlq.stats(amqp, dlq_name)
    assert (report.depth, report.scanned, aggregate.total) == (2403, 2403, 2403)
    assert aggregate.error_types == {"builtins.KeyError": 2400, "x.Late": 3}
    late = dlq.Filter(error_type="Late")
    found: list[dlq.DeadLetter] = []
    await dlq.browse(amqp, dlq_name, found.append, chosen=late)
    assert sorted(d.message_id or "" for d in found) == ["late0", "late1", "late2"]
    assert await depth(amqp, dlq_name) == 2403


async def test_show_with_limit_reads_only_what_it_shows(
    queue_name: str, cleanup: list[str], amqp: AbstractConnection
) -> None:
    """Without filters, --limit N fetches N messages, not the whole DLQ."""
    cleanup.extend(await make_dlq(amqp, queue_name))
    dlq_name = f"{queue_name}.dlq"
    await publish(amqp, dlq_name, letters(queue_name, 1500))
    found: list[dlq.DeadLetter] = []
    report = await dlq.browse(amqp, dlq_name, found.append, limit=20)
    assert [d.message_id for d in found] == [f"m{i}" for i in range(20)]
    assert (report.depth, report.scanned) == (1500, 20)


async def test_every_filter_selects_exactly_its_messages(
    queue_name: str, cleanup: list[str], amqp: AbstractConnection
) -> None:
    """error type, reason, handler, message id, grep (body and message), since/until, limit."""
    cleanup.extend(await make_dlq(amqp, queue_name, delivery_limit=1))
    dlq_name = f"{queue_name}.dlq"
    now = datetime.now(UTC)
    three_hours_ago = (now - timedelta(hours=3)).isoformat()
    one_hour_ago = (now - timedelta(hours=1)).isoformat()
    await publish(
        amqp,
        dlq_name,
        [
            *letters(queue_name, 4, prefix="key", at=three_hours_ago),
            *letters(
                queue_name,
                3,
                prefix="val",
                error_type="builtins.ValueError",
                message="amount -5 is negative",
                reason="retries_exhausted",
                handler="billing.handlers:refund",
                at=one_hour_ago,
            ),
            Letter(b'{"sku": "needle-7"}', failure(queue_name, at=one_hour_ago), "body-hit"),
        ],
    )
    await broker_dead_letters(amqp, queue_name, ["poison"])
    cases: list[tuple[dict[str, str], set[str]]] = [
        ({"error_type": "ValueError"}, {"val0", "val1", "val2"}),
        ({"error_type": "builtins.KeyError"}, {"key0", "key1", "key2", "key3", "body-hit"}),
        ({"reason": "retries_exhausted"}, {"val0", "val1", "val2"}),
        ({"reason": "delivery_limit"}, {"poison"}),
        ({"handler": "refund"}, {"val0", "val1", "val2"}),
        ({"handler": "billing.handlers:charge"}, {"key0", "key1", "key2", "key3", "body-hit"}),
        ({"message_id": "val1"}, {"val1"}),
        ({"grep": "needle-7"}, {"body-hit"}),
        ({"grep": "is negative"}, {"val0", "val1", "val2"}),
        ({"since": "2h"}, {"val0", "val1", "val2", "body-hit", "poison"}),
        ({"until": "2h"}, {"key0", "key1", "key2", "key3"}),
        (
            {"since": "4h", "until": "2h", "error_type": "KeyError"},
            {"key0", "key1", "key2", "key3"},
        ),
    ]
    for raw, expected in cases:
        found: list[dlq.DeadLetter] = []
        await dlq.browse(amqp, dlq_name, found.append, chosen=dlq.Filter.parse(**raw))
        assert {d.message_id for d in found} == expected, raw
    limited: list[dlq.DeadLetter] = []
    await dlq.browse(
        amqp, dlq_name, limited.append, chosen=dlq.Filter(error_type="KeyError"), limit=2
    )
    assert [d.message_id for d in limited] == ["key0", "key1"]
    assert await depth(amqp, dlq_name) == 9


async def test_broker_dead_letters_show_their_x_death_reason(
    broker_url: str, queue_name: str, cleanup: list[str], amqp: AbstractConnection
) -> None:
    """delivery_limit (quorum work queue) and rejected (classic) read from x-death, in stats."""
    cleanup.extend(await make_dlq(amqp, queue_name, delivery_limit=1))
    await broker_dead_letters(amqp, queue_name, ["p1", "p2"])
    cleanup.append(f"{queue_name}.classic")
    channel = await amqp.channel()
    rejecting = await channel.declare_queue(
        f"{queue_name}.classic",
        durable=True,  # RabbitMQ 4.3 refuses transient (non-durable) classic queues
        arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": f"{queue_name}.dlq"},
    )
    await publish(amqp, rejecting.name, [Letter(b"{}", {}, "r1")])
    message = await rejecting.get()
    await message.reject(requeue=False)
    await channel.close()
    aggregate, _report = await dlq.stats(amqp, f"{queue_name}.dlq")
    assert aggregate.reasons == {"delivery_limit": 2, "rejected": 1}
    result = await invoke("dlq", "stats", f"{queue_name}.dlq", "--url", broker_url)
    assert result.exit_code == 0, result.output
    assert "delivery_limit" in result.output and "dead-lettered by RabbitMQ" in result.output
    shown = await invoke("dlq", "show", f"{queue_name}.dlq", "--json", "--url", broker_url)
    records = [json.loads(line) for line in shown.stdout.splitlines()]
    assert {r["message_id"]: r["reason"] for r in records} == {
        "p1": "delivery_limit",
        "p2": "delivery_limit",
        "r1": "rejected",
    }


async def test_unverified_quorum_dlq_is_reported_and_ours_is_not(
    broker_url: str, queue_name: str, cleanup: list[str], amqp: AbstractConnection
) -> None:
    """A quorum DLQ qworker did not declare counts reads: detected and warned about."""
    ours = await make_dlq(amqp, queue_name)
    foreign = f"{queue_name}.foreign"
    cleanup.extend([*ours, foreign])
    channel = await amqp.channel()
    await channel.declare_queue(foreign, durable=True, arguments={"x-queue-type": "quorum"})
    await channel.close()
    for name in (f"{queue_name}.dlq", foreign):
        await publish(amqp, name, letters(queue_name, 3))
    for _ in range(2):
        mine = await dlq.browse(amqp, f"{queue_name}.dlq", lambda _: None)
        theirs = await dlq.browse(amqp, foreign, lambda _: None)
    assert mine.safety is dlq.Safety.QUORUM and not mine.delivery_counted
    assert theirs.safety is dlq.Safety.UNVERIFIED and theirs.delivery_counted
    result = await invoke("dlq", "show", foreign, "--url", broker_url)
    assert result.exit_code == 0
    assert "not declared by qworker" in result.stderr
    assert await depth(amqp, foreign) == 3


async def test_ls_lists_the_app_dlqs_with_count_oldest_failure_and_top_errors(
    broker_url: str, cleanup: list[str], amqp: AbstractConnection
) -> None:
    """``dlq ls APP`` names each DLQ of the app; a missing one says so."""
    cleanup.extend(await make_dlq(amqp, LS_QUEUE, "classic"))
    oldest = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    await publish(
        amqp,
        f"{LS_QUEUE}.dlq",
        [
            *letters(LS_QUEUE, 3, at=oldest.isoformat()),
            *letters(LS_QUEUE, 1, prefix="v", error_type="builtins.ValueError"),
        ],
    )
    result = await invoke(
        "dlq", "ls", f"{__name__}:LS_APP", "--queue", "nope.dlq", "--url", broker_url
    )
    assert result.exit_code == 0, result.output
    line = next(x for x in result.stdout.splitlines() if x.startswith(f"{LS_QUEUE}.dlq"))
    assert "4" in line.split() and "2024-01-02 03:04:05" in line
    assert "builtins.KeyError (3), builtins.ValueError (1)" in line
    assert "not declared" in next(x for x in result.stdout.splitlines() if "nope.dlq" in x)
    [summary] = await dlq.summarize(amqp, [f"{LS_QUEUE}.dlq"])
    assert (summary.messages, summary.oldest_failure) == (4, oldest)


async def test_show_escapes_control_characters_from_bodies_and_headers(
    broker_url: str, queue_name: str, cleanup: list[str], amqp: AbstractConnection
) -> None:
    """Escape sequences in a body, an error message or an id never reach the terminal raw."""
    cleanup.extend(await make_dlq(amqp, queue_name))
    evil = "\x1b]0;pwned\x07\x1b[2J\x9b31m"
    headers = failure(queue_name, message=f"boom {evil}", handler=f"h{evil}")
    await publish(
        amqp, f"{queue_name}.dlq", [Letter(f"body {evil}".encode(), headers, f"id{evil}")]
    )
    for args in (["show"], ["show", "--json"], ["stats"], ["export"]):
        result = await invoke("dlq", *args, f"{queue_name}.dlq", "--url", broker_url)
        assert result.exit_code == 0, result.output
        for raw in ("\x1b", "\x07", "\x9b"):
            assert raw not in result.stdout and raw not in result.stderr, args
    table = (await invoke("dlq", "show", f"{queue_name}.dlq", "--url", broker_url)).stdout
    assert "\\x1b]0;pwned\\x07" in table


async def test_export_without_remove_writes_records_and_keeps_the_messages(
    queue_name: str, cleanup: list[str], amqp: AbstractConnection
) -> None:
    """Exported records parse back to the same bodies; the DLQ keeps everything."""
    cleanup.extend(await make_dlq(amqp, queue_name))
    seeded = [*letters(queue_name, 3), Letter(b"\x00\xff", failure(queue_name), "binary")]
    await publish(amqp, f"{queue_name}.dlq", seeded)
    out = io.StringIO()
    report = await dlq.export(amqp, f"{queue_name}.dlq", out)
    records = list(dlq.read_records(out.getvalue().splitlines(), "mem"))
    assert report.matched == 4
    assert [(r.message_id, r.body) for r in records] == [(s.message_id, s.body) for s in seeded]
    assert await depth(amqp, f"{queue_name}.dlq") == 4
