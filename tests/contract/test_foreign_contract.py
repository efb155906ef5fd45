"""Messages from producers that are not qworker (publish_raw): no content type, no
message id, odd header values and forged x-qworker-* headers (SPEC section 4: untrusted
input never crashes the worker nor routes a message anywhere the topology does not name)."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from qworker import App, Context
from qworker import headers as hd
from tests.contract.conftest import Run
from tests.contract.helpers import fast, kinds


async def test_a_bare_message_is_handled_and_dead_lettered_as_it_came(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    """No content type, no headers, no properties but the message id aiormq always adds: a
    dict handler takes it (no headers in ctx, attempt 1); a failing one is dead-lettered
    under the same id, body as it was, still without a content type."""
    app = make_app()
    seen: list[tuple[str | None, dict[str, Any], int]] = []

    @app.handler(queue, retry=fast(max_attempts=1))
    async def handle(payload: dict[str, str], ctx: Context) -> None:
        seen.append((ctx.message_id, dict(ctx.headers), ctx.attempt))
        if payload["do"] == "fail":
            raise ConnectionError("no")

    async with run(app) as h:
        await h.publish_raw(queue, b'{"do": "ok"}')
        await h.run_until_idle()
        await h.publish_raw(queue, b'{"do": "fail"}')
        await h.run_until_idle()
        (dl,) = await h.dead_letters(queue)
    assert [(headers, attempt) for _, headers, attempt in seen] == [({}, 1), ({}, 1)]
    assert all(m is not None and re.fullmatch(r"[0-9a-f]{32}", m) for m, _, _ in seen)
    assert dl.message_id == seen[1][0]
    assert dl.reason == "retries_exhausted"
    assert dl.body == b'{"do": "fail"}'
    assert "content_type" not in dl.properties


async def test_forged_attempt_counts_are_sanitised(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    """x-qworker-attempt is trusted only as a non-negative int, clamped to 1,000,000: a
    string, a float, a bool or a negative number count as 0; 2 is trusted; 10**12 is clamped
    and makes the first transient failure final."""
    app = make_app()
    attempts: dict[str, int] = {}

    @app.handler(queue, retry=fast(max_attempts=5))
    async def handle(payload: dict[str, str], ctx: Context) -> None:
        attempts.setdefault(ctx.message_id or "?", ctx.attempt)
        if payload["fail"] == "yes":
            raise ConnectionError("down")

    forged: dict[str, Any] = {
        "string": "7",
        "float": 2.0,
        "bool": True,
        "negative": -5,
        "trusted": 2,
        "huge": 10**12,
    }
    async with run(app) as h:
        for name, value in forged.items():
            await h.publish_raw(
                queue, b'{"fail": "no"}', message_id=name, headers={hd.ATTEMPT: value}
            )
        await h.publish_raw(
            queue, b'{"fail": "yes"}', message_id="huge-failing", headers={hd.ATTEMPT: 10**12}
        )
        await h.run_until_idle()
        assert attempts == {
            "string": 1,
            "float": 1,
            "bool": 1,
            "negative": 1,
            "trusted": 3,
            "huge": 1_000_001,
            "huge-failing": 1_000_001,
        }
        assert kinds(h.outcomes, "huge-failing") == [
            ("dead_lettered", 1_000_001, "retries_exhausted")
        ]
        dl = await h.assert_dead_lettered("huge-failing", queue=queue)
        assert dl.headers[hd.ATTEMPT] == 1_000_001


async def test_forged_failure_headers_do_not_survive_into_the_dead_letter(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    """Garbage history, times, queue, reason and unknown x-qworker-* names from a producer,
    and broker-owned headers: the dead letter has qworker's own values only."""
    app = make_app()

    @app.handler(queue, retry=fast(max_attempts=1))
    async def handle(payload: dict[str, str]) -> None:
        raise ConnectionError("down")

    forged = {
        hd.HISTORY: "not a list",
        hd.FIRST_FAILURE_AT: "yesterday",
        hd.REASON: "poison",
        hd.CLASSIFICATION: "permanent",
        hd.ERROR_TYPE: 12345,
        hd.WORKER: {"host": "elsewhere"},
        hd.REPLAY_COUNT: "lots",
        "x-qworker-made-up": "x" * 5000,
        "x-first-death-reason": "forged",
        "x-last-death-queue": "forged",
        "user": "kept",
    }
    async with run(app) as h:
        await h.publish_raw(queue, b'{"a": "b"}', message_id="m-1", headers=forged)
        await h.run_until_idle()
        dl = await h.assert_dead_lettered("m-1", queue=queue, reason="retries_exhausted")
    headers = dict(dl.headers)
    assert headers["user"] == "kept"
    (entry,) = headers[hd.HISTORY]
    assert entry["attempt"] == 1 and entry["error_type"] == "builtins.ConnectionError"
    assert headers[hd.FIRST_FAILURE_AT] == headers[hd.LAST_FAILURE_AT]
    assert headers[hd.CLASSIFICATION] == "transient"
    assert headers[hd.ERROR_TYPE] == "builtins.ConnectionError"
    assert headers[hd.WORKER] == app.worker_id
    for gone in (
        "x-qworker-made-up",
        hd.REPLAY_COUNT,
        "x-first-death-reason",
        "x-last-death-queue",
    ):
        assert gone not in headers


async def test_header_values_of_every_amqp_type_are_kept_on_copies(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    """A producer's headers of every field type come back identical on the retried
    delivery and on the dead letter."""
    app = make_app()
    stamp = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
    sent: dict[str, Any] = {
        "text": "ünïcode ✓",
        "empty": "",
        "int": -7,
        "long": 2**62,
        "double": 1.5e300,
        "bool": False,
        "void": None,
        "decimal": Decimal("12.345"),
        "when": stamp,
        "bytes": b"\x00\xff",
        "list": [1, "two", [3.0], {"four": 4}],
        "table": {"deep": {"deeper": {"deepest": [True, None]}}},
        "n" * 200: "long name",
    }
    retried: list[dict[str, Any]] = []

    @app.handler(queue, retry=fast(max_attempts=2))
    async def handle(payload: dict[str, str], ctx: Context) -> None:
        if ctx.attempt == 2:
            retried.append(dict(ctx.headers))
        raise ConnectionError("down")

    async with run(app) as h:
        await h.publish_raw(queue, b"{}", message_id="m-1", headers=sent)
        await h.run_until_idle()
        dl = await h.assert_dead_lettered("m-1", queue=queue, reason="retries_exhausted")
    (second,) = retried
    for name, value in sent.items():
        assert (name, second[name]) == (name, value)
        assert (name, dl.headers[name]) == (name, value)
