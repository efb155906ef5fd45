"""The retry policy: schedule, tiers, rounding, tier names and retry planning (pure)."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qworker.errors import ConfigurationError, Retry
from qworker.retry import (
    MAX_TIER_MS,
    RetryPlan,
    RetryPolicy,
    ladder_ms,
    plan_retry,
    tier_for,
    tier_name,
    to_ms,
)

FAST = settings(max_examples=150, deadline=None)


@pytest.mark.parametrize(
    ("policy", "schedule", "tiers"),
    [
        (RetryPolicy(), [1.0, 2.0, 4.0, 8.0], [1000, 2000, 4000, 8000]),
        (RetryPolicy(max_attempts=1), [], []),
        (RetryPolicy(max_attempts=2, initial_delay=0.5), [0.5], [500]),
        # multiplier 1: one tier for every retry.
        (RetryPolicy(max_attempts=4, initial_delay=5, multiplier=1), [5.0, 5.0, 5.0], [5000]),
        # max_delay caps the growth; capped delays share one tier.
        (
            RetryPolicy(max_attempts=8, initial_delay=1, multiplier=3, max_delay=60),
            [1.0, 3.0, 9.0, 27.0, 60.0, 60.0, 60.0],
            [1000, 3000, 9000, 27000, 60000],
        ),
        # float noise never bumps a tier; fractional milliseconds round up.
        (
            RetryPolicy(max_attempts=5, initial_delay=0.1, multiplier=1.5),
            [0.1, 0.15000000000000002, 0.225, 0.3375],
            [100, 150, 225, 338],
        ),
        # immediate retries count as attempts and reduce the delayed retries.
        (RetryPolicy(max_attempts=5, immediate=1), [1.0, 2.0], [1000, 2000]),
        (RetryPolicy(max_attempts=6, immediate=1), [1.0, 2.0], [1000, 2000]),
        (RetryPolicy(max_attempts=9, immediate=2), [1.0, 2.0], [1000, 2000]),
        (RetryPolicy(max_attempts=5, immediate=4), [], []),
        (RetryPolicy(max_attempts=3, immediate=10), [], []),
        (RetryPolicy(initial_delay=0, max_delay=0, max_attempts=3), [0.0, 0.0], [0]),
    ],
)
def test_schedule_and_tiers(policy: RetryPolicy, schedule: list[float], tiers: list[int]) -> None:
    """The schedule is initial*multiplier**(n-1) capped at max_delay; tiers are its distinct ms."""
    assert policy.schedule() == pytest.approx(schedule)
    assert policy.tiers() == tiers


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"max_attempts": -1},
        {"max_attempts": True},
        {"max_attempts": 2.0},
        {"max_attempts": "5"},
        {"max_attempts": None},
        {"initial_delay": -1},
        {"initial_delay": -0.001},
        {"initial_delay": math.nan},
        {"initial_delay": math.inf},
        {"initial_delay": True},
        {"initial_delay": "1"},
        {"initial_delay": None},
        {"initial_delay": 7 * 24 * 3600 + 1, "max_delay": 7 * 24 * 3600 + 1},
        {"multiplier": 0.5},
        {"multiplier": 0},
        {"multiplier": -2},
        {"multiplier": math.nan},
        {"multiplier": math.inf},
        {"multiplier": True},
        {"initial_delay": 10, "max_delay": 5},
        {"max_delay": math.nan},
        {"max_delay": math.inf},
        {"max_delay": -1},
        {"max_delay": 7 * 24 * 3600 + 1},
        {"max_delay": "300"},
        {"jitter": -0.1},
        {"jitter": 1},
        {"jitter": 1.5},
        {"jitter": math.nan},
        {"jitter": True},
        {"jitter": None},
        {"immediate": -1},
        {"immediate": True},
        {"immediate": 1.0},
        {"immediate": "1"},
    ],
    ids=repr,
)
def test_invalid_policy_values_raise_configuration_error(kwargs: dict[str, Any]) -> None:
    """Bad values (NaN, infinite, negative, bool for a number, wrong type) fail when declared."""
    with pytest.raises(ConfigurationError):
        RetryPolicy(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial_delay": 0},
        {"jitter": 0},
        {"jitter": 0.99},
        {"multiplier": 1},
        {"max_attempts": 1},
        {"initial_delay": 1, "max_delay": 1},
        {"max_delay": 7 * 24 * 3600},
        {"initial_delay": 2, "max_delay": 10, "multiplier": 3},
    ],
    ids=repr,
)
def test_boundary_policy_values_are_accepted(kwargs: dict[str, Any]) -> None:
    """The edges of each valid range are allowed."""
    RetryPolicy(**kwargs)


@pytest.mark.parametrize(
    ("seconds", "ms"),
    [
        (0, 0),
        (-1, 0),
        (math.nan, 0),
        (0.001, 1),
        (0.0011, 2),
        (0.0015, 2),
        (0.1, 100),
        (0.3, 300),
        (0.7, 700),
        (1, 1000),
        (1.0001, 1001),
        (2.5, 2500),
        (7 * 24 * 3600, MAX_TIER_MS),
        (1e9, MAX_TIER_MS),
        (1e300, MAX_TIER_MS),
        (math.inf, MAX_TIER_MS),
    ],
)
def test_to_ms_rounds_up_and_clamps(seconds: float, ms: int) -> None:
    """Seconds become whole milliseconds rounded up (float noise ignored), within 0..7 days."""
    assert to_ms(seconds) == ms


@pytest.mark.parametrize(
    ("ms", "ladder"),
    [
        (-5, 0),
        (0, 0),
        (1, 1),
        (2, 2),
        (3, 5),
        (5, 5),
        (6, 10),
        (11, 20),
        (499, 500),
        (1500, 2000),
        (2001, 5000),
        (300_000, 500_000),
        (MAX_TIER_MS - 1, MAX_TIER_MS),
        (10**15, MAX_TIER_MS),
    ],
)
def test_ladder_rounds_up_to_1_2_5(ms: int, ladder: int) -> None:
    """Odd delays round up to the 1-2-5 ladder, capped at 7 days."""
    assert ladder_ms(ms) == ladder


@pytest.mark.parametrize(
    ("delay_ms", "tiers", "tier"),
    [
        (1000, [1000, 2000], 1000),
        (1001, [1000, 2000], 2000),
        (1500, [1000, 2000], 2000),
        (2000, [1000, 2000], 2000),
        (2001, [1000, 2000], 5000),
        (0, [1000], 1000),
        (3, [], 5),
        (30_000, [1000, 2000, 4000], 50_000),
    ],
)
def test_tier_for_rounds_up_to_a_known_tier_else_the_ladder(
    delay_ms: int, tiers: list[int], tier: int
) -> None:
    """A wait goes to the smallest known tier that is at least as long, else to the ladder."""
    assert tier_for(delay_ms, tiers) == tier


@pytest.mark.parametrize(
    ("ms", "name"),
    [
        (0, "0ms"),
        (1, "1ms"),
        (500, "500ms"),
        (1000, "1s"),
        (1500, "1500ms"),
        (2000, "2s"),
        (90_000, "90s"),
        (300_000, "5m"),
        (5_400_000, "90m"),
        (3_600_000, "1h"),
        (7_200_000, "2h"),
        (MAX_TIER_MS, "168h"),
    ],
)
def test_tier_name_uses_the_largest_exact_unit(ms: int, name: str) -> None:
    """Tier names are exact: 500ms, 2s, 90s, 5m, 1h, 1500ms (never a rounded 1.5s)."""
    assert tier_name(ms) == name


def _parse_tier_name(name: str) -> int:
    for unit, size in (("ms", 1), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if name.endswith(unit):
            return int(name[: -len(unit)]) * size
    raise AssertionError(name)


@FAST
@given(st.integers(min_value=0, max_value=MAX_TIER_MS))
def test_tier_name_is_exact_and_unique(ms: int) -> None:
    """Every tier name reads back as exactly its milliseconds, so two tiers never share a name."""
    assert _parse_tier_name(tier_name(ms)) == ms


# plan_retry: examples.


@pytest.mark.parametrize(
    ("policy", "failed", "fraction", "plan"),
    [
        # jitter 0: wait the whole tier, no per-message expiration.
        (RetryPolicy(jitter=0), 1, 0.9, RetryPlan(1000, None)),
        (RetryPolicy(jitter=0), 3, 0.9, RetryPlan(4000, None)),
        (RetryPolicy(jitter=0), 4, 0.5, RetryPlan(8000, None)),
        # jitter only shortens, within the tier.
        (RetryPolicy(jitter=0.1), 1, 0.0, RetryPlan(1000, None)),
        (RetryPolicy(jitter=0.1), 1, 0.5, RetryPlan(1000, 950)),
        (RetryPolicy(jitter=0.1), 1, 0.999, RetryPlan(1000, 901)),
        (RetryPolicy(jitter=0.5), 2, 0.999_999, RetryPlan(2000, 1001)),
        # out-of-range fractions are clamped, never lengthening the wait.
        (RetryPolicy(jitter=0.1), 1, -3.0, RetryPlan(1000, None)),
        (RetryPolicy(jitter=0.1), 1, 7.0, RetryPlan(1000, 900)),
        # immediate retries: attempts of one delivery share one delayed retry.
        (RetryPolicy(max_attempts=9, immediate=2, jitter=0), 3, 0.5, RetryPlan(1000, None)),
        (RetryPolicy(max_attempts=9, immediate=2, jitter=0), 4, 0.5, RetryPlan(2000, None)),
        (RetryPolicy(max_attempts=9, immediate=2, jitter=0), 6, 0.5, RetryPlan(2000, None)),
        # a zero-length tier cannot be shortened.
        (RetryPolicy(initial_delay=0, max_delay=0), 1, 0.5, RetryPlan(0, None)),
    ],
)
def test_plan_retry_follows_the_schedule_with_jitter_inside_the_tier(
    policy: RetryPolicy, failed: int, fraction: float, plan: RetryPlan
) -> None:
    """The n-th delayed retry uses the n-th schedule tier; jitter shortens within it."""
    assert plan_retry(policy, failed, requested_delay=None, random_fraction=fraction) == plan


@pytest.mark.parametrize(
    ("requested", "plan"),
    [
        (0.2, RetryPlan(1000, 200)),
        (1.0, RetryPlan(1000, None)),
        (1.5, RetryPlan(2000, 1500)),
        (2.0, RetryPlan(2000, None)),
        (7.9999, RetryPlan(8000, None)),
        (30.0, RetryPlan(50_000, 30_000)),
        (100.0, RetryPlan(100_000, None)),
        (0.0, RetryPlan(1000, 1)),  # "now": a 1 ms TTL, not the whole tier
        (1e12, RetryPlan(MAX_TIER_MS, None)),
        (math.inf, RetryPlan(MAX_TIER_MS, None)),
    ],
)
def test_plan_retry_honours_a_requested_delay(requested: float, plan: RetryPlan) -> None:
    """Retry(delay) waits at least the delay: tier >= delay, expiration = delay when shorter."""
    policy = RetryPolicy()  # tiers 1s, 2s, 4s, 8s
    got = plan_retry(policy, 1, requested_delay=Retry(requested).delay, random_fraction=0.99)
    assert got == plan


@pytest.mark.parametrize(
    ("multiplier", "capped_ms"),
    [(1.0, 1000), (2.0, 600_000), (3.0, 600_000), (10.0, 600_000), (1000.0, 600_000)],
)
@pytest.mark.parametrize("failed", [10**6, 10**12, 10**100])
def test_huge_forged_attempt_count_does_not_overflow(
    multiplier: float, capped_ms: int, failed: int
) -> None:
    """A forged attempt count plans the capped wait instead of raising OverflowError."""
    policy = RetryPolicy(multiplier=multiplier, max_delay=600, jitter=0)
    plan = plan_retry(policy, failed, requested_delay=None, random_fraction=0.5)
    assert plan == RetryPlan(tier_for(capped_ms, policy.tiers()), None)


# plan_retry: invariants.

_policies = st.builds(
    lambda attempts, initial, multiplier, span, jitter, immediate: RetryPolicy(
        max_attempts=attempts,
        initial_delay=initial,
        multiplier=multiplier,
        max_delay=min(initial + span, 7 * 24 * 3600),
        jitter=jitter,
        immediate=immediate,
    ),
    st.integers(min_value=1, max_value=12),
    st.floats(min_value=0, max_value=120, allow_nan=False),
    st.floats(min_value=1, max_value=10, allow_nan=False),
    st.floats(min_value=0, max_value=100_000, allow_nan=False),
    st.floats(min_value=0, max_value=0.99, allow_nan=False),
    st.integers(min_value=0, max_value=3),
)
_fractions = st.floats(min_value=0, max_value=1, exclude_max=True, allow_nan=False)


def _is_ladder(ms: int) -> bool:
    return ladder_ms(ms) == ms


def _wait_ms(plan: RetryPlan) -> int:
    """The scheduled wait in whole milliseconds (wait_seconds without float noise)."""
    wait_ms = plan.tier_ms if plan.expiration_ms is None else plan.expiration_ms
    assert plan.wait_seconds == pytest.approx(wait_ms / 1000)
    return wait_ms


@FAST
@given(_policies, st.integers(min_value=0, max_value=10**12), _fractions)
def test_plan_retry_wait_stays_within_its_tier(
    policy: RetryPolicy, failed: int, fraction: float
) -> None:
    """tier*(1-jitter) - 1ms <= wait <= tier; the tier is a policy tier or a ladder value."""
    plan = plan_retry(policy, failed, requested_delay=None, random_fraction=fraction)
    tier = plan.tier_ms
    assert tier in policy.tiers() or _is_ladder(tier)
    wait_ms = _wait_ms(plan)
    assert wait_ms <= tier
    assert wait_ms >= tier * (1 - policy.jitter) - 1
    if plan.expiration_ms is not None:
        assert 0 < plan.expiration_ms < tier
    if policy.jitter == 0:
        assert plan.expiration_ms is None


@FAST
@given(_policies, st.data())
def test_plan_retry_uses_exactly_the_scheduled_tier(
    policy: RetryPolicy, data: st.DataObject
) -> None:
    """Within the allowed retries, the n-th delayed retry goes to the tier of schedule[n-1]."""
    schedule = policy.schedule()
    if not schedule:
        return
    per_delivery = policy.executions_per_delivery
    failed = data.draw(st.integers(min_value=1, max_value=len(schedule) * per_delivery))
    plan = plan_retry(policy, failed, requested_delay=None, random_fraction=data.draw(_fractions))
    retry_number = math.ceil(failed / per_delivery)
    assert plan.tier_ms == to_ms(schedule[retry_number - 1])
    assert plan.tier_ms in policy.tiers()


@FAST
@given(
    _policies,
    st.integers(min_value=1, max_value=100),
    st.floats(min_value=0, max_value=10**7, allow_nan=False),
    _fractions,
)
def test_plan_retry_never_waits_less_than_a_requested_delay(
    policy: RetryPolicy, failed: int, delay: float, fraction: float
) -> None:
    """A requested delay is never shortened, by jitter or rounding (up to the 7-day cap)."""
    plan = plan_retry(policy, failed, requested_delay=delay, random_fraction=fraction)
    wanted = to_ms(delay)
    assert plan.tier_ms >= wanted
    assert plan.tier_ms in policy.tiers() or _is_ladder(plan.tier_ms)
    assert _wait_ms(plan) >= min(delay * 1000 - 1e-6, MAX_TIER_MS)
    assert _wait_ms(plan) <= plan.tier_ms


@FAST
@given(_policies)
def test_schedule_shape(policy: RetryPolicy) -> None:
    """The schedule grows monotonically, starts at initial_delay, never passes max_delay,
    and together with immediate retries it allows max_attempts executions and no more
    deliveries than needed."""
    schedule = policy.schedule()
    per_delivery = policy.immediate + 1
    deliveries = len(schedule) + 1
    assert deliveries * per_delivery >= policy.max_attempts
    assert (deliveries - 1) * per_delivery < policy.max_attempts
    assert all(a <= b for a, b in itertools.pairwise(schedule))
    assert all(d <= policy.max_delay for d in schedule)
    if schedule:
        assert schedule[0] == pytest.approx(min(policy.initial_delay, policy.max_delay))
    assert policy.tiers() == sorted(set(policy.tiers()))
