"""Replay (SPEC section 6, README "Operating dead letters"): a dead letter replayed to its
origin queue with the failure headers reset and the replay counted; filters; canaries."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from typing import Any

from qworker import App, Context, Permanent
from qworker import headers as hd
from qworker.dlq import Canary, Filter, ReplayOptions
from tests.contract.conftest import Run
from tests.contract.helpers import fast, kinds


async def test_a_replayed_dead_letter_is_handled_with_its_replay_headers(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    """Dead-lettered (permanent), fixed, replayed: the handler sees attempt 1, the same
    ids, body and user headers, no failure headers, the origin headers, replay count 1, the
    replay's id and time; the DLQ is empty afterwards."""
    app = make_app()
    fixed = False
    seen: list[tuple[int, str | None, str | None, dict[str, Any], dict[str, Any]]] = []

    @app.handler(queue, retry=fast())
    async def handle(payload: dict[str, Any], ctx: Context) -> None:
        seen.append((ctx.attempt, ctx.message_id, ctx.correlation_id, payload, dict(ctx.headers)))
        if not fixed:
            raise Permanent("customer unknown")

    async with run(app) as h:
        await h.publish(
            queue, {"order": 7}, message_id="m-1", correlation_id="c-1", headers={"tenant": "t"}
        )
        await h.run_until_idle()
        await h.assert_dead_lettered("m-1", queue=queue, reason="permanent_error")
        fixed = True
        result = await h.replay(queue)
        assert (result.replayed, result.skipped, result.failed) == (1, 0, 0)
        assert result.replay_id is not None
        await h.run_until_idle()
        assert kinds(h.outcomes, "m-1") == [
            ("dead_lettered", 1, "permanent_error"),
            ("succeeded", 1, None),
        ]
        assert await h.dead_letters(queue) == []
    attempt, message_id, correlation_id, payload, headers = seen[1]
    assert (attempt, message_id, correlation_id, payload) == (1, "m-1", "c-1", {"order": 7})
    assert headers["tenant"] == "t"
    assert headers[hd.REPLAY_COUNT] == 1
    assert headers[hd.REPLAY_ID] == result.replay_id
    assert datetime.fromisoformat(headers[hd.REPLAYED_AT]).utcoffset() is not None
    assert headers[hd.QUEUE] == queue
    assert headers[hd.HANDLER].endswith(".<locals>.handle")
    assert headers[hd.ORIGINAL_ROUTING_KEY] == queue
    for reset in hd.FAILURE_HEADERS:
        assert reset not in headers, reset


