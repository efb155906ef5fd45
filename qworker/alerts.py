"""Alert rules: notify a person when failures or the DLQ say something needs a look.

Three kinds of rule, made by ``app.alert(when=..., notify=send)`` (:func:`make_rule`):

- **rate** (``when="dead_lettered"`` or ``"retried"``): ``send`` is called when the
  ``count``-th matching outcome falls within ``within`` seconds, then the rule stays quiet for
  ``cooldown`` seconds (default: ``within``), so that one incident gives one notification.
- **new fingerprint** (``when="new_fingerprint"``): one notification per new kind of failure
  (:attr:`~qworker.events.Outcome.fingerprint` of a dead letter), not per message. "Seen
  before" is kept in memory and seeded, when a worker (or supervisor) starts, from the alert
  records of the audit trail (``qworker.audit``): a fingerprint alerted once is not alerted
  again after a restart.
- **DLQ depth** (``when="dlq_depth", above=N``): fired by the DLQ poller
  (:mod:`qworker.watch`) when a DLQ's depth crosses from ``<= N`` to ``> N``; quiet until it
  drops to ``N`` or below and crosses again (and at least ``cooldown`` seconds, default 300,
  between two notifications of one DLQ).

Every notification also appends an ``alert`` record to the audit trail (through the sink
the runtime sets, :attr:`AlertRule.audit`); a failed append is logged and never stops the alert.
Under ``qworker run --processes N`` the rules run in the supervisor, which receives the
children's outcomes (see :mod:`qworker.supervisor`).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog

from qworker.errors import ConfigurationError
from qworker.events import Observer, Outcome, OutcomeKind, Severity
from qworker.topology import dlq_name

_SEVERITY_ORDER = [Severity.LOW, Severity.MEDIUM, Severity.HIGH, Severity.CRITICAL]

#: Seconds a notify function (and the audit append) may take.
NOTIFY_TIMEOUT = 30.0
#: Default quiet time between two ``dlq_depth`` notifications of one DLQ.
DEFAULT_DLQ_COOLDOWN = 300.0
#: Outcomes a ``new_fingerprint`` rule keeps while its memory is being seeded.
MAX_PENDING = 1000

#: The rule kinds ``app.alert(when=...)`` accepts.
WHENS = ("dead_lettered", "retried", "new_fingerprint", "dlq_depth")
NEW_FINGERPRINT = "new fingerprint"


@dataclass(frozen=True, slots=True)
class Alert:
    """What a notifier receives: the rule's description and what tripped it.

    ``outcomes`` are the outcomes counted (rate rules) or the first of a new fingerprint;
    ``queue`` is the work queue concerned when there is one, ``fingerprints`` the new kinds of
    failure (``new_fingerprint``), ``value`` the DLQ depth that crossed (``dlq_depth``).
    """

    rule: str
    count: int
    within: float
    outcomes: tuple[Outcome, ...]
    queue: str | None = None
    fingerprints: tuple[str, ...] = ()
    value: float | None = None

    @property
    def runbooks(self) -> tuple[str, ...]:
        """The runbook links of the outcomes that tripped the rule, each once, in order (the
        handler's ``runbook=``, else ``App(runbooks=)`` by error code)."""
        return tuple(dict.fromkeys(o.runbook for o in self.outcomes if o.runbook))


Notify = Callable[[Alert], Awaitable[None]]
AuditSink = Callable[[str | None, list[str], str, str], Awaitable[None]]
"""``audit(dlq, fingerprints, rule_description, at)``: append an ``alert`` record (``at``: when
the rule fired, ISO 8601 UTC)."""


@dataclass(frozen=True, slots=True)
class DlqSample:
    """One poll of one DLQ (:mod:`qworker.watch`)."""

    queue: str
    """The work queue."""
    dlq: str
    depth: int
    """Ready messages."""
    oldest_failure: datetime | None
    """When the head message failed; None when the DLQ is empty or that is unknown."""
    at: float
    """``time.time()`` of the poll."""

    def oldest_age(self, now: float | None = None) -> float | None:
        """Seconds since the head message failed (0 for an empty DLQ; None when unknown)."""
        if self.depth == 0:
            return 0.0
        if self.oldest_failure is None:
            return None
        return max(0.0, (time.time() if now is None else now) - self.oldest_failure.timestamp())


class DlqObserver:
    """Receives DLQ samples from the poller (metrics, ``dlq_depth`` rules)."""

    def dlq(self, sample: DlqSample) -> None:
        """A DLQ was polled."""


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


class AlertRule(Observer, DlqObserver):
    """What every alert rule shares: notifying (with a time limit) and the audit record.

    ``kinds`` are the outcome kinds the rule looks at (a supervised child forwards those).
    ``suspended`` rules ignore outcomes: in a supervised child, where the supervisor
    evaluates them. ``audit`` is set by the runtime (worker or supervisor) that can reach
    the broker.
    """

    kinds: frozenset[OutcomeKind] = frozenset()
    description: str = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> AlertRule:
        # ``AlertRule(notify, when=..., count=...)`` keeps its old meaning: a rate rule.
        return super().__new__(RateRule if cls is AlertRule else cls)

    def __init__(self, notify: Notify, **options: Any) -> None:
        # ``options``: those of a rate rule, when built as ``AlertRule(...)`` (see ``__new__``).
        if not callable(notify):
            raise ConfigurationError("alert: notify= takes an async callable")
        self._notify = notify
        self.suspended = False
        self.audit: AuditSink | None = None
        self.fired = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._log = structlog.get_logger("qworker")

    def fire(self, alert: Alert, audits: Iterable[tuple[str | None, list[str]]]) -> None:
        """Notify (in a task) and append one audit record per ``(dlq, fingerprints)``."""
        self.fired += 1
        self._log.warning(
            "alert.fired", rule=alert.rule, queue=alert.queue, fingerprints=list(alert.fingerprints)
        )
        at = datetime.now(UTC).isoformat(timespec="milliseconds")
        task = asyncio.create_task(self._send(alert, list(audits), at))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(
        self, alert: Alert, audits: list[tuple[str | None, list[str]]], at: str
    ) -> None:
        await asyncio.gather(
            self._call_notify(alert),
            *(self._append(dlq, fps, alert.rule, at) for dlq, fps in audits),
        )

    async def _call_notify(self, alert: Alert) -> None:
        try:
            async with asyncio.timeout(NOTIFY_TIMEOUT):
                await self._notify(alert)
        except Exception:
            self._log.exception("alert.notify_failed", rule=alert.rule)

    async def _append(self, dlq: str | None, fingerprints: list[str], rule: str, at: str) -> None:
        if self.audit is None:
            self._log.info("alert.not_audited", rule=rule, why="no broker connection for audit")
            return
        try:
            async with asyncio.timeout(NOTIFY_TIMEOUT):
                await self.audit(dlq, fingerprints, rule, at)
        except Exception as exc:
            self._log.error("alert.audit_failed", rule=rule, dlq=dlq, error=repr(exc)[:300])

    async def wait(self, grace: float) -> None:
        """Give notifications under way up to ``grace`` seconds."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)


def _severity(severity: str | None) -> Severity | None:
    try:
        return Severity(severity) if severity is not None else None
    except ValueError as exc:
        raise ConfigurationError(f"alert: {exc}") from None


def _severe_enough(event: Outcome, minimum: Severity | None) -> bool:
    if minimum is None:
        return True
    return event.severity is not None and _SEVERITY_ORDER.index(
        event.severity
    ) >= _SEVERITY_ORDER.index(minimum)


def _by_dlq(outcomes: Iterable[Outcome]) -> list[tuple[str | None, list[str]]]:
    """One audit entry per DLQ of ``outcomes``, with their fingerprints."""
    grouped: dict[str, list[str]] = {}
    for event in outcomes:
        fingerprints = grouped.setdefault(dlq_name(event.queue), [])
        if event.fingerprint and event.fingerprint not in fingerprints:
            fingerprints.append(event.fingerprint)
    return list(grouped.items())


class RateRule(AlertRule):
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
        super().__init__(notify)
        try:
            self._kind = OutcomeKind(when)
        except ValueError as exc:
            raise ConfigurationError(f"alert: {exc}") from None
        self._severity = _severity(severity)
        self.kinds = frozenset({self._kind})
        self._window = RateWindow(count, within, within if cooldown is None else cooldown)
        self._queue, self._clock = queue, clock
        self._recent: deque[Outcome] = deque(maxlen=count)
        self.description = (
            f"{count} {when}{f' of severity >= {severity}' if severity else ''}"
            f"{f' on {queue}' if queue else ''} within {within:g}s"
        )

    def outcome(self, event: Outcome) -> None:
        if self.suspended or event.kind is not self._kind:
            return
        if (self._queue and event.queue != self._queue) or not _severe_enough(
            event, self._severity
        ):
            return
        self._recent.append(event)
        if self._window.hit(self._clock()):
            recent = tuple(self._recent)
            queues = {e.queue for e in recent}
            alert = Alert(
                self.description,
                self._window.count,
                self._window.within,
                recent,
                queue=self._queue or (next(iter(queues)) if len(queues) == 1 else None),
                fingerprints=tuple(dict.fromkeys(e.fingerprint for e in recent if e.fingerprint)),
            )
            self.fire(alert, _by_dlq(recent))


class FingerprintRule(AlertRule):
    """Fires once per new fingerprint among dead letters (at least ``severity``, of ``queue``).

    ``seen`` holds ``(queue, fingerprint)`` pairs; :meth:`seeding` and :meth:`seed` let the
    runtime fill it from the audit trail before deciding (outcomes wait meanwhile).
    """

    kinds = frozenset({OutcomeKind.DEAD_LETTERED})

    def __init__(
        self, notify: Notify, *, severity: str | None = None, queue: str | None = None
    ) -> None:
        super().__init__(notify)
        self._severity = _severity(severity)
        self._queue = queue
        self.seen: set[tuple[str, str]] = set()
        self._pending: list[Outcome] | None = None
        self.description = (
            f"{NEW_FINGERPRINT}{f' of severity >= {severity}' if severity else ''}"
            f"{f' on {queue}' if queue else ''}"
        )

    def outcome(self, event: Outcome) -> None:
        if self.suspended or event.kind is not OutcomeKind.DEAD_LETTERED or not event.fingerprint:
            return
        if (self._queue and event.queue != self._queue) or not _severe_enough(
            event, self._severity
        ):
            return
        if self._pending is not None:
            if len(self._pending) < MAX_PENDING:
                self._pending.append(event)
            return
        key = (event.queue, event.fingerprint)
        if key in self.seen:
            return
        self.seen.add(key)
        alert = Alert(self.description, 1, 0.0, (event,), queue=event.queue, fingerprints=(key[1],))
        self.fire(alert, [(dlq_name(event.queue), [key[1]])])

    def seeding(self) -> None:
        """Hold outcomes until :meth:`seed` (the runtime reads what was alerted before)."""
        if self._pending is None:
            self._pending = []

    def seed(self, seen: Iterable[tuple[str, str]]) -> None:
        """Add ``(queue, fingerprint)`` pairs alerted before, then decide the held outcomes."""
        self.seen.update(seen)
        pending, self._pending = self._pending or [], None
        for event in pending:
            self.outcome(event)


class DlqDepthRule(AlertRule):
    """Fires when a DLQ's depth crosses ``above`` upwards (one notification per crossing)."""

    def __init__(
        self,
        notify: Notify,
        *,
        above: int,
        queue: str | None = None,
        cooldown: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(notify)
        if isinstance(above, bool) or not isinstance(above, int) or above < 0:
            raise ConfigurationError("alert: when='dlq_depth' needs above= (an int >= 0)")
        self.above = above
        self.cooldown = DEFAULT_DLQ_COOLDOWN if cooldown is None else cooldown
        if self.cooldown < 0:
            raise ConfigurationError("alert needs cooldown >= 0")
        self._queue, self._clock = queue, clock
        self._armed: dict[str, bool] = {}
        self._quiet_until: dict[str, float] = {}
        self.description = f"dlq depth above {above}{f' on {dlq_name(queue)}' if queue else ''}"

    def dlq(self, sample: DlqSample) -> None:
        if self._queue and sample.queue != self._queue:
            return
        if sample.depth <= self.above:
            self._armed[sample.dlq] = True
            return
        now = self._clock()
        if not self._armed.get(sample.dlq, True) or now < self._quiet_until.get(sample.dlq, 0.0):
            return
        self._armed[sample.dlq] = False
        self._quiet_until[sample.dlq] = now + self.cooldown
        alert = Alert(
            f"{self.description}: {sample.dlq} holds {sample.depth}",
            1,
            0.0,
            (),
            queue=sample.queue,
            value=float(sample.depth),
        )
        self.fire(alert, [(sample.dlq, [])])


def make_rule(notify: Notify, *, when: str, above: int | None = None, **options: Any) -> AlertRule:
    """The rule ``app.alert(when=..., ...)`` describes (see the module docstring)."""
    if when not in WHENS:
        raise ConfigurationError(f"alert: when= takes one of {', '.join(WHENS)}, got {when!r}")
    if when == "dlq_depth":
        if options.get("severity") is not None:
            raise ConfigurationError("alert: severity= does not apply to when='dlq_depth'")
        if above is None:
            raise ConfigurationError("alert: when='dlq_depth' needs above=")
        return DlqDepthRule(
            notify, above=above, queue=options.get("queue"), cooldown=options.get("cooldown")
        )
    if above is not None:
        raise ConfigurationError("alert: above= applies to when='dlq_depth' only")
    if when == "new_fingerprint":
        return FingerprintRule(notify, severity=options.get("severity"), queue=options.get("queue"))
    return RateRule(notify, when=when, **options)


def rules_of(observers: Iterable[Observer]) -> list[AlertRule]:
    """The alert rules among ``observers``."""
    return [o for o in observers if isinstance(o, AlertRule)]


#: Seconds between two polls of the DLQs unless configured (``qworker run --dlq-poll``).
DEFAULT_DLQ_POLL = 15.0


def listens_to_dlqs(observer: object) -> bool:
    """Whether ``observer`` does something with DLQ samples."""
    return isinstance(observer, DlqObserver) and type(observer).dlq is not DlqObserver.dlq


def watching_needed(
    observers: Iterable[Observer], *, interval: float, export: bool = False
) -> bool:
    """Whether a DLQ watcher (:mod:`qworker.watch`) has work: alert rules to serve, or DLQ
    samples that someone reads. Cheap, so that a worker without any never imports it."""
    observers = list(observers)
    listens = any(listens_to_dlqs(o) for o in observers)
    return bool(rules_of(observers)) or (interval > 0 and (export or listens))
