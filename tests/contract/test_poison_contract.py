"""Deliveries without an outcome (README "Poison messages"): a delivery the broker gives
out again is quarantined (x-qworker-crashes) and runs alone; at max_deliveries it is
dead-lettered as poison without running again. "The worker died" is its connection being
aborted while handlers run (the ``crash`` fixture); one crash serves both handlers, since
every reconnect costs the worker's back-off (about half a second)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from qworker import App, Context
from qworker import headers as hd
from tests.contract.conftest import Crash, Run
from tests.contract.helpers import fast, kinds


async def test_deliveries_that_came_back_are_quarantined_or_condemned_as_poison(
    make_app: Callable[..., App], run: Run, crash: Crash, queue: str
) -> None:
    """The worker dies while both handlers run a message. The one of a handler with the
    default max_deliveries comes back, goes through the quarantine with x-qworker-crashes 1
    and is handled there at attempt 1. The one of a handler with max_deliveries=1 is
    dead-lettered as poison (PoisonMessage, critical, full context) without a second run.
    A message published after the crash is handled normally."""
    app = make_app()
    entered = {"survivor": asyncio.Event(), "poison": asyncio.Event()}
    runs: list[tuple[str, int, int]] = []

    async def record(ctx: Context) -> None:
        crashes = hd.read_int(ctx.headers, hd.CRASHES)
        runs.append((ctx.message_id or "?", ctx.attempt, crashes))
        if ctx.message_id in entered and crashes == 0:
            entered[ctx.message_id].set()
            await asyncio.sleep(0.2)  # the worker "dies" meanwhile: this ack is lost

    @app.handler(queue, retry=fast())
    async def survive(payload: dict[str, int], ctx: Context) -> None:
        await record(ctx)

    @app.handler(f"{queue}.p", retry=fast(), max_deliveries=1)
    async def kill(payload: dict[str, int], ctx: Context) -> None:
        await record(ctx)

    async with run(app) as h:
        await h.publish(queue, {"n": 1}, message_id="survivor")
        await h.publish(f"{queue}.p", {"n": 1}, message_id="poison", headers={"tenant": "t"})
        for event in entered.values():
            await asyncio.wait_for(event.wait(), 10)
        await crash(h)
        await h.publish(queue, {"n": 2}, message_id="after")
        await h.run_until_idle()
        assert sorted(runs) == [
            ("after", 1, 0),
            ("poison", 1, 0),
            ("survivor", 1, 0),
            ("survivor", 1, 1),
        ]
        assert kinds(h.outcomes, "survivor") == [("succeeded", 1, None)]
        assert kinds(h.outcomes, "after") == [("succeeded", 1, None)]
        assert kinds(h.outcomes, "poison") == [("dead_lettered", 1, "poison")]
        (outcome,) = [o for o in h.outcomes if o.message_id == "poison"]
        assert (outcome.severity, outcome.error_type) == (
            "critical",
            "qworker.errors.PoisonMessage",
        )
        assert await h.dead_letters(queue) == []
        dl = await h.assert_dead_lettered("poison", queue=f"{queue}.p", reason="poison")
    assert dl.error_type == "qworker.errors.PoisonMessage"
    assert dl.error_message.startswith("delivered 1 times without an outcome (max_deliveries=1)")
    assert dl.attempt == 1
    assert dl.headers[hd.CLASSIFICATION] == "permanent"
    assert dl.headers["tenant"] == "t"
    assert dl.headers[hd.QUEUE] == f"{queue}.p"
    assert dl.headers[hd.HANDLER].endswith(".<locals>.kill")
