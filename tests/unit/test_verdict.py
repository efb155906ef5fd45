"""The verdict (qworker.verdict.judge) and frame fitting (headers.fit_frame): pure, table-driven.

Classification x attempt x fallback x breaker route -> Ack / Return / Move(target, ttl).
"""

from __future__ import annotations

from typing import Any

import pytest
from pamqp.commands import Basic

from qworker import headers as h
from qworker.breaker import CircuitBreaker
from qworker.classify import Classification, Decision, classify, decide
from qworker.errors import DecodeError, HandlerTimeout, Permanent, Retry, Transient
from qworker.events import OutcomeKind
from qworker.handler import Handler, build_handler, options
from qworker.publish import _header_frame_size
from qworker.retry import RetryPolicy
from qworker.verdict import (
    RETURNED_CIRCUIT_OPEN,
    Ack,
    Fallback,
    Move,
    Return,
    Route,
    Run,
    judge,
    wants_fallback,
)

QUEUE = "orders"
ORIGIN = h.Origin(queue=QUEUE, handler="m:f", exchange="", routing_key=QUEUE, worker="w:1")


async def _handle(payload: dict[str, Any]) -> None:
    """A handler for the options below."""


async def _fallback(payload: dict[str, Any]) -> None:
    """A fallback."""


def _handler(*, fallback: bool = False, max_attempts: int = 3, jitter: float = 0.0) -> Handler:
    chosen = options(
        retry=RetryPolicy(max_attempts=max_attempts, initial_delay=2.0, jitter=jitter),
        timeout=30.0,
        fallback=_fallback if fallback else None,
        breaker=CircuitBreaker(),
    )
    return build_handler(_handle, QUEUE, chosen)


def _run(exc: Exception | None, attempt: int, handler: Handler, **kw: Any) -> Run:
    decision: Decision | None = None
    if exc is not None:
        classification = classify(exc, default=Classification.TRANSIENT)
        decision = decide(exc, classification, attempt, handler.options.retry.max_attempts)
    return Run(attempt, exc, 0.01, decision, **kw)


# (error, attempt, fallback configured, fallback result, route) -> expected verdict shape
CASES = [
    # success, on every route that runs the handler
    (None, 1, False, Fallback.NOT_RUN, Route.PRIMARY, ("ack", "message.succeeded")),
    (None, 2, True, Fallback.NOT_RUN, Route.PROBE, ("ack", "message.succeeded")),
    # breaker open, no fallback: returned untouched, uncounted
    (None, 1, False, Fallback.NOT_RUN, Route.RETURN, ("return", False)),
    # breaker open, fallback served it
    (None, 1, True, Fallback.SERVED, Route.FALLBACK, ("ack", "message.fallback_served")),
    # breaker open, fallback failed transiently: retried like a handler failure
    (
        ConnectionError("down"),
        1,
        True,
        Fallback.FAILED,
        Route.FALLBACK,
        ("move", "orders.retry.2s", OutcomeKind.RETRIED, None),
    ),
    # transient, attempts left: retry tier
    (
        Transient("x"),
        1,
        False,
        Fallback.NOT_RUN,
        Route.PRIMARY,
        ("move", "orders.retry.2s", OutcomeKind.RETRIED, None),
    ),
    (
        Transient("x"),
        2,
        False,
        Fallback.NOT_RUN,
        Route.PROBE,
        ("move", "orders.retry.4s", OutcomeKind.RETRIED, None),
    ),
    # transient on the last attempt: exhausted
    (
        Transient("x"),
        3,
        False,
        Fallback.NOT_RUN,
        Route.PRIMARY,
        ("move", "orders.dlq", OutcomeKind.DEAD_LETTERED, "retries_exhausted"),
    ),
    # exhausted, fallback served: acked
    (Transient("x"), 3, True, Fallback.SERVED, Route.PRIMARY, ("ack", "message.fallback_served")),
    # exhausted, fallback failed: the handler's dead letter stands
    (
        Transient("x"),
        3,
        True,
        Fallback.FAILED,
        Route.PRIMARY,
        ("move", "orders.dlq", OutcomeKind.DEAD_LETTERED, "retries_exhausted"),
    ),
    # timeout on the last attempt
    (
        HandlerTimeout("slow"),
        3,
        False,
        Fallback.NOT_RUN,
        Route.PRIMARY,
        ("move", "orders.dlq", OutcomeKind.DEAD_LETTERED, "timeout"),
    ),
    # permanent: dead-lettered at once, whatever the attempt or route
    (
        Permanent("bad"),
        1,
        True,
        Fallback.NOT_RUN,
        Route.PRIMARY,
        ("move", "orders.dlq", OutcomeKind.DEAD_LETTERED, "permanent_error"),
    ),
    (
        Permanent("bad"),
        2,
        False,
        Fallback.NOT_RUN,
        Route.PROBE,
        ("move", "orders.dlq", OutcomeKind.DEAD_LETTERED, "permanent_error"),
    ),
    # undecodable body
    (
        DecodeError("not json"),
        1,
        False,
        Fallback.NOT_RUN,
        Route.PRIMARY,
        ("move", "orders.dlq", OutcomeKind.DEAD_LETTERED, "decode_error"),
    ),
]


