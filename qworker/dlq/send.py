"""Publishing replayed copies fast, paced and confirmed, and counting what happened.

A dead letter is acked only after the broker confirmed its replayed copy, so an
interrupted replay leaves every message in the DLQ, in its target queue, or
(between the confirm and the ack) in both; never in neither.

A failure that belongs to one message is contained to it: a copy that cannot be
encoded (checked before publishing), that the broker refuses (``basic.nack``,
e.g. a full ``reject-publish`` queue) or returns as unroutable, or that makes
the broker close the channel (e.g. a body over its ``max_message_size``) is
counted, reported with its reason, and left in the DLQ, and the replay goes on
(on a fresh channel if needed). Only failures that say nothing about one message
stop it: a confirm that never came (the copy may or may not be in its queue), a
lost connection, an ack that could not be sent, or channels lost again and again.
"""

from __future__ import annotations

import asyncio
import enum
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aio_pika
import pamqp.frame
import pamqp.header

from qworker import headers as h
from qworker.dlq.cursor import ScanReport
from qworker.dlq.records import DeadLetter, replay_properties
from qworker.errors import PublishFailed
from qworker.failures import truncate
from qworker.publish import ConfirmedPublisher

if TYPE_CHECKING:
    from qworker.tracing import Tracing

#: Publishes awaiting their confirm at once.
DEFAULT_WINDOW = 100
#: Publishing channels lost one after the other (no confirm in between) before a replay stops.
CHANNEL_LOSSES = 3
#: What :class:`~qworker.publish.ConfirmedPublisher` says when no confirm came: the copy
#: may be in its queue, so this is not a per-message refusal and stops the replay.
_NO_CONFIRM = "no confirm within"

Reopen = Callable[[], Awaitable[ConfirmedPublisher]]


class ReplayOutcome(enum.Enum):
    """What happened to one selected dead letter."""

    REPLAYED = "replayed"  #: confirmed in its target queue and removed from the DLQ
    PLANNED = "planned"  #: dry run: would be replayed
    SKIPPED = "skipped"  #: no acceptable target, or cannot be encoded; stays in the DLQ
    FAILED = "failed"  #: the copy was refused or not confirmed; stays in the DLQ


