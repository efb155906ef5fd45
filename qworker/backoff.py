"""Back-off after an outage: how long to wait before trying again. Pure state, no I/O.

Two places need it: a consumer whose copies cannot be published (the broker refuses
them, or a retry tier cannot be declared) pauses its queue, and a worker whose
connect → declare → consume cycle keeps failing waits before the next cycle. Both
double the pause on every failure that happens after the previous pause ran out,
up to a ceiling, and reset on success.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(slots=True)
class Backoff:
    """Exponential back-off shared by concurrent callers.

    Args:
        first: The pause after the first failure, in seconds.
        ceiling: The longest pause, in seconds.
        jitter: Up to this fraction of the pause is added at random, so that many
            workers that failed together do not come back together.
    """

    first: float = 0.5
    ceiling: float = 30.0
    jitter: float = 0.0
    failures: int = 0
    resume_at: float = 0.0

    def failed(self, now: float) -> float:
        """Count a failure at monotonic time ``now``; returns the seconds to wait.

        Concurrent failures within one pause are one outage, not a longer one: only a
        failure after the pause has run out doubles the next pause.
        """
        if now >= self.resume_at:
            self.failures += 1
        pause = min(self.ceiling, self.first * 2 ** (self.failures - 1))
        pause += pause * self.jitter * random.random()
        self.resume_at = max(self.resume_at, now + pause)
        return self.resume_at - now

    def succeeded(self) -> None:
        """The outage is over: the next failure starts from ``first`` again."""
        self.failures = 0

    def remaining(self, now: float) -> float:
        """Seconds still to wait at ``now`` (0 when not paused)."""
        return max(0.0, self.resume_at - now)
