"""The audit trail on the real broker: one record per action, replay ids, history, MTTR.

The stream ``qworker.audit`` is shared by every test (and run): each test reads only the
records about its own uuid-named DLQs.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aio_pika.abc import AbstractConnection
from pydantic import BaseModel

from qworker import App, Permanent, RetryPolicy, dlq
from qworker import headers as h
from qworker.dlq import audit
from qworker.dlq.audit import AuditRecord
from qworker.testing import running
from tests.support.broker import eventually_depth
from tests.support.dlq import drain, invoke, letters, make_dlq, publish

pytestmark = pytest.mark.rabbitmq


class Order(BaseModel):
    order_id: str


async def trail(connection: AbstractConnection, queue: str) -> list[AuditRecord]:
    since = datetime.now(UTC) - timedelta(minutes=10)
    return [r async for r in audit.read(connection, since=since) if r.dlq == queue]


async def test_replay_appends_one_record_and_copies_carry_its_id(
    queue_name: str, cleanup: list[str], amqp: AbstractConnection
) -> None:
    cleanup.extend(await make_dlq(amqp, queue_name))
    name = f"{queue_name}.dlq"
    await publish(amqp, name, letters(queue_name, 3, error_type="builtins.KeyError"))
    await publish(amqp, name, letters(queue_name, 2, prefix="v", error_type="builtins.ValueError"))
    dry = await dlq.replay(amqp, name, options=dlq.ReplayOptions(dry_run=True))
    assert dry.replay_id is None
    result = await dlq.replay(
        amqp, name, chosen=dlq.Filter(error_type="KeyError"), actor="token:ops-console"
    )
    assert result.replayed == 3 and result.replay_id
    copies = await drain(amqp, queue_name)
    assert {c.headers[h.REPLAY_ID] for c in copies} == {result.replay_id}
    [record] = await trail(amqp, name)  # the dry run wrote nothing
    assert (record.action, record.actor, record.outcome) == ("replay", "token:ops-console", "ok")
    assert record.replay_id == result.replay_id
    assert record.counts == {"replayed": 3, "skipped": 0, "failed": 0}
    assert sorted(record.message_ids) == ["m0", "m1", "m2"]
    assert record.filter == {"error_type": "KeyError"}
    assert len(record.fingerprints) == 1 and set(record.first_failures) == set(record.fingerprints)


async def test_purge_export_remove_and_edit_each_append_one_record(
    queue_name: str, cleanup: list[str], amqp: AbstractConnection, tmp_path: Path
) -> None:
    cleanup.extend(await make_dlq(amqp, queue_name))
    name = f"{queue_name}.dlq"
    await publish(amqp, name, letters(queue_name, 6))
    await dlq.purge(amqp, name, chosen=dlq.Filter(message_id="m0"))
    with (tmp_path / "out.jsonl").open("x") as out:
        await dlq.export(amqp, name, out, limit=2, remove=True)
    with (tmp_path / "copy.jsonl").open("x") as out:
        await dlq.export(amqp, name, out)  # no --remove: no record
    original = await dlq.find(amqp, name, "m3")
    assert original is not None
    await dlq.replace(amqp, original, b'{"n": 33}')
    records = await trail(amqp, name)
    assert [(r.action, r.counts, r.message_ids) for r in records] == [
        ("purge", {"purged": 1}, ["m0"]),
        ("export-remove", {"removed": 2}, ["m1", "m2"]),
        ("edit", {"replayed": 1}, ["m3"]),
    ]
    assert records[0].filter == {"message_id": "m0"}
    assert records[1].options == {"output": str(tmp_path / "out.jsonl")}
    [copy] = await drain(amqp, queue_name)
    assert copy.headers[h.REPLAY_ID] == records[2].replay_id


async def test_replay_from_file_is_recorded_and_history_lists_the_trail(
    queue_name: str, cleanup: list[str], amqp: AbstractConnection, tmp_path: Path
) -> None:
    cleanup.extend(await make_dlq(amqp, queue_name))
    name = f"{queue_name}.dlq"
    await publish(amqp, name, letters(queue_name, 2))
    path = tmp_path / "x.jsonl"
    result = await invoke("dlq", "export", name, "-o", str(path), "--remove")
    assert result.exit_code == 0, result.output
    result = await invoke("dlq", "replay", "--from-file", str(path))
    assert result.exit_code == 0, result.output
    result = await invoke("dlq", "history", "--dlq", name, "--since", "10m", "--json")
    assert result.exit_code == 0, result.output
    listed = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["action"], r["counts"]) for r in listed] == [
        ("export-remove", {"removed": 2}),
        ("replay", {"replayed": 2, "skipped": 0, "failed": 0}),
    ]
    assert listed[1]["source"] == str(path)
    result = await invoke("dlq", "history", "--dlq", name, "--since", "10m")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and "export-remove" in lines[0] and "replay_id=" in lines[1]
    bad = await invoke("dlq", "history", "--since", "yesterday")
    assert bad.exit_code == 2


async def test_audit_failure_keeps_the_action_and_exits_6(
    queue_name: str, cleanup: list[str], amqp: AbstractConnection, monkeypatch: pytest.MonkeyPatch
) -> None:
    cleanup.extend(await make_dlq(amqp, queue_name))
    name = f"{queue_name}.dlq"
    await publish(amqp, name, letters(queue_name, 2))

    async def refused(connection: AbstractConnection, record: AuditRecord) -> None:
        raise PermissionError("ACCESS_REFUSED - write access to queue 'qworker.audit'")

    monkeypatch.setattr(audit, "append", refused)
    with pytest.raises(dlq.AuditFailed) as caught:
        await dlq.purge(amqp, name, chosen=dlq.Filter(message_id="m0"))
    assert caught.value.result.matched == 1
    result = await invoke("dlq", "purge", name, "--yes")
    assert result.exit_code == 6
    assert "purged 1 dead letters" in result.stdout
    assert "audit record was not written" in result.stderr
    assert await drain(amqp, name) == []


async def test_mttr_resolved_by_a_replay_and_open_when_it_comes_back(
    broker_url: str, queue_name: str, cleanup: list[str], amqp: AbstractConnection
) -> None:
    app = App(broker_url)
    fixed: set[str] = set()

    @app.handler(queue_name, retry=RetryPolicy(max_attempts=1))
    async def handle(order: Order) -> None:
        if order.order_id not in fixed:
            raise Permanent(f"broken {order.order_id.rstrip('0123456789')} handling")

    name = f"{queue_name}.dlq"
    cleanup.extend(s.name for s in app.topology())
    async with running(app):
        for i in range(2):
            await app.publish(queue_name, Order(order_id=f"fixable{i}"), message_id=f"f{i}")
        await app.publish(queue_name, Order(order_id="hopeless"), message_id="h0")
        await eventually_depth(amqp, name, 3)
        fixed.update({"fixable0", "fixable1"})
        ok = await dlq.replay(amqp, name, chosen=dlq.Filter(grep="fixable"))
        again = await dlq.replay(amqp, name, chosen=dlq.Filter(message_id="h0"))
        await eventually_depth(amqp, queue_name, 0)
        await eventually_depth(amqp, name, 1)  # h0 died again
    await app.close()
    records = await trail(amqp, name)
    [fixable_fp] = records[0].fingerprints
    [hopeless_fp] = records[1].fingerprints
    assert fixable_fp != hopeless_fp
    await audit.append(
        amqp, AuditRecord("alert", dlq=queue_name, fingerprints=[fixable_fp, hopeless_fp])
    )
    await asyncio.sleep(0.2)
    result = await invoke("dlq", "history", "--mttr", "--dlq", name, "--json")
    assert result.exit_code == 0, result.output
    groups = {g["fingerprint"]: g for g in map(json.loads, result.stdout.splitlines())}
    assert groups[fixable_fp]["state"] == "resolved"
    assert groups[fixable_fp]["resolved_by"] == ok.replay_id
    assert groups[fixable_fp]["mttr_seconds"] >= 0
    assert groups[fixable_fp]["mttd_seconds"] >= 0
    assert groups[hopeless_fp]["state"] == "open"
    assert groups[hopeless_fp]["came_back"] == [again.replay_id]
    table = await invoke("dlq", "history", "--mttr", "--dlq", name)
    assert table.exit_code == 0
    assert any(fixable_fp in line and ok.replay_id in line for line in table.stdout.splitlines())
    assert any(hopeless_fp in line and "open" in line for line in table.stdout.splitlines())
