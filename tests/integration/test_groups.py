"""Failure groups on the real broker: a worker dead-letters failures with error codes and
runbooks; ``qworker dlq`` groups them by the fingerprint the worker wrote and acts on one
group with ``--fingerprint``."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from aio_pika.abc import AbstractConnection

from qworker import App, Permanent
from qworker import headers as h
from qworker.testing import running
from tests.support.broker import depth, eventually_depth
from tests.support.dlq import broker_dead_letters, drain, invoke, make_dlq

pytestmark = pytest.mark.rabbitmq

APP_RUNBOOK = "https://runbooks.example/customer-unknown"
HANDLER_RUNBOOK = "https://runbooks.example/refunds"
#: Messages per kind of failure in the main queue: code -> count.
KINDS = {"CUSTOMER_UNKNOWN": 4, "CARD_DECLINED": 3, None: 2}


@dataclass
class Dead:
    """What the worker dead-lettered: the DLQs and the ids of each kind."""

    dlq: str
    refunds_dlq: str
    ids: dict[str | None, set[str]]


@pytest.fixture
async def dead(
    broker_url: str, queue_name: str, cleanup: list[str], amqp: AbstractConnection
) -> AsyncIterator[Dead]:
    """A real worker dead-letters three kinds of failure (and one more in a second queue)."""
    refunds = f"{queue_name}.refunds"
    app = App(broker_url, name="groups", runbooks={"CUSTOMER_UNKNOWN": APP_RUNBOOK})

    @app.handler(queue_name, permanent=(ValueError,), queue_type="classic")
    async def charge(payload: dict[str, Any]) -> None:
        if payload["code"] == "CUSTOMER_UNKNOWN":
            # A different generated id every time: still one group.
            raise Permanent(
                f"customer cus_{payload['n']}Q{payload['salt']} not found", code="CUSTOMER_UNKNOWN"
            )
        if payload["code"] == "CARD_DECLINED":
            raise Permanent(f"card ending {4000 + payload['n']} declined", code="CARD_DECLINED")
        raise ValueError(f"amount {payload['n']} is negative")

    @app.handler(refunds, runbook=HANDLER_RUNBOOK, queue_type="classic")
    async def refund(payload: dict[str, Any]) -> None:
        raise Permanent("refund window closed", code="CUSTOMER_UNKNOWN")

    cleanup.extend(s.name for s in app.topology())
    ids: dict[str | None, set[str]] = {code: set() for code in KINDS}
    async with running(app):
        for code, count in KINDS.items():
            for n in range(count):
                message_id = f"{code or 'plain'}-{n}"
                ids[code].add(message_id)
                payload = {"code": code, "n": n, "salt": uuid.uuid4().hex[:8]}
                await app.publish(queue_name, payload, message_id=message_id)
        await app.publish(refunds, {"n": 1}, message_id="refund-1")
        await eventually_depth(amqp, f"{queue_name}.dlq", sum(KINDS.values()))
        await eventually_depth(amqp, f"{refunds}.dlq", 1)
    yield Dead(f"{queue_name}.dlq", f"{refunds}.dlq", ids)


async def cli(*args: str, url: str) -> list[str]:
    """``qworker dlq ARGS``, which must succeed; its stdout lines."""
    result = await invoke("dlq", *args, "--url", url)
    assert result.exit_code == 0, result.output
    return result.stdout.splitlines()


async def json_lines(*args: str, url: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in await cli(*args, url=url)]


async def test_stats_groups_are_the_fingerprints_the_worker_wrote(
    broker_url: str, amqp: AbstractConnection, dead: Dead
) -> None:
    """``dlq stats --json``: one group per kind, with its error code and runbook, and the
    group's fingerprint is the ``x-qworker-fingerprint`` of each of its messages."""
    groups = await json_lines("stats", dead.dlq, "--json", url=broker_url)
    by_code = {g["error_code"]: g for g in groups}
    assert {code: g["count"] for code, g in by_code.items()} == KINDS
    assert by_code["CUSTOMER_UNKNOWN"]["runbook"] == APP_RUNBOOK
    assert by_code["CARD_DECLINED"]["runbook"] is None
    assert by_code[None]["runbook"] is None
    assert by_code[None]["error_type"] == "builtins.ValueError"
    assert by_code["CUSTOMER_UNKNOWN"]["pattern"] == "customer cus_<id> not found"
    (refunds,) = await json_lines("stats", dead.refunds_dlq, "--json", url=broker_url)
    assert (refunds["error_code"], refunds["runbook"]) == ("CUSTOMER_UNKNOWN", HANDLER_RUNBOOK)

    table = "\n".join(await cli("stats", dead.dlq, url=broker_url))
    assert "ERROR CODE" in table and "CARD_DECLINED" in table
    assert f"runbook: {APP_RUNBOOK}" in table

    # Checked independently of the tool: the headers on the broker.
    taken = await drain(amqp, dead.dlq)
    assert len(taken) == sum(KINDS.values())
    for message in taken:
        code = message.headers.get(h.ERROR_CODE)
        assert message.message_id in dead.ids[code]
        assert message.headers[h.FINGERPRINT] == by_code[code]["fingerprint"]
        assert (message.headers.get(h.RUNBOOK)) == by_code[code]["runbook"]
    (refund,) = await drain(amqp, dead.refunds_dlq)
    assert refund.headers[h.FINGERPRINT] == refunds["fingerprint"]
    assert refund.headers[h.RUNBOOK] == HANDLER_RUNBOOK


