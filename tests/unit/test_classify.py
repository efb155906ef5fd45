"""Classification order (SPEC section 2) and the decision it leads to."""

from __future__ import annotations

import json
from typing import Any

import pydantic
import pytest

from qworker.classify import Action, Classification, Reason, classify, decide
from qworker.errors import (
    ConfigurationError,
    DecodeError,
    HandlerTimeout,
    Permanent,
    Retry,
    Transient,
)

P = Classification.PERMANENT
T = Classification.TRANSIENT


class _Model(pydantic.BaseModel):
    n: int


def _validation_error() -> pydantic.ValidationError:
    try:
        _Model.model_validate({"n": "not a number"})
    except pydantic.ValidationError as exc:
        return exc
    raise AssertionError("unreachable")


def _json_error() -> json.JSONDecodeError:
    try:
        json.loads("{")
    except json.JSONDecodeError as exc:
        return exc
    raise AssertionError("unreachable")


def _unicode_error() -> UnicodeDecodeError:
    try:
        b"\xff".decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc
    raise AssertionError("unreachable")


class MyPermanent(Permanent):
    pass


class MyTransient(Transient):
    pass


def _raises(exc: BaseException) -> Any:
    raise RuntimeError("classifier bug")


@pytest.mark.parametrize(
    ("exc", "kwargs", "expected"),
    [
        # 1. qworker's own exceptions win over everything else.
        (Permanent("x"), {"transient": (Permanent,)}, P),
        (MyPermanent("x"), {"classifier": lambda e: "transient"}, P),
        (Transient("x"), {"permanent": (Transient,)}, T),
        (MyTransient("x"), {"default": P}, T),
        (Retry(3), {"permanent": (Retry,), "classifier": lambda e: "permanent"}, T),
        # 2. handler permanent= before transient=.
        (KeyError("k"), {"permanent": (KeyError,), "transient": (KeyError,)}, P),
        (KeyError("k"), {"permanent": (LookupError,), "transient": (KeyError,)}, P),
        (KeyError("k"), {"transient": (LookupError,)}, T),
        (KeyError("k"), {"transient": (KeyError,), "classifier": lambda e: "permanent"}, T),
        (TimeoutError(), {"permanent": (TimeoutError,)}, P),
        (HandlerTimeout(), {"permanent": (TimeoutError,)}, P),
        (DecodeError("x"), {"transient": (DecodeError,)}, T),
        # 3. the app classifier, before built-ins.
        (ValueError(), {"classifier": lambda e: "transient", "default": P}, T),
        (ValueError(), {"classifier": lambda e: "permanent"}, P),
        (TimeoutError(), {"classifier": lambda e: "permanent"}, P),
        (DecodeError("x"), {"classifier": lambda e: "transient"}, T),
        (ValueError(), {"classifier": lambda e: Classification.PERMANENT}, P),
        # a classifier with no opinion, garbage or a crash falls through.
        (ValueError(), {"classifier": lambda e: None, "default": P}, P),
        (ValueError(), {"classifier": lambda e: None}, T),
        (ValueError(), {"classifier": lambda e: "PERMANENT"}, T),
        (ValueError(), {"classifier": lambda e: "retry"}, T),
        (ValueError(), {"classifier": lambda e: 1}, T),
        (ValueError(), {"classifier": lambda e: ["permanent"]}, T),
        (ValueError(), {"classifier": lambda e: True}, T),
        (ValueError(), {"classifier": _raises}, T),
        (ValueError(), {"classifier": _raises, "default": P}, P),
        (TimeoutError(), {"classifier": _raises, "default": P}, T),
        (DecodeError("x"), {"classifier": lambda e: None}, P),
        # 4. built-in rules.
        (DecodeError("x"), {}, P),
        (_validation_error(), {}, P),
        (_json_error(), {}, P),
        (_unicode_error(), {}, P),
        (DecodeError("x"), {"default": T}, P),
        (TimeoutError(), {"default": P}, T),
        (ConnectionError(), {"default": P}, T),
        (ConnectionResetError(), {"default": P}, T),
        (HandlerTimeout(), {"default": P}, T),
        # 5. the default.
        (ValueError(), {}, T),
        (ZeroDivisionError(), {"default": P}, P),
        (Exception(), {"default": T}, T),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else None,
)
def test_classify_applies_the_first_matching_rule_in_spec_order(
    exc: BaseException, kwargs: dict[str, Any], expected: Classification
) -> None:
    """Raised type, then permanent=, transient=, classifier, built-ins, default: first wins."""
    assert classify(exc, **kwargs) is expected


def test_classifier_is_not_consulted_when_an_earlier_rule_decides() -> None:
    """The app classifier only sees exceptions the handler's own rules did not settle."""
    seen: list[BaseException] = []

    def spy(exc: BaseException) -> str | None:
        seen.append(exc)
        return None

    classify(Permanent("x"), classifier=spy)
    classify(KeyError("k"), permanent=(KeyError,), classifier=spy)
    classify(KeyError("k"), transient=(KeyError,), classifier=spy)
    assert seen == []
    error = ValueError("v")
    classify(error, classifier=spy)
    assert seen == [error]


@pytest.mark.parametrize(
    ("exc", "attempt", "max_attempts", "action", "reason", "delay"),
    [
        # permanent: dead letter at once, whatever the attempt.
        (Permanent("x"), 1, 5, Action.DEAD_LETTER, Reason.PERMANENT_ERROR, None),
        (KeyError("k"), 1, 5, Action.DEAD_LETTER, Reason.PERMANENT_ERROR, None),
        (DecodeError("x"), 1, 5, Action.DEAD_LETTER, Reason.DECODE_ERROR, None),
        (DecodeError("x"), 5, 5, Action.DEAD_LETTER, Reason.DECODE_ERROR, None),
        # transient before the last attempt: retry.
        (ValueError(), 1, 5, Action.RETRY, None, None),
        (ValueError(), 4, 5, Action.RETRY, None, None),
        (HandlerTimeout(), 4, 5, Action.RETRY, None, None),
        (Retry(7.5), 1, 5, Action.RETRY, None, 7.5),
        (Retry(0), 2, 5, Action.RETRY, None, 0.0),
        # transient on the last attempt: exhausted, or timeout for a handler timeout.
        (ValueError(), 5, 5, Action.DEAD_LETTER, Reason.RETRIES_EXHAUSTED, None),
        (ValueError(), 9, 5, Action.DEAD_LETTER, Reason.RETRIES_EXHAUSTED, None),
        (TimeoutError(), 5, 5, Action.DEAD_LETTER, Reason.RETRIES_EXHAUSTED, None),
        (HandlerTimeout(), 5, 5, Action.DEAD_LETTER, Reason.TIMEOUT, None),
        (Retry(3), 5, 5, Action.DEAD_LETTER, Reason.RETRIES_EXHAUSTED, None),
        # max_attempts=1 dead-letters on the first failure.
        (ValueError(), 1, 1, Action.DEAD_LETTER, Reason.RETRIES_EXHAUSTED, None),
        (HandlerTimeout(), 1, 1, Action.DEAD_LETTER, Reason.TIMEOUT, None),
        (Retry(1), 1, 1, Action.DEAD_LETTER, Reason.RETRIES_EXHAUSTED, None),
    ],
)
def test_decide_turns_a_classification_into_an_action_and_reason(
    exc: BaseException,
    attempt: int,
    max_attempts: int,
    action: Action,
    reason: Reason | None,
    delay: float | None,
) -> None:
    """Permanent dead-letters now; transient retries until the last allowed attempt."""
    classification = classify(exc, permanent=(KeyError,))
    decision = decide(exc, classification, attempt, max_attempts)
    assert decision.action is action
    assert decision.reason is reason
    assert decision.requested_delay == delay
    assert decision.classification is classification


def test_decide_dead_letter_keeps_the_classification() -> None:
    """A dead letter says whether it was a permanent error or exhausted transient retries."""
    exhausted = decide(ValueError(), T, 3, 3)
    assert (exhausted.classification, exhausted.reason) == (T, Reason.RETRIES_EXHAUSTED)
    permanent = decide(ValueError(), P, 1, 3)
    assert (permanent.classification, permanent.reason) == (P, Reason.PERMANENT_ERROR)


@pytest.mark.parametrize("delay", [-1, -0.001, float("nan")])
def test_retry_rejects_negative_or_nan_delay(delay: float) -> None:
    """Retry(delay) must be a non-negative number of seconds."""
    with pytest.raises(ConfigurationError):
        Retry(delay)
