"""The retry policy: how many attempts, how long to wait, which delay tiers exist.

Everything here is pure. A delay becomes a *tier*: one broker queue per distinct
wait (``orders.retry.2s``), so that a short wait never queues behind a long one.
The tiers of a policy are the delays of its schedule; a delay outside them (from
``Retry(delay=...)``) is rounded up to a 1-2-5 ladder so that producers of odd
delays cannot create an unbounded number of queues.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qworker.errors import ConfigurationError

#: The longest wait a tier may have (7 days); longer requested delays are clamped.
MAX_TIER_MS = 7 * 24 * 3600 * 1000

_LADDER_STEPS = (1, 2, 5)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a handler is retried.

    ``max_attempts`` counts handler executions, the first one included: 5 means
    up to 4 retries. The n-th delayed retry waits
    ``min(initial_delay * multiplier ** (n - 1), max_delay)`` seconds, shortened by
    up to ``jitter`` (a fraction) so that a burst of failures does not come back
    at the same instant. ``immediate`` in-process retries (no delay) run before
    each delayed retry and count as attempts.

    Args:
        max_attempts: Handler executions in all, the first included (>= 1).
        initial_delay: Seconds before the first delayed retry (0 to 7 days).
        multiplier: Growth of the delay from one retry to the next (>= 1).
        max_delay: The longest delay, in seconds (up to 7 days).
        jitter: Up to this fraction of a delay is taken off at random, in [0, 1).
        immediate: In-process retries without delay before each delayed retry (>= 0).
    """

    max_attempts: int = 5
    initial_delay: float = 1.0
    multiplier: float = 2.0
    max_delay: float = 300.0
    jitter: float = 0.1
    immediate: int = 0

    def __post_init__(self) -> None:
        for name in ("initial_delay", "multiplier", "max_delay", "jitter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigurationError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ConfigurationError(f"{name} must be finite, got {value!r}")
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise ConfigurationError("max_attempts must be an int")
        if self.max_attempts < 1:
            raise ConfigurationError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if not 0 <= self.initial_delay <= MAX_TIER_MS / 1000:
            raise ConfigurationError(
                f"initial_delay must be within 0..7 days: {self.initial_delay}"
            )
        if not self.multiplier >= 1:
            raise ConfigurationError(f"multiplier must be >= 1, got {self.multiplier}")
        if not self.initial_delay <= self.max_delay <= MAX_TIER_MS / 1000:
            raise ConfigurationError("max_delay must be within initial_delay..7 days")
        if not 0 <= self.jitter < 1:
            raise ConfigurationError(f"jitter must be within [0, 1), got {self.jitter}")
        if isinstance(self.immediate, bool) or not isinstance(self.immediate, int):
            raise ConfigurationError("immediate must be an int")
        if self.immediate < 0:
            raise ConfigurationError(f"immediate must be >= 0, got {self.immediate}")

    def delay(self, retry_number: int) -> float:
        """Seconds to wait before the ``retry_number``-th delayed retry (1-based), no jitter."""
        exponent = max(0, retry_number - 1)
        try:
            raw = self.initial_delay * self.multiplier ** min(exponent, 1000)
        except OverflowError:  # a forged attempt count with a multiplier above 2
            raw = math.inf if self.initial_delay > 0 else 0.0
        return min(raw, self.max_delay)

    @property
    def executions_per_delivery(self) -> int:
        """Handler executions one delivery may use: the first plus the immediate retries."""
        return self.immediate + 1

    def delayed_retries(self) -> int:
        """How many delayed retries the policy allows at most."""
        deliveries = math.ceil(self.max_attempts / self.executions_per_delivery)
        return deliveries - 1

    def schedule(self) -> list[float]:
        """The delays (seconds) of every delayed retry, in order, without jitter."""
        return [self.delay(n) for n in range(1, self.delayed_retries() + 1)]

    def tiers(self) -> list[int]:
        """The distinct tier lengths (milliseconds) of the schedule, ascending."""
        return sorted({to_ms(d) for d in self.schedule()})


def to_ms(seconds: float) -> int:
    """Seconds to whole milliseconds, rounded up and clamped to the tier range."""
    if not seconds > 0:
        return 0
    if seconds >= MAX_TIER_MS / 1000:  # also infinity, which math.ceil cannot convert
        return MAX_TIER_MS
    return min(math.ceil(seconds * 1000 - 1e-6), MAX_TIER_MS)


def ladder_ms(ms: int) -> int:
    """The smallest value of the 1-2-5 ladder (1ms, 2ms, 5ms, 10ms, ...) that is >= ``ms``."""
    if ms <= 1:
        return max(ms, 0)
    magnitude = 1
    while True:
        for step in _LADDER_STEPS:
            if step * magnitude >= ms:
                return min(step * magnitude, MAX_TIER_MS)
        magnitude *= 10


def tier_for(delay_ms: int, tiers: list[int]) -> int:
    """The tier a wait of ``delay_ms`` goes to: the smallest known tier >= it, else the ladder."""
    for tier in tiers:  # ascending
        if tier >= delay_ms:
            return tier
    return ladder_ms(delay_ms)


def tier_name(ms: int) -> str:
    """The tier's suffix in queue names: ``500ms``, ``2s``, ``5m``, ``1h``, ``1500ms``."""
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms > 0 and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


@dataclass(frozen=True, slots=True)
class RetryPlan:
    """Where and for how long a message waits before its next delivery."""

    tier_ms: int
    #: Per-message TTL (``expiration``) in ms, or None to wait the whole tier.
    expiration_ms: int | None

    @property
    def wait_seconds(self) -> float:
        """The wait the message is scheduled for."""
        ms = self.tier_ms if self.expiration_ms is None else self.expiration_ms
        return ms / 1000


def plan_retry(
    policy: RetryPolicy,
    failed_attempts: int,
    *,
    requested_delay: float | None,
    random_fraction: float,
) -> RetryPlan:
    """Plan the wait after ``failed_attempts`` failures.

    ``requested_delay`` comes from ``Retry(delay=...)``: the message waits at
    least that long. Otherwise the policy's schedule decides, and jitter
    (``random_fraction`` in [0, 1) times ``policy.jitter``) shortens the wait
    within its tier, never lengthens it.
    """
    tiers = policy.tiers()
    if requested_delay is not None:
        wanted = to_ms(requested_delay)
        tier = tier_for(wanted, tiers)
        # The message's own TTL makes the wait exact; 1 ms stands for "no wait" (0 is falsy
        # to AMQP clients and would mean "no expiration").
        return RetryPlan(tier, max(wanted, 1) if wanted < tier else None)
    retry_number = max(1, math.ceil(failed_attempts / policy.executions_per_delivery))
    tier = tier_for(to_ms(policy.delay(retry_number)), tiers)
    if policy.jitter == 0 or tier == 0:
        return RetryPlan(tier, None)
    shortened = tier - math.floor(tier * policy.jitter * min(max(random_fraction, 0.0), 1.0))
    return RetryPlan(tier, shortened if shortened < tier else None)
