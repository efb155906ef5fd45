"""Replaying, editing, exporting with --remove and purging on the real broker."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import pamqp.encode
import pytest
from aio_pika.abc import AbstractConnection
from pydantic import BaseModel

from qworker import App, Context, Permanent, RetryPolicy, dlq
from qworker import headers as h
from qworker.testing import running
from tests.support.broker import depth, eventually_depth
from tests.support.dlq import (
    Letter,
    drain,
    failure,
    invoke,
    letters,
    make_dlq,
    publish,
)

pytestmark = pytest.mark.rabbitmq


class Order(BaseModel):
    order_id: str
    amount_cents: int


#: An app whose handler validates edited bodies (``dlq edit --app``).
EDIT_QUEUE = f"test.edit.{uuid.uuid4().hex[:8]}"
EDIT_APP = App(name="edit-test")


@EDIT_APP.handler(EDIT_QUEUE)
async def charge(order: Order) -> None:
    """Never runs here: only its payload decoder is used."""


def fast() -> RetryPolicy:
    return RetryPolicy(max_attempts=2, initial_delay=0.05, jitter=0)


async def test_replay_of_a_filtered_subset_leaves_the_others(
    queue_name: str, cleanup: list[str], amqp: AbstractConnection
) -> None:
    """Only ValueErrors go back, with replay headers; the KeyErrors stay in the DLQ untouched."""
    cleanup.extend(await make_dlq(amqp, queue_name))
    dlq_name = f"{queue_name}.dlq"
    await publish(
        amqp,
        dlq_name,
        [
            *letters(queue_name, 6, prefix="key"),
            *letters(queue_name, 4, prefix="val", error_type="builtins.ValueError"),
        ],
    )
    events: list[dlq.Event] = []
    result = await dlq.replay(
        amqp, dlq_name, chosen=dlq.Filter(error_type="ValueError"), on_event=events.append
    )
    assert (result.replayed, result.skipped, result.failed, result.error) == (4, 0, 0, None)
    assert {e.target for e in events} == {queue_name}
    replayed = await drain(amqp, queue_name)
    assert sorted(t.message_id or "" for t in replayed) == ["val0", "val1", "val2", "val3"]
    for taken in replayed:
        assert taken.headers[h.REPLAY_COUNT] == 1
        assert h.ERROR_TYPE not in taken.headers and h.ATTEMPT not in taken.headers
        assert taken.headers[h.QUEUE] == queue_name
    left = await drain(amqp, dlq_name)
    assert sorted(t.message_id or "" for t in left) == [f"key{i}" for i in range(6)]
    assert all(h.ERROR_TYPE in t.headers for t in left)


async def test_fixed_messages_replayed_with_canary_are_handled_as_first_attempts(
    broker_url: str, queue_name: str, cleanup: list[str], amqp: AbstractConnection
) -> None:
    """Dead-lettered by a bug, replayed after the fix (canary first): attempt 1, replay count 1."""
    app = App(broker_url)
    fixed = False
    handled: list[tuple[str | None, int, int]] = []
    all_handled = asyncio.Event()

    @app.handler(queue_name, retry=fast())
    async def handle(order: Order, ctx: Context) -> None:
        if not fixed:
            raise Permanent("amount handling bug")
        handled.append((ctx.message_id, ctx.attempt, h.read_int(ctx.headers, h.REPLAY_COUNT)))
        if len(handled) == 6:
            all_handled.set()

    cleanup.extend(s.name for s in app.topology())
    async with running(app, concurrency=4):
        for i in range(6):
            await app.publish(
                queue_name, Order(order_id=f"o{i}", amount_cents=i), message_id=f"o{i}"
            )
        await eventually_depth(amqp, f"{queue_name}.dlq", 6)
        fixed = True
        result = await dlq.replay(
            amqp,
            f"{queue_name}.dlq",
            options=dlq.ReplayOptions(canary=2, canary_wait=0.5, canary_timeout=20),
        )
        assert result.canary is dlq.Canary.PASSED
        assert (result.replayed, result.error) == (6, None)
        await asyncio.wait_for(all_handled.wait(), 10)
    await app.close()
    assert sorted(handled) == [(f"o{i}", 1, 1) for i in range(6)]
    assert await depth(amqp, f"{queue_name}.dlq") == 0


async def test_canary_that_dies_again_stops_the_replay_with_exit_4(
    broker_url: str, queue_name: str, cleanup: list[str], amqp: AbstractConnection
) -> None:
    """The first 2 are replayed, die again (replay count 1), and the other 4 stay untouched."""
    app = App(broker_url)

    @app.handler(queue_name, retry=fast())
    async def handle(order: Order) -> None:
        raise Permanent("still broken")

    cleanup.extend(s.name for s in app.topology())
    async with running(app, concurrency=2):
        for i in range(6):
            await app.publish(
                queue_name, Order(order_id=f"o{i}", amount_cents=i), message_id=f"o{i}"
            )
        await eventually_depth(amqp, f"{queue_name}.dlq", 6)
        result = await invoke(
            "dlq",
            "replay",
            f"{queue_name}.dlq",
            "--canary",
            "2",
            "--canary-timeout",
            "20",
            "--url",
            broker_url,
        )
        assert result.exit_code == 4, result.output
        assert "canary failed" in result.stderr
        await eventually_depth(amqp, f"{queue_name}.dlq", 6)
    await app.close()
    left = await drain(amqp, f"{queue_name}.dlq")
    replays = {t.message_id: h.read_int(t.headers, h.REPLAY_COUNT) for t in left}
    assert sorted(replays.values()) == [0, 0, 0, 0, 1, 1]
    assert "replayed 2, skipped 0, failed 0" in result.stdout


async def test_canaries_nobody_handles_time_out_and_leave_the_rest(
    queue_name: str, cleanup: list[str], amqp: AbstractConnection
) -> None:
    """No worker consumes the canary: after the timeout the replay stops, 4 stay in the DLQ."""
    cleanup.extend(await make_dlq(amqp, queue_name))
    await publish(amqp, f"{queue_name}.dlq", letters(queue_name, 5))
    result = await dlq.replay(
        amqp, f"{queue_name}.dlq", options=dlq.ReplayOptions(canary=1, canary_timeout=1)
    )
    assert (result.canary, result.replayed) == (dlq.Canary.TIMED_OUT, 1)
    assert (await depth(amqp, queue_name), await depth(amqp, f"{queue_name}.dlq")) == (1, 4)


async def test_rate_is_honoured_within_20_percent(
    queue_name: str, cleanup: list[str], amqp: AbstractConnection
) -> None:
    """30 messages at 20/s are confirmed at 16 to 24 per second."""
    cleanup.extend(await make_dlq(amqp, queue_name))
    await publish(amqp, f"{queue_name}.dlq", letters(queue_name, 30))
    stamps: list[float] = []
    result = await dlq.replay(
        amqp,
        f"{queue_name}.dlq",
        options=dlq.ReplayOptions(rate=20),
        on_event=lambda _: stamps.append(time.monotonic()),
    )
    assert result.replayed == 30
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    assert 16 <= rate <= 24, rate


async def test_forged_origin_headers_cannot_redirect_a_replay(
    queue_name: str, cleanup: list[str], amqp: AbstractConnection
) -> None:
    """x-qworker-queue naming another queue, amq.*, a missing queue, 100 KB or a non-string."""
    victim = f"{queue_name}.victim"
    cleanup.extend([*await make_dlq(amqp, queue_name), victim])
    channel = await amqp.channel()
    await channel.declare_queue(victim, durable=True)
    await channel.close()
    forged: list[Any] = [victim, "amq.foo", "ghost.queue", "x" * 100_000, 5, ["a"], bytearray(b"1")]
    await publish(
        amqp,
        f"{queue_name}.dlq",
        [
            *(
                Letter(b"{}", {**failure(queue_name), h.QUEUE: value}, f"forged{i}")
                for i, value in enumerate(forged)
            ),
            Letter(b"{}", failure(queue_name), "legit"),
        ],
    )
    events: list[dlq.Event] = []
    result = await dlq.replay(amqp, f"{queue_name}.dlq", on_event=events.append)
    assert (result.replayed, result.skipped) == (1, len(forged))
    assert all("not" in (e.detail or "") for e in events if e.outcome is dlq.ReplayOutcome.SKIPPED)
    assert [t.message_id for t in await drain(amqp, queue_name)] == ["legit"]
    assert await depth(amqp, victim) == 0
    assert await depth(amqp, f"{queue_name}.dlq") == len(forged)


async def test_binary_header_strings_survive_a_replay(
    queue_name: str,
    cleanup: list[str],
    amqp: AbstractConnection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A non-UTF-8 long-string header (decoded as bytes, which pamqp cannot encode) is replayed."""
    cleanup.extend(await make_dlq(amqp, queue_name))
    encode = pamqp.encode.encode_table_value

    def long_string(value: Any) -> bytes:
        # Another client's way of sending binary in a header: an AMQP long string.
        if isinstance(value, bytes):
            return b"S" + len(value).to_bytes(4, "big") + value
        return encode(value)

    monkeypatch.setattr(pamqp.encode, "encode_table_value", long_string)
    headers = {**failure(queue_name), "blob": b"\xff\xfe\x00"}
    await publish(amqp, f"{queue_name}.dlq", [Letter(b"{}", headers, "bin")])
    monkeypatch.undo()
    result = await dlq.replay(amqp, f"{queue_name}.dlq")
    assert (result.replayed, result.error) == (1, None)
    [taken] = await drain(amqp, queue_name)
    assert bytes(taken.headers["blob"]) == b"\xff\xfe\x00"