@dataclass(frozen=True, slots=True)
class Event:
    """One selected dead letter and its outcome; ``detail`` says why it was skipped or failed."""

    dead_letter: DeadLetter
    outcome: ReplayOutcome
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
    ``replay_id``: the id written to every copy (``x-qworker-replay-id``) and to the
    audit record (None for a dry run, which writes neither).
    """

    replayed: int = 0
    planned: int = 0
    skipped: int = 0
    failed: int = 0
    error: str | None = None
    canary: Canary | None = None
    dead_canaries: list[str] = field(default_factory=list)
    reports: list[ScanReport] = field(default_factory=list)
    replay_id: str | None = None

    @property
    def outcome(self) -> str:
        """The outcome as the audit trail records it: ``ok``, ``canary-failed: ...``,
        ``partial`` (some selected messages skipped or refused) or ``error: ...``."""
        if self.error is not None:
            return f"error: {self.error}"
        if self.canary is Canary.DIED:
            return f"canary-failed: {', '.join(self.dead_canaries[:20])} dead-lettered again"
        if self.canary is Canary.TIMED_OUT:
            return "canary-failed: not handled in time"
        return "partial" if self.skipped + self.failed else "ok"

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
    letter). A failure of one message is reported (``FAILED`` or ``SKIPPED``)
    and the others go on; when the publishing channel was closed, ``reopen``
    gives a fresh publisher. A failure that is not one message's (see the module
    docstring) stops it: later :meth:`send` calls return None.

    Args:
        publisher: Publishes the copies (confirm mode).
        result: Where the outcome of each message is counted.
        on_event: Called with every :class:`Event`.
        window: Publishes awaiting their confirm at once.
        rate: Copies per second at most (None: as fast as confirms come).
        reopen: Gives a fresh publisher after the broker closed the channel.
        replay_id: Written to every copy (``x-qworker-replay-id``).
        tracing: When tracing is on: each copy is published inside a ``replay`` span that
            links to the dead letter's trace (see :meth:`qworker.tracing.Tracing.replaying`).
    """

    def __init__(
        self,
        publisher: ConfirmedPublisher,
        result: ReplayResult,
        on_event: EventHandler | None,
        *,
        window: int = DEFAULT_WINDOW,
        rate: float | None = None,
        reopen: Reopen | None = None,
        replay_id: str | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self._publisher = publisher
        self._replay_id = replay_id
        self._tracing = tracing
        self._reopen = reopen
        self._reopening = asyncio.Lock()
        self._losses = 0
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
        try:
            message = replay_message(dl, replay_id=self._replay_id)
            problem = encoding_problem(message)
        except Exception as exc:  # a record no message can be built from
            message, problem = None, f"cannot build the copy: {_one_line(exc)}"
        if message is None or problem is not None:
            self._slots.release()
            self.report(Event(dl, ReplayOutcome.SKIPPED, target, problem))
            return None
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
        publisher = self._publisher
        try:
            if self._tracing is None:
                await publisher.publish(message, target)
            else:
                dead, copy = dl.headers, message.headers
                with self._tracing.replaying(
                    dead, copy, dl.queue, target, message.message_id, self._replay_id
                ):
                    await publisher.publish(message, target)
        except Exception as exc:
            detail = _one_line(exc) if isinstance(exc, PublishFailed) else _describe(exc)
            self.report(Event(dl, ReplayOutcome.FAILED, target, detail))
            await self._after_failure(publisher, detail)
            return
        finally:
            self._slots.release()
        self._losses = 0
        try:
            await then()
        except Exception as exc:
            self._result.error = self._result.error or (
                f"replayed {dl.message_id!r} but could not remove it from the DLQ ({exc!r}); "
                "it stays there as a duplicate"
            )
        self.report(Event(dl, ReplayOutcome.REPLAYED, target))

    async def _after_failure(self, publisher: ConfirmedPublisher, detail: str) -> None:
        """Go on after one message failed, on a fresh channel if the broker closed it."""
        if detail.startswith(_NO_CONFIRM):
            self._result.error = self._result.error or detail
            return
        if not publisher.channel.is_closed:
            return  # refused or returned: that message's problem only
        async with self._reopening:
            if self._publisher is not publisher:
                return  # another failure of the same channel reopened it already
            self._losses += 1
            if self._reopen is None or self._losses >= CHANNEL_LOSSES:
                self._result.error = self._result.error or (
                    f"the publishing channel was lost {self._losses} times in a row: {detail}"
                )
                return
            try:
                self._publisher = await self._reopen()
            except Exception as exc:
                self._result.error = self._result.error or (
                    f"cannot open a new publishing channel: {_describe(exc)}"
                )

    async def drain(self) -> None:
        """Wait for every publish started so far."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks))


def replay_message(
    dl: DeadLetter, body: bytes | None = None, *, replay_id: str | None = None
) -> aio_pika.Message:
    """The replayed copy of ``dl`` (see :func:`qworker.dlq.records.replay_properties`),
    carrying ``replay_id`` in ``x-qworker-replay-id`` when given."""
    content, properties = replay_properties(dl, body)
    if replay_id:
        # replay_headers dropped any earlier replay's id (a foreign x-qworker-* header).
        properties["headers"][h.REPLAY_ID] = truncate(replay_id, 64)
    message = aio_pika.Message(content, **properties)
    if message.message_id is None:
        # A message id lets a canary be recognised if it dies again.
        message.message_id = uuid.uuid4().hex
    return message


def encoding_problem(message: aio_pika.Message) -> str | None:
    """Why ``message``'s properties and headers cannot be put on the wire, or None.

    The same encoder the client uses (pamqp) runs here, before publishing, so a
    value it refuses (e.g. a float out of range, an integer over 64 bits) is one
    message's problem instead of an exception in the middle of a replay.
    """
    try:
        pamqp.frame.marshal(pamqp.header.ContentHeader(1, len(message.body), message.properties), 1)
    except Exception as exc:
        return f"cannot be encoded for publishing: {_describe(exc)}"
    return None


def unpublishable(dl: DeadLetter) -> str | None:
    """Why the copy of ``dl`` cannot be published, or None (see :func:`encoding_problem`)."""
    try:
        return encoding_problem(replay_message(dl))
    except Exception as exc:
        return f"cannot build the copy: {_describe(exc)}"


def _describe(exc: BaseException) -> str:
    return _one_line(f"{type(exc).__name__}: {exc}")


def _one_line(value: object) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= 300 else text[:299] + "…"