async def test_a_replay_that_fails_again_counts_its_replays(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    """Replayed twice and dead twice more: the dead letters say replay count 1 then 2, carry
    the id of the replay that sent them, and start counting attempts from 1 again."""
    app = make_app()

    @app.handler(queue, retry=fast(max_attempts=2))
    async def handle(payload: dict[str, int], ctx: Context) -> None:
        raise ConnectionError(f"still down (attempt {ctx.attempt})")

    async with run(app) as h:
        await h.publish(queue, {"n": 1}, message_id="m-1")
        await h.run_until_idle()
        first = await h.assert_dead_lettered("m-1", queue=queue, reason="retries_exhausted")
        assert first.replay_count == 0 and hd.REPLAY_ID not in first.headers
        ids = []
        for count in (1, 2):
            result = await h.replay(queue)
            assert result.replayed == 1
            ids.append(result.replay_id)
            await h.run_until_idle()
            dl = await h.assert_dead_lettered("m-1", queue=queue, reason="retries_exhausted")
            assert dl.replay_count == count
            assert dl.headers[hd.REPLAY_COUNT] == count
            assert dl.headers[hd.REPLAY_ID] == result.replay_id
            assert dl.attempt == 2
            assert [e["attempt"] for e in dl.headers[hd.HISTORY]] == [1, 2]
        assert len(set(ids)) == 2
        assert len(await h.dead_letters(queue)) == 1
        assert [o.attempt for o in h.outcomes if o.message_id == "m-1"] == [1, 2, 1, 2, 1, 2]


async def test_a_filtered_replay_moves_only_what_it_selects(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    """Filter(error_type="KeyError") replays the two KeyError dead letters; the ValueError
    one and the decode error stay in the DLQ, untouched."""
    app = make_app()
    replayed: list[str] = []

    @app.handler(queue, retry=fast(), permanent=(LookupError, ValueError))
    async def handle(payload: dict[str, str], ctx: Context) -> None:
        if ctx.headers.get(hd.REPLAY_COUNT):
            replayed.append(ctx.message_id or "?")
            return
        if payload["error"] == "key":
            raise KeyError("missing")
        raise ValueError("bad")

    async with run(app) as h:
        await h.publish(queue, {"error": "key"}, message_id="k-1")
        await h.publish(queue, {"error": "value"}, message_id="v-1")
        await h.publish(queue, {"error": "key"}, message_id="k-2")
        await h.publish_raw(queue, b"not json", message_id="d-1")
        await h.run_until_idle()
        assert len(await h.dead_letters(queue)) == 4
        result = await h.replay(queue, chosen=Filter(error_type="KeyError"))
        assert result.replayed == 2
        await h.run_until_idle()
        assert sorted(replayed) == ["k-1", "k-2"]
        left = await h.dead_letters(queue)
        assert sorted((dl.message_id, dl.reason, dl.replay_count) for dl in left) == [
            ("d-1", "decode_error", 0),
            ("v-1", "permanent_error", 0),
        ]
        assert [
            dl.message_id for dl in await h.dead_letters(queue, Filter(reason="decode_error"))
        ] == ["d-1"]


async def test_replay_goes_to_the_dlqs_own_queue_never_where_a_header_says(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    """Messages put into the DLQ by someone else: one without qworker headers is replayed to
    the DLQ's origin queue and handled; one whose x-qworker-queue names another queue is
    skipped and stays."""
    app = make_app()
    handled: list[str] = []

    @app.handler(queue, retry=fast())
    async def handle(payload: dict[str, str], ctx: Context) -> None:
        handled.append(ctx.message_id or "?")

    async with run(app) as h:
        await h.publish_raw(f"{queue}.dlq", b'{"a": "b"}', message_id="plain")
        await h.publish_raw(
            f"{queue}.dlq",
            b'{"a": "b"}',
            message_id="forged",
            headers={hd.QUEUE: f"{queue}.elsewhere", hd.REASON: "permanent_error"},
        )
        result = await h.replay(queue)
        assert (result.replayed, result.skipped) == (1, 1)
        await h.run_until_idle()
        assert handled == ["plain"]
        (left,) = await h.dead_letters(queue)
        assert left.message_id == "forged"
        assert left.replay_count == 0


async def test_a_canary_that_is_handled_lets_the_rest_be_replayed(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    app = make_app()
    fixed = False
    handled: list[str] = []

    @app.handler(queue, retry=fast())
    async def handle(payload: dict[str, int], ctx: Context) -> None:
        if not fixed:
            raise Permanent("bug")
        handled.append(ctx.message_id or "?")

    async with run(app) as h:
        for n in range(3):
            await h.publish(queue, {"n": n}, message_id=f"m-{n}")
        await h.run_until_idle()
        assert len(await h.dead_letters(queue)) == 3
        fixed = True
        options = ReplayOptions(canary=1, canary_wait=0.1, canary_timeout=10)
        result = await h.replay(queue, options=options)
        assert result.canary is Canary.PASSED
        assert result.replayed == 3
        await h.run_until_idle()
        assert sorted(handled) == ["m-0", "m-1", "m-2"]
        assert await h.dead_letters(queue) == []


async def test_a_canary_that_dies_again_stops_the_replay(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    """The bug is not fixed: the canary is dead-lettered again, the replay stops, the other
    dead letters stay where they were (never replayed)."""
    app = make_app()

    @app.handler(queue, retry=fast())
    async def handle(payload: dict[str, int]) -> None:
        raise Permanent("still broken")

    async with run(app) as h:
        for n in range(3):
            await h.publish(queue, {"n": n}, message_id=f"m-{n}")
        await h.run_until_idle()
        options = ReplayOptions(canary=1, canary_wait=0.1, canary_timeout=10)
        result = await h.replay(queue, options=options)
        assert result.canary is Canary.DIED
        assert result.replayed == 1
        (canary,) = result.dead_canaries
        assert re.fullmatch(r"m-[0-2]", canary)
        assert result.outcome == f"canary-failed: {canary} dead-lettered again"
        await h.run_until_idle()
        left = {dl.message_id: dl.replay_count for dl in await h.dead_letters(queue)}
        assert left == {f"m-{n}": 1 if f"m-{n}" == canary else 0 for n in range(3)}