async def test_dlq_not_named_dlq_follows_only_headers_naming_existing_plain_queues(
    queue_name: str, cleanup: list[str], amqp: AbstractConnection
) -> None:
    """For a foreign DLQ the header is the origin, if it exists and is no amq.* or DLQ name."""
    foreign = f"{queue_name}-failed"
    cleanup.extend([queue_name, foreign])
    channel = await amqp.channel()
    for name in (queue_name, foreign):
        await channel.declare_queue(name, durable=True)
    await channel.close()
    await publish(
        amqp,
        foreign,
        [
            Letter(b"{}", {h.QUEUE: queue_name}, "ok"),
            Letter(b"{}", {h.QUEUE: "amq.direct"}, "reserved"),
            Letter(b"{}", {h.QUEUE: "ghost.queue"}, "missing"),
            Letter(b"{}", {h.QUEUE: foreign}, "itself"),
            Letter(b"{}", {}, "none"),
        ],
    )
    result = await dlq.replay(amqp, foreign)
    assert (result.replayed, result.skipped) == (1, 4)
    assert [t.message_id for t in await drain(amqp, queue_name)] == ["ok"]
    assert await depth(amqp, foreign) == 4


async def test_replay_to_refuses_reserved_names_the_dlq_itself_and_missing_queues(
    broker_url: str, queue_name: str, cleanup: list[str], amqp: AbstractConnection
) -> None:
    """--to amq.* or the DLQ is a usage error (exit 2); a missing --to queue is not found (1)."""
    cleanup.extend(await make_dlq(amqp, queue_name))
    await publish(amqp, f"{queue_name}.dlq", letters(queue_name, 2))
    for to, code, text in (
        ("amq.gen-x", 2, "reserved"),
        (f"{queue_name}.dlq", 2, "the DLQ itself"),
        ("ghost.queue", 1, "not found"),
    ):
        result = await invoke("dlq", "replay", f"{queue_name}.dlq", "--to", to, "--url", broker_url)
        assert result.exit_code == code, result.output
        assert text in result.stderr and len(result.stderr.splitlines()) == 1
    assert await depth(amqp, f"{queue_name}.dlq") == 2


