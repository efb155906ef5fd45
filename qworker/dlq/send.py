"""Publishing replayed copies fast, paced and confirmed, and counting what happened.

A dead letter is acked only after the broker confirmed its replayed copy, so an
interrupted replay leaves every message in the DLQ, in its target queue, or
(between the confirm and the ack) in both; never in neither.
"""

from __future__ import annotations

import asyncio
import enum
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aio_pika

from qworker.dlq.cursor import ScanReport
from qworker.dlq.records import DeadLetter, replay_properties
from qworker.errors import PublishFailed
from qworker.publish import ConfirmedPublisher

#: Publishes awaiting their confirm at once.
DEFAULT_WINDOW = 100


class Outcome(enum.Enum):
    """What happened to one selected dead letter."""

    REPLAYED = "replayed"  #: confirmed in its target queue and removed from the DLQ
    PLANNED = "planned"  #: dry run: would be replayed
    SKIPPED = "skipped"  #: no acceptable target; stays in the DLQ
    FAILED = "failed"  #: the broker did not confirm the copy; stays in the DLQ


@dataclass(frozen=True, slots=True)
class Event:
    """One selected dead letter and its outcome; ``detail`` says why it was skipped or failed."""

    dead_letter: DeadLetter
    outcome: Outcome
    target: str | None
    detail: str | None = None


EventHandler = Callable[[Event], None]


class Canary(enum.Enum):
    """How the canaries of a replay fared."""

    PASSED = "passed"  #: handled: gone from their queue and not dead-lettered again
    DIED = "died"  #: at least one was dead-lettered again
    TIMED_OUT = "timed_out"  #: still not handled when the canary timeout ran out


@dataclass(slots=True)
class ReplayResult:
    """Counts per outcome, the error that stopped a replay early, and the canaries' fate.

    ``reports``: what each pass over the DLQ saw (one, or two with canaries).
    """

    replayed: int = 0
    planned: int = 0
    skipped: int = 0
    failed: int = 0
    error: str | None = None
    canary: Canary | None = None
    dead_canaries: list[str] = field(default_factory=list)
    reports: list[ScanReport] = field(default_factory=list)

    def count(self, event: Event) -> None:
        """Count ``event``."""
        name = event.outcome.value
        setattr(self, name, getattr(self, name) + 1)


class Pacer:
    """Spaces starts ``1/rate`` seconds apart; lateness is not made up with a burst."""

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate
        self._next = 0.0

    async def wait(self) -> None:
        """Return when the next start is due."""
        now = time.monotonic()
        start = max(self._next, now)
        self._next = start + self._interval
        if start > now:
            await asyncio.sleep(start - now)


class Sender:
    """Publishes with confirms, ``window`` at a time, optionally paced to ``rate`` per second.

    After each confirm it awaits that message's ``then`` (the ack of the dead
    letter). The first failure stops it: later :meth:`send` calls return None.
    """

    def __init__(
        self,
        publisher: ConfirmedPublisher,
        result: ReplayResult,
        on_event: EventHandler | None,
        *,
        window: int = DEFAULT_WINDOW,
        rate: float | None = None,
    ) -> None:
        self._publisher = publisher
        self._result = result
        self._on_event = on_event
        self._slots = asyncio.Semaphore(window)
        self._pacer = Pacer(rate) if rate else None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def stopped(self) -> bool:
        """True once a publish or an ack failed."""
        return self._result.error is not None

    def report(self, event: Event) -> None:
        """Count ``event`` and pass it to the event handler."""
        self._result.count(event)
        if self._on_event is not None:
            self._on_event(event)

    async def send(
        self, dl: DeadLetter, target: str, then: Callable[[], Awaitable[None]]
    ) -> aio_pika.Message | None:
        """Start publishing the copy of ``dl`` to ``target``; None if the sender has stopped."""
        await self._slots.acquire()
        if self._pacer is not None:
            await self._pacer.wait()
        if self.stopped:
            self._slots.release()
            return None
        message = build_message(dl)
        task = asyncio.create_task(self._publish(dl, message, target, then))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return message

    async def _publish(
        self,
        dl: DeadLetter,
        message: aio_pika.Message,
        target: str,
        then: Callable[[], Awaitable[None]],
    ) -> None:
        try:
            await self._publisher.publish(message, target)
        except PublishFailed as exc:
            self._result.error = self._result.error or str(exc)
            self.report(Event(dl, Outcome.FAILED, target, str(exc)))
            return
        finally:
            self._slots.release()
        try:
            await then()
        except Exception as exc:
            self._result.error = self._result.error or (
                f"replayed {dl.message_id!r} but could not remove it from the DLQ ({exc!r}); "
                "it stays there as a duplicate"
            )
        self.report(Event(dl, Outcome.REPLAYED, target))

    async def drain(self) -> None:
        """Wait for every publish started so far."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks))


def build_message(dl: DeadLetter, body: bytes | None = None) -> aio_pika.Message:
    """The replayed copy of ``dl`` (see :func:`qworker.dlq.records.replay_properties`)."""
    content, properties = replay_properties(dl, body)
    message = aio_pika.Message(content, **properties)
    if message.message_id is None:
        # A message id lets a canary be recognised if it dies again.
        message.message_id = uuid.uuid4().hex
    return message