@pytest.mark.parametrize(
    ("error", "attempt", "has_fallback", "fallback", "route", "expected"),
    CASES,
    ids=[f"{type(c[0]).__name__}-a{c[1]}-fb{int(c[2])}-{c[3].value}-{c[4].value}" for c in CASES],
)
def test_judge_maps_classification_attempt_fallback_and_route_to_one_verdict(
    error: Exception | None,
    attempt: int,
    has_fallback: bool,
    fallback: Fallback,
    route: Route,
    expected: tuple[Any, ...],
) -> None:
    """Every combination ends in exactly one verdict of the expected shape."""
    handler = _handler(fallback=has_fallback)
    run = None if route is Route.RETURN else _run(error, attempt, handler, fallback=fallback)
    verdict = judge(route, run, handler, ORIGIN, {}, random_fraction=0.0)
    kind = expected[0]
    if kind == "ack":
        assert verdict == Ack(expected[1])
    elif kind == "return":
        assert isinstance(verdict, Return) and verdict.counted is expected[1]
        assert verdict is RETURNED_CIRCUIT_OPEN
    else:
        assert isinstance(verdict, Move)
        assert (verdict.target, verdict.kind) == (expected[1], expected[2])
        assert verdict.headers.get(h.REASON) == expected[3]
        assert verdict.headers[h.ATTEMPT] == attempt
        assert verdict.headers[h.QUEUE] == QUEUE
        assert (verdict.tier_ms is None) == (verdict.kind is OutcomeKind.DEAD_LETTERED)


@pytest.mark.parametrize(
    ("error", "attempt", "has_fallback", "ran", "wanted"),
    [
        (Transient("x"), 3, True, Fallback.NOT_RUN, True),  # exhausted
        (HandlerTimeout("t"), 3, True, Fallback.NOT_RUN, True),  # timed out on the last
        (Transient("x"), 1, True, Fallback.NOT_RUN, False),  # a retry is still due
        (Permanent("x"), 1, True, Fallback.NOT_RUN, False),  # the message is bad
        (DecodeError("x"), 1, True, Fallback.NOT_RUN, False),
        (Transient("x"), 3, False, Fallback.NOT_RUN, False),  # no fallback
        (Transient("x"), 3, True, Fallback.FAILED, False),  # ran already
        (None, 1, True, Fallback.NOT_RUN, False),  # succeeded
    ],
)
def test_the_fallback_is_tried_only_for_exhausted_or_timed_out_runs(
    error: Exception | None, attempt: int, has_fallback: bool, ran: Fallback, wanted: bool
) -> None:
    """Exactly the dead letters a fallback may spare ask for it, once."""
    handler = _handler(fallback=has_fallback)
    assert wants_fallback(_run(error, attempt, handler, fallback=ran), handler) is wanted


@pytest.mark.parametrize(
    ("delay", "tier", "ttl"),
    [(3.0, 4000, 3000), (4.0, 4000, None), (7.0, 10_000, 7000), (0.0, 2000, 1)],
)
def test_a_requested_delay_waits_in_the_next_tier_up_with_an_exact_ttl(
    delay: float, tier: int, ttl: int | None
) -> None:
    """Retry(delay) waits in the smallest tier that is long enough (the 1-2-5 ladder above
    the policy's 2 s and 4 s tiers), its own TTL making the wait exact."""
    handler = _handler()
    run = _run(Retry(delay), 1, handler)
    verdict = judge(Route.PRIMARY, run, handler, ORIGIN, {}, random_fraction=0.0)
    assert isinstance(verdict, Move)
    assert (verdict.tier_ms, verdict.expiration_ms) == (tier, ttl)
    assert verdict.target == f"orders.retry.{tier // 1000}s"