async def test_dry_run_and_limit(
    broker_url: str, queue_name: str, cleanup: list[str], amqp: AbstractConnection
) -> None:
    """--dry-run names each target and changes nothing; --limit replays only that many."""
    cleanup.extend(await make_dlq(amqp, queue_name))
    await publish(amqp, f"{queue_name}.dlq", letters(queue_name, 5))
    dry = await invoke("dlq", "replay", f"{queue_name}.dlq", "--dry-run", "--url", broker_url)
    assert dry.exit_code == 0, dry.output
    assert dry.stdout.count(f"-> {queue_name}") == 5 and "nothing changed" in dry.stdout
    assert (await depth(amqp, f"{queue_name}.dlq"), await depth(amqp, queue_name)) == (5, 0)
    limited = await invoke(
        "dlq", "replay", f"{queue_name}.dlq", "--limit", "2", "--url", broker_url
    )
    assert "replayed 2, skipped 0, failed 0" in limited.stdout
    assert (await depth(amqp, f"{queue_name}.dlq"), await depth(amqp, queue_name)) == (3, 2)


async def test_unconfirmed_publishes_leave_their_messages_in_the_dlq(
    queue_name: str, cleanup: list[str], amqp: AbstractConnection
) -> None:
    """A target that rejects publishes (full): the refused messages stay; none is lost. Each
    refusal is contained to its message (issue 9 finding 6): the replay goes on and says how
    many failed instead of stopping at the first."""
    full = f"{queue_name}.full"
    cleanup.extend([*await make_dlq(amqp, queue_name), full])
    channel = await amqp.channel()
    await channel.declare_queue(
        full, durable=True, arguments={"x-max-length": 3, "x-overflow": "reject-publish"}
    )
    await channel.close()
    await publish(amqp, f"{queue_name}.dlq", letters(queue_name, 10))
    result = await dlq.replay(
        amqp, f"{queue_name}.dlq", options=dlq.ReplayOptions(to=full, window=1)
    )
    assert result.replayed == 3 and result.failed == 7 and result.error is None
    in_target = {t.message_id for t in await drain(amqp, full)}
    in_dlq = {t.message_id for t in await drain(amqp, f"{queue_name}.dlq")}
    assert in_target | in_dlq == {f"m{i}" for i in range(10)}
    assert len(in_target) == 3


