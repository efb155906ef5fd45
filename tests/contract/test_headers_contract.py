"""Headers on failure copies (SPEC section 4, README "Dead letters carry their story"):
every x-qworker-* header with its real value, user headers and properties kept, caps,
redaction, the broker's death history, frame fitting."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from qworker import App, Context, Permanent
from qworker import headers as hd
from tests.contract.conftest import Run
from tests.contract.helpers import fast

SECRET_TEXTS = (
    "hunter2",
    "s3cr3t-pass",
    "tok_live_abcdef123456",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl",
    "ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789",
)


def _iso_utc(value: Any) -> datetime:
    parsed = datetime.fromisoformat(value)
    assert parsed.utcoffset() is not None and parsed.utcoffset().total_seconds() == 0, value
    return parsed


async def test_a_dead_letter_carries_every_header_and_keeps_the_message(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    """A Permanent error (chained to a KeyError): the dead letter has the original body and
    properties, the producer's headers with their values, no foreign x-qworker-* header,
    no expiration, and every x-qworker-* header with its exact value."""
    app = make_app()

    @app.handler(queue, retry=fast())
    async def refuse(payload: dict[str, Any]) -> None:
        try:
            raise KeyError("customer 42")
        except KeyError as exc:
            raise Permanent("unknown customer") from exc

    body = b'{"order_id": "o-2", "amount_cents": 7}'
    sent_at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    user_headers = {
        "tenant": "acme",
        "count": 42,
        "big": 2**40,
        "ratio": 0.25,
        "flag": True,
        "raw": b"\x00\x01bytes",
        "tags": ["a", 1, False],
        "nested": {"k": "v", "n": 7},
    }
    async with run(app) as h:
        await h.publish_raw(
            queue,
            body,
            content_type="application/json",
            message_id="m-2",
            correlation_id="c-2",
            app_id="shop",
            type="OrderPlaced",
            priority=3,
            reply_to="replies",
            timestamp=sent_at,
            expiration=60,
            headers={**user_headers, "x-qworker-bogus": "x" * 1000, "x-qworker-attempt": 0},
        )
        await h.run_until_idle()
        dl = await h.assert_dead_lettered("m-2", queue=queue, reason="permanent_error")
    assert dl.body == body
    props = dl.properties
    assert props["content_type"] == "application/json"
    assert props["correlation_id"] == "c-2"
    assert props["app_id"] == "shop"
    assert props["type"] == "OrderPlaced"
    assert props["priority"] == 3
    assert props["reply_to"] == "replies"
    assert props["timestamp"] == sent_at
    assert "expiration" not in props  # a dead letter must not expire in the DLQ
    headers = dict(dl.headers)
    for name, value in user_headers.items():
        assert (name, headers[name]) == (name, value)
    assert "x-qworker-bogus" not in headers
    assert "x-death" not in headers
    assert headers[hd.ATTEMPT] == 1
    assert headers[hd.REASON] == "permanent_error"
    assert headers[hd.CLASSIFICATION] == "permanent"
    assert headers[hd.ERROR_TYPE] == "qworker.errors.Permanent"
    assert headers[hd.ERROR_MESSAGE] == "unknown customer"
    traceback = headers[hd.ERROR_TRACEBACK]
    assert "KeyError: 'customer 42'" in traceback  # the chained cause
    assert "The above exception was the direct cause" in traceback
    assert traceback.rstrip().endswith("qworker.errors.Permanent: unknown customer")
    assert headers[hd.QUEUE] == queue
    assert headers[hd.HANDLER] == (
        f"{__name__}:test_a_dead_letter_carries_every_header_and_keeps_the_message.<locals>.refuse"
    )
    assert headers[hd.ORIGINAL_EXCHANGE] == ""
    assert headers[hd.ORIGINAL_ROUTING_KEY] == queue
    assert headers[hd.WORKER] == app.worker_id
    first = _iso_utc(headers[hd.FIRST_FAILURE_AT])
    assert first == _iso_utc(headers[hd.LAST_FAILURE_AT])
    (entry,) = headers[hd.HISTORY]
    assert entry["attempt"] == 1
    assert entry["error_type"] == "qworker.errors.Permanent"
    assert entry["error_message"] == "unknown customer"
    assert _iso_utc(entry["at"]) == first
    assert re.fullmatch(r"[0-9a-f]{12}", headers[hd.FINGERPRINT])
    assert dl.fingerprint == headers[hd.FINGERPRINT]
    assert (dl.handler, dl.attempt, dl.replay_count, dl.from_broker) == (
        headers[hd.HANDLER],
        1,
        0,
        False,
    )
    for absent in (hd.ERROR_CODE, hd.RUNBOOK, hd.REPLAY_COUNT, hd.REPLAY_ID, hd.CRASHES):
        assert absent not in headers


async def test_a_retried_copy_tells_the_next_attempt_what_failed(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    """The second attempt sees the first failure in its headers (attempt 1, transient, no
    reason), and the dead letter keeps the first failure time and both history entries."""
    app = make_app()
    seen: list[dict[str, Any]] = []

    @app.handler(queue, retry=fast(max_attempts=2))
    async def handle(payload: dict[str, int], ctx: Context) -> None:
        seen.append(dict(ctx.headers))
        raise ConnectionError(f"refused {ctx.attempt}")

    async with run(app) as h:
        await h.publish(queue, {"n": 1}, message_id="m-1", headers={"tenant": "acme"})
        await h.run_until_idle()
        dl = await h.assert_dead_lettered("m-1", queue=queue, reason="retries_exhausted")
    first, second = seen
    assert not any(k.startswith("x-qworker-") for k in first)
    assert second["tenant"] == "acme"
    assert second[hd.ATTEMPT] == 1
    assert second[hd.CLASSIFICATION] == "transient"
    assert second[hd.ERROR_TYPE] == "builtins.ConnectionError"
    assert second[hd.ERROR_MESSAGE] == "refused 1"
    assert hd.REASON not in second
    assert second[hd.QUEUE] == queue
    assert dl.headers[hd.FIRST_FAILURE_AT] == second[hd.FIRST_FAILURE_AT]
    assert dl.headers[hd.LAST_FAILURE_AT] >= second[hd.LAST_FAILURE_AT]
    assert [(e["attempt"], e["error_message"]) for e in dl.headers[hd.HISTORY]] == [
        (1, "refused 1"),
        (2, "refused 2"),
    ]
    assert dl.headers["tenant"] == "acme"


async def test_the_brokers_death_history_is_kept_readable_never_as_x_death(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    """Each retry expires out of its tier (the broker's x-death, reason expired); the next
    attempt sees that x-death, and the dead letter carries the whole history in
    x-qworker-deaths (newest first, one entry per tier) and no x-death."""
    app = make_app()
    deaths_seen: list[list[tuple[str, str, int]]] = []

    @app.handler(queue, retry=fast(max_attempts=3))
    async def handle(payload: dict[str, int], ctx: Context) -> None:
        deaths_seen.append(
            [(d["queue"], d["reason"], d["count"]) for d in ctx.headers.get("x-death", [])]
        )
        raise ConnectionError("down")

    async with run(app) as h:
        await h.publish(queue, {"n": 1}, message_id="m-1")
        await h.run_until_idle()
        dl = await h.assert_dead_lettered("m-1", queue=queue, reason="retries_exhausted")
    assert deaths_seen == [
        [],
        [(f"{queue}.retry.50ms", "expired", 1)],
        [(f"{queue}.retry.100ms", "expired", 1)],
    ]
    assert "x-death" not in dl.headers
    assert [(d["queue"], d["reason"], d["count"]) for d in dl.headers[hd.DEATHS]] == [
        (f"{queue}.retry.100ms", "expired", 1),
        (f"{queue}.retry.50ms", "expired", 1),
    ]


async def test_the_same_tier_twice_counts_two_deaths(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    """multiplier 1: three retries through the one 50ms tier; x-qworker-deaths has one
    entry for it with count 3."""
    app = make_app()

    @app.handler(queue, retry=fast(max_attempts=4, multiplier=1.0))
    async def handle(payload: dict[str, int]) -> None:
        raise ConnectionError("down")

    async with run(app) as h:
        await h.publish(queue, {"n": 1}, message_id="m-1")
        await h.run_until_idle()
        dl = await h.assert_dead_lettered("m-1", queue=queue, reason="retries_exhausted")
    assert [(d["queue"], d["reason"], d["count"]) for d in dl.headers[hd.DEATHS]] == [
        (f"{queue}.retry.50ms", "expired", 3),
    ]


async def test_long_error_messages_and_tracebacks_are_capped(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    """A 20,000-character message: x-qworker-error-message keeps its first 2 KiB, the
    traceback its last 16 KiB, the history entry 512 bytes, each marked as cut."""
    app = make_app()
    text = "start " + "y" * 20_000 + " end"

    @app.handler(queue, retry=fast())
    async def handle(payload: dict[str, int]) -> None:
        raise Permanent(text)

    async with run(app) as h:
        await h.publish(queue, {"n": 1}, message_id="m-1")
        await h.run_until_idle()
        dl = await h.assert_dead_lettered("m-1", queue=queue, reason="permanent_error")
        (outcome,) = h.outcomes
    message = dl.headers[hd.ERROR_MESSAGE]
    assert len(message.encode()) == 2048
    assert message.startswith("start yyy") and message.endswith("...[truncated]")
    traceback = dl.headers[hd.ERROR_TRACEBACK]
    assert len(traceback.encode()) == 16 * 1024
    assert traceback.startswith("...[truncated]") and traceback.rstrip().endswith("y end")
    (entry,) = dl.headers[hd.HISTORY]
    assert len(entry["error_message"].encode()) == 512
    assert outcome.error_message == message
    total = sum(
        len(k) + len(str(v).encode()) for k, v in dl.headers.items() if k.startswith("x-qworker-")
    )
    assert total < 64 * 1024


async def test_secrets_are_redacted_everywhere_they_are_written(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    """Credentials in URLs, bearer tokens, password= and api_key= values, JWTs and GitHub
    tokens are masked in the error message, traceback, history and the outcome."""
    app = make_app()
    message = (
        "cannot reach postgres://app:hunter2@db.internal/orders "
        "password=s3cr3t-pass api_key=tok_live_abcdef123456 "
        "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl "
        "token ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789"
    )

    @app.handler(queue, retry=fast(max_attempts=2))
    async def handle(payload: dict[str, int]) -> None:
        raise ConnectionError(message)

    async with run(app) as h:
        await h.publish(queue, {"n": 1}, message_id="m-1")
        await h.run_until_idle()
        dl = await h.assert_dead_lettered("m-1", queue=queue, reason="retries_exhausted")
        outcomes = list(h.outcomes)
    written = [
        dl.headers[hd.ERROR_MESSAGE],
        dl.headers[hd.ERROR_TRACEBACK],
        *(e["error_message"] for e in dl.headers[hd.HISTORY]),
        *(o.error_message or "" for o in outcomes),
    ]
    assert len(outcomes) == 2
    for text in written:
        for secret in SECRET_TEXTS:
            assert secret not in text, (secret, text)
        assert "db.internal/orders" in text  # the rest of the message stays readable
    assert "***" in dl.headers[hd.ERROR_MESSAGE]


async def test_the_history_keeps_the_last_ten_failures(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    """Twelve failed attempts (immediate retries, so only two delayed ones): the history
    keeps attempts 3 to 12, x-qworker-attempt says 12."""
    app = make_app()

    @app.handler(queue, retry=fast(max_attempts=12, immediate=3))
    async def handle(payload: dict[str, int], ctx: Context) -> None:
        raise ConnectionError(f"attempt {ctx.attempt}")

    async with run(app) as h:
        await h.publish(queue, {"n": 1}, message_id="m-1")
        await h.run_until_idle()
        dl = await h.assert_dead_lettered("m-1", queue=queue, reason="retries_exhausted")
    assert dl.headers[hd.ATTEMPT] == 12
    history = dl.headers[hd.HISTORY]
    assert [e["attempt"] for e in history] == list(range(3, 13))
    assert [e["error_message"] for e in history] == [f"attempt {n}" for n in range(3, 13)]


async def test_user_headers_give_way_so_that_the_copy_fits_the_frame(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    """A 120,000-byte user header plus a 16 KiB traceback do not fit the 128 KiB frame:
    the large header is dropped (named, with its size, in x-qworker-dropped-headers), the
    small one kept, and the dead letter is written."""
    app = make_app()
    chain = "z" * 6000

    @app.handler(queue, retry=fast())
    async def handle(payload: dict[str, int]) -> None:
        try:
            try:
                raise ValueError("first " + chain)
            except ValueError as exc:
                raise LookupError("second " + chain) from exc
        except LookupError as exc:
            raise Permanent("third " + chain) from exc

    async with run(app) as h:
        await h.publish(
            queue, {"n": 1}, message_id="m-1", headers={"blob": "b" * 120_000, "small": "kept"}
        )
        await h.run_until_idle()
        dl = await h.assert_dead_lettered("m-1", queue=queue, reason="permanent_error")
    assert "blob" not in dl.headers
    assert dl.headers["small"] == "kept"
    (dropped,) = dl.headers[hd.DROPPED_HEADERS]
    assert re.fullmatch(r"blob \(\d+ bytes\)", dropped), dropped
    assert int(dropped.split("(")[1].split()[0]) >= 120_000
    assert len(dl.headers[hd.ERROR_TRACEBACK].encode()) == 16 * 1024