async def test_fingerprint_prefix_selects_exactly_one_group_in_every_command(
    broker_url: str, amqp: AbstractConnection, dead: Dead
) -> None:
    groups = await json_lines("stats", dead.dlq, "--json", url=broker_url)
    group = next(g for g in groups if g["error_code"] == "CUSTOMER_UNKNOWN")
    wanted = dead.ids["CUSTOMER_UNKNOWN"]
    prefix = group["fingerprint"][:6]
    total = sum(KINDS.values())

    (only,) = await json_lines(
        "stats", dead.dlq, "--json", "--fingerprint", prefix.upper(), url=broker_url
    )
    assert (only["fingerprint"], only["count"]) == (group["fingerprint"], len(wanted))

    shown = await json_lines("show", dead.dlq, "--json", "--fingerprint", prefix, url=broker_url)
    assert {r["message_id"] for r in shown} == wanted
    for record in shown:
        assert record["fingerprint"] == group["fingerprint"]
        assert record["fingerprint"] == record["headers"][h.FINGERPRINT]
        assert (record["error_code"], record["runbook"]) == ("CUSTOMER_UNKNOWN", APP_RUNBOOK)

    table = await cli("show", dead.dlq, "--fingerprint", prefix, url=broker_url)
    assert table[0].split()[:5] == ["ID", "AGE", "REASON", "ERROR", "TYPE"] and "CODE" in table[0]
    assert sum("CUSTOMER_UNKNOWN" in line for line in table) >= len(wanted)
    assert f"  {APP_RUNBOOK}  ({len(wanted)} shown; CUSTOMER_UNKNOWN)" in table

    exported = await json_lines("export", dead.dlq, "--fingerprint", prefix, url=broker_url)
    assert {r["message_id"] for r in exported} == wanted

    by_code = await json_lines(
        "show", dead.dlq, "--json", "--error-code", "CARD_DECLINED", url=broker_url
    )
    assert {r["message_id"] for r in by_code} == dead.ids["CARD_DECLINED"]

    dry = await cli("replay", dead.dlq, "--dry-run", "--fingerprint", prefix, url=broker_url)
    planned = {line.split()[2] for line in dry if line.startswith("would replay ")}
    assert planned == wanted
    assert f"would replay {len(wanted)}, would skip 0" in dry[-1]

    preview = await cli("purge", dead.dlq, "--fingerprint", prefix, url=broker_url)
    assert preview[0] == f"would purge {len(wanted)} of {total} dead letters in {dead.dlq}:"
    assert preview[-1] == "nothing changed; add --yes to purge"
    assert await depth(amqp, dead.dlq) == total  # nothing removed by any of the above

    purged = await cli("purge", dead.dlq, "--fingerprint", prefix, "--yes", url=broker_url)
    assert purged == [f"purged {len(wanted)} dead letters from {dead.dlq}"]
    left = await drain(amqp, dead.dlq)
    assert {m.message_id for m in left} == dead.ids["CARD_DECLINED"] | dead.ids[None]


@pytest.mark.parametrize("command", ["show", "stats", "export", "replay", "purge"])
@pytest.mark.parametrize("value", ["abc12", "", "xyzxyz", "0123456789abcd"])
async def test_a_bad_fingerprint_is_a_one_line_usage_error(
    broker_url: str,
    queue_name: str,
    cleanup: list[str],
    amqp: AbstractConnection,
    command: str,
    value: str,
) -> None:
    cleanup.extend(await make_dlq(amqp, queue_name, "classic"))
    result = await invoke(
        "dlq", command, f"{queue_name}.dlq", "--fingerprint", value, "--url", broker_url
    )
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1, result.stderr
    assert "--fingerprint" in result.stderr and "at least 6" in result.stderr


async def test_broker_dead_letters_get_a_group_that_fingerprint_selects(
    broker_url: str, queue_name: str, cleanup: list[str], amqp: AbstractConnection
) -> None:
    """No qworker headers (RabbitMQ's delivery limit): the group id is computed, and
    ``--fingerprint`` selects it like any other."""
    cleanup.extend(await make_dlq(amqp, queue_name, "quorum", delivery_limit=1))
    await broker_dead_letters(amqp, queue_name, ["b1", "b2"])
    (group,) = await json_lines("stats", f"{queue_name}.dlq", "--json", url=broker_url)
    assert (group["count"], group["reason"], group["error_code"]) == (2, "delivery_limit", None)
    shown = await json_lines(
        "show",
        f"{queue_name}.dlq",
        "--json",
        "--fingerprint",
        group["fingerprint"][:7],
        url=broker_url,
    )
    assert {r["message_id"] for r in shown} == {"b1", "b2"}
    assert {r["fingerprint"] for r in shown} == {group["fingerprint"]}