async def test_export_remove_then_replay_from_file(
    broker_url: str, queue_name: str, cleanup: list[str], amqp: AbstractConnection, tmp_path: Path
) -> None:
    """export --remove empties the DLQ into the file; replay --from-file puts them back home."""
    cleanup.extend(await make_dlq(amqp, queue_name))
    seeded = [*letters(queue_name, 3), Letter(b"\x00\xffbin", failure(queue_name), "bin")]
    await publish(amqp, f"{queue_name}.dlq", seeded)
    out = tmp_path / "dead.jsonl"
    exported = await invoke(
        "dlq", "export", f"{queue_name}.dlq", "-o", str(out), "--remove", "--url", broker_url
    )
    assert exported.exit_code == 0, exported.output
    assert len(out.read_text().splitlines()) == 4
    assert await depth(amqp, f"{queue_name}.dlq") == 0
    again = await invoke("dlq", "export", f"{queue_name}.dlq", "-o", str(out), "--url", broker_url)
    assert again.exit_code == 1 and "cannot create" in again.stderr  # never overwritten
    replayed = await invoke("dlq", "replay", "--from-file", str(out), "--url", broker_url)
    assert replayed.exit_code == 0, replayed.output
    assert "replayed 4, skipped 0, failed 0" in replayed.stdout
    back = await drain(amqp, queue_name)
    assert sorted((t.message_id, t.body) for t in back) == sorted(
        (s.message_id, s.body) for s in seeded
    )
    assert all(t.headers[h.REPLAY_COUNT] == 1 for t in back)


async def test_edit_validates_with_the_handler_then_replays_the_new_body(
    broker_url: str, cleanup: list[str], amqp: AbstractConnection, tmp_path: Path
) -> None:
    """Invalid edit: refused, nothing changes. Unchanged: nothing. Valid: replayed, old one gone."""
    cleanup.extend(await make_dlq(amqp, EDIT_QUEUE))
    bad = b'{"order_id": "o1", "amount_cents": "lots"}'
    await publish(amqp, f"{EDIT_QUEUE}.dlq", [Letter(bad, failure(EDIT_QUEUE), "e1")])
    app = f"{__name__}:EDIT_APP"
    args = ("dlq", "edit", f"{EDIT_QUEUE}.dlq", "e1", "--app", app, "--url", broker_url)

    invalid = await invoke(*args, env={"EDITOR": "sed -i s/lots/many/"})
    assert invalid.exit_code == 1 and "refused by the handler" in invalid.stderr
    unchanged = await invoke(*args, env={"EDITOR": "touch"})
    assert unchanged.exit_code == 0 and "unchanged" in unchanged.stdout
    assert (await depth(amqp, f"{EDIT_QUEUE}.dlq"), await depth(amqp, EDIT_QUEUE)) == (1, 0)

    valid = await invoke(*args, env={"EDITOR": "sed -i 's/\"lots\"/1250/'"})
    assert valid.exit_code == 0, valid.output
    [taken] = await drain(amqp, EDIT_QUEUE)
    assert taken.body == b'{"order_id": "o1", "amount_cents": 1250}'
    assert taken.message_id == "e1" and taken.headers[h.REPLAY_COUNT] == 1
    assert await depth(amqp, f"{EDIT_QUEUE}.dlq") == 0


async def test_purge_needs_yes_and_removes_only_the_selection(
    broker_url: str, queue_name: str, cleanup: list[str], amqp: AbstractConnection
) -> None:
    """Without --yes nothing goes; with it only the filtered messages do."""
    cleanup.extend(await make_dlq(amqp, queue_name))
    await publish(
        amqp,
        f"{queue_name}.dlq",
        [*letters(queue_name, 3), *letters(queue_name, 2, prefix="t", reason="timeout")],
    )
    args = ("dlq", "purge", f"{queue_name}.dlq", "--reason", "timeout", "--url", broker_url)
    preview = await invoke(*args)
    assert preview.exit_code == 0 and "would purge 2 of 5" in preview.stdout
    assert await depth(amqp, f"{queue_name}.dlq") == 5
    purged = await invoke(*args, "--yes")
    assert purged.exit_code == 0 and "purged 2" in purged.stdout
    left = await drain(amqp, f"{queue_name}.dlq")
    assert sorted(t.message_id or "" for t in left) == ["m0", "m1", "m2"]
