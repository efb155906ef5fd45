"""Rate alerts: notify when too many failures happen within a sliding window.

``app.alert(when="dead_lettered", count=5, within=60, notify=send)`` calls
``send`` when the ``count``-th matching outcome falls within ``within``
seconds, then stays quiet for ``cooldown`` seconds (default: ``within``) so
that one incident gives one notification.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from qworker.errors import ConfigurationError
from qworker.events import Observer, Outcome, OutcomeKind, Severity

_SEVERITY_ORDER = [Severity.LOW, Severity.MEDIUM, Severity.HIGH, Severity.CRITICAL]


@dataclass(frozen=True, slots=True)
class Alert:
    """What a notifier receives: the rule's description and the outcomes that tripped it."""

    rule: str
    count: int
    within: float
    outcomes: tuple[Outcome, ...]


Notify = Callable[[Alert], Awaitable[None]]


class RateWindow:
    """Pure sliding-window counter with a cool-down: ``hit(now)`` says whether to fire."""

    def __init__(self, count: int, within: float, cooldown: float) -> None:
        if count < 1 or within <= 0 or cooldown < 0:
            raise ConfigurationError("alert needs count >= 1, within > 0, cooldown >= 0")
        self.count, self.within, self.cooldown = count, within, cooldown
        self._times: deque[float] = deque()
        self._quiet_until = float("-inf")

    def hit(self, now: float) -> bool:
        """Record one matching outcome at ``now``; True when the rule fires."""
        times = self._times
        times.append(now)
        while times and times[0] <= now - self.within:
            times.popleft()
        while len(times) > self.count:
            times.popleft()
        if len(times) >= self.count and now >= self._quiet_until:
            self._quiet_until = now + self.cooldown
            return True
        return False


class AlertRule(Observer):
    """Fires ``notify`` when ``count`` outcomes of kind ``when`` (and at least ``severity``)
    happen within ``within`` seconds; then waits ``cooldown`` seconds before firing again."""

    def __init__(
        self,
        notify: Notify,
        *,
        when: str = "dead_lettered",
        count: int = 5,
        within: float = 60.0,
        cooldown: float | None = None,
        severity: str | None = None,
        queue: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        try:
            self._kind = OutcomeKind(when)
            self._severity = Severity(severity) if severity is not None else None
        except ValueError as exc:
            raise ConfigurationError(f"alert: {exc}") from None
        if not callable(notify):
            raise ConfigurationError("alert: notify= takes an async callable")
        self._window = RateWindow(count, within, within if cooldown is None else cooldown)
        self._notify, self._queue, self._clock = notify, queue, clock
        self._recent: deque[Outcome] = deque(maxlen=count)
        self._tasks: set[asyncio.Task[None]] = set()
        self.description = (
            f"{count} {when}{f' of severity >= {severity}' if severity else ''}"
            f"{f' on {queue}' if queue else ''} within {within:g}s"
        )
        self._log = structlog.get_logger("qworker")

    def outcome(self, event: Outcome) -> None:
        if event.kind is not self._kind or (self._queue and event.queue != self._queue):
            return
        if self._severity is not None and (
            event.severity is None
            or _SEVERITY_ORDER.index(event.severity) < _SEVERITY_ORDER.index(self._severity)
        ):
            return
        self._recent.append(event)
        if self._window.hit(self._clock()):
            alert = Alert(
                self.description, self._window.count, self._window.within, tuple(self._recent)
            )
            self._log.warning("alert.fired", rule=self.description)
            task = asyncio.create_task(self._send(alert))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, alert: Alert) -> None:
        try:
            async with asyncio.timeout(30):
                await self._notify(alert)
        except Exception:
            self._log.exception("alert.notify_failed", rule=self.description)
