"""The circuit breaker: stop calling a handler whose dependency is down.

Pure state machine; the consumer applies it (stops consuming while open,
probes with a single message after the cool-down). Only successes and
*transient* failures count: a permanent failure says something about the
message, not about the dependency.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from qworker.errors import ConfigurationError
from qworker.events import CircuitState


@dataclass(frozen=True, slots=True)
class CircuitBreaker:
    """When to open: ``failure_ratio`` of the last ``window`` calls (at least ``min_calls``)
    within ``within`` seconds failed transiently. Open for ``cooldown`` seconds, then one probe.

    Args:
        failure_ratio: The share of transient failures that opens the breaker, in (0, 1].
        window: How many of the latest calls are counted.
        min_calls: Calls needed in the window before the breaker may open (1..window).
        within: Only calls of the last ``within`` seconds count.
        cooldown: Seconds the breaker stays open before one probe delivery runs.
    """

    failure_ratio: float = 0.5
    window: int = 20
    min_calls: int = 10
    within: float = 60.0
    cooldown: float = 30.0

    def __post_init__(self) -> None:
        if not 0 < self.failure_ratio <= 1:
            raise ConfigurationError(f"failure_ratio must be in (0, 1], got {self.failure_ratio}")
        if not 1 <= self.min_calls <= self.window:
            raise ConfigurationError("min_calls must be within 1..window")
        if not (self.within > 0 and self.cooldown > 0):
            raise ConfigurationError("within and cooldown must be positive seconds")


@dataclass(slots=True)
class Circuit:
    """The breaker's state for one handler."""

    config: CircuitBreaker
    state: CircuitState = CircuitState.CLOSED
    opened_at: float = 0.0
    _calls: deque[tuple[float, bool]] = field(default_factory=deque)

    def record(self, ok: bool, now: float) -> CircuitState | None:
        """Count a call's result; returns the new state when it changed."""
        if self.state is CircuitState.HALF_OPEN:
            return self._move(CircuitState.CLOSED if ok else CircuitState.OPEN, now)
        if self.state is CircuitState.OPEN:
            return None  # a call that started before the breaker opened
        calls = self._calls
        calls.append((now, ok))
        while calls and (len(calls) > self.config.window or calls[0][0] < now - self.config.within):
            calls.popleft()
        failures = sum(1 for _, good in calls if not good)
        if len(calls) >= self.config.min_calls and failures >= self.config.failure_ratio * len(
            calls
        ):
            return self._move(CircuitState.OPEN, now)
        return None

    def probe_due(self, now: float) -> bool:
        """Open long enough: time for a probe."""
        return self.state is CircuitState.OPEN and now >= self.opened_at + self.config.cooldown

    def half_open(self, now: float) -> CircuitState | None:
        """Let one probe through (only from the open state)."""
        if self.state is not CircuitState.OPEN:
            return None
        return self._move(CircuitState.HALF_OPEN, now)

    def _move(self, state: CircuitState, now: float) -> CircuitState:
        self.state = state
        self._calls.clear()
        if state is CircuitState.OPEN:
            self.opened_at = now
        return state