def test_immediate_failures_join_the_history_before_the_last_one() -> None:
    """In-process failures before the last execution are written to the history, in order."""
    from qworker.failures import Failure

    handler = _handler()
    earlier = [Failure.from_exception(1, Transient("first"))]
    run = _run(Transient("second"), 2, handler, earlier=earlier)
    verdict = judge(Route.PRIMARY, run, handler, ORIGIN, {}, random_fraction=0.0)
    assert isinstance(verdict, Move)
    messages = [entry["error_message"] for entry in verdict.headers[h.HISTORY]]
    assert messages == ["first", "second"]


def test_judging_a_failure_does_not_classify_again() -> None:
    """The decision on the run is the one used: a contradicting classifier is not consulted."""
    handler = _handler()
    exc = Transient("x")
    forced = decide(exc, Classification.PERMANENT, 1, 3)
    run = Run(1, exc, 0.0, forced)
    verdict = judge(Route.PRIMARY, run, handler, ORIGIN, {}, random_fraction=0.0)
    assert isinstance(verdict, Move) and verdict.target == "orders.dlq"
    assert verdict.headers[h.CLASSIFICATION] == "permanent"


# fit_frame: a copy always fits the negotiated frame size.


def _size_of(headers: dict[str, Any]) -> int:
    return _header_frame_size(Basic.Properties(message_id="m-1", content_type="application/json"))(
        headers
    )


@pytest.mark.parametrize("budget", [4088, 8184, 131064])
@pytest.mark.parametrize(
    "user",
    [
        {},
        {"big": "x" * 130_000},
        {"big": bytearray(b"\x00" * 90_000), "mid": "y" * 5000, "tiny": 1},
        {f"k{i}": "v" * 3000 for i in range(50)},
        {"nested": {"deep": ["z" * 20_000, {"more": "w" * 20_000}]}},
    ],
    ids=["none", "one-huge-str", "bytes-and-more", "many-medium", "nested"],
)
def test_fit_frame_makes_any_copy_fit_and_names_what_gave_way(
    budget: int, user: dict[str, Any]
) -> None:
    """Whatever the user headers, the fitted headers encode within the frame budget; qworker's
    own reason survives, and every dropped user header is named with its size."""
    ours = {
        h.REASON: "permanent_error",
        h.ATTEMPT: 3,
        h.ERROR_TRACEBACK: "t" * 16_000,
        h.HISTORY: [{"attempt": i, "error_message": "m" * 500} for i in range(10)],
        h.ERROR_MESSAGE: "e" * 2000,
    }
    headers = {**user, **ours}
    fitted = h.fit_frame(headers, _size_of, budget)
    assert _size_of(fitted) <= budget
    assert fitted[h.REASON] == "permanent_error" and fitted[h.ATTEMPT] == 3
    dropped = [k for k in user if k not in fitted]
    named = " ".join(fitted.get(h.DROPPED_HEADERS, []))
    assert all(f"{k} (" in named for k in dropped[-h.HISTORY_LENGTH :])
    if _size_of(headers) <= budget:
        assert fitted == headers  # nothing changes when it fits


def test_fit_frame_leaves_a_fitting_copy_untouched_without_measuring_it() -> None:
    """The exact (costly) size is not computed for headers far below the budget."""

    def boom(_: dict[str, Any]) -> int:
        raise AssertionError("measured")

    headers = {"a": "b", h.REASON: "timeout"}
    assert h.fit_frame(headers, boom, 131_064) is headers


async def test_the_blocked_state_of_an_aiormq_connection_is_where_qworker_reads_it() -> None:
    """qworker.publish.blocked reads aiormq's private unblocked event: pin the attribute, so that
    an aiormq release that renames it fails here instead of silently failing publishes during a
    broker alarm."""
    import asyncio

    import aiormq
    from yarl import URL

    from qworker.publish import blocked

    connection = aiormq.Connection(URL("amqp://guest:guest@127.0.0.1:1/"))
    event = connection._Connection__connection_unblocked  # type: ignore[attr-defined]
    assert isinstance(event, asyncio.Event)
    event.clear()
    assert blocked(connection)
    event.set()
    assert not blocked(connection)


def test_an_alert_lists_the_runbooks_of_the_outcomes_that_tripped_it() -> None:
    """Runbook links reach notifiers: each once, in the order the outcomes came."""
    from qworker.alerts import Alert
    from qworker.events import Outcome

    def outcome(runbook: str | None) -> Outcome:
        return Outcome(OutcomeKind.DEAD_LETTERED, "q", "h", "m", 1, 0.0, runbook=runbook)

    alert = Alert(
        "5 dead letters in 60s",
        3,
        60.0,
        (outcome("https://rb/a"), outcome(None), outcome("https://rb/b"), outcome("https://rb/a")),
    )
    assert alert.runbooks == ("https://rb/a", "https://rb/b")
