"""Running one handler's deliveries side by side, or one alone.

A delivery from the quarantine runs *alone*: no other delivery of its handler runs in this
process meanwhile, so that if the process dies, the quarantined delivery is the only one that
was running (and the only one whose crash count grows). Everything else runs *shared*, as
many at once as the concurrency allows. Waiting ``alone`` requests go first: once one waits,
no new shared run starts, so a quarantined delivery is not starved by a busy queue.

A shared run whose channel died (:meth:`Exclusion.orphan`) no longer counts: its delivery is
back in the broker already, and a handler that hangs there must not keep the quarantine (and
with it the whole handler) waiting until its time limit.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any


class Exclusion:
    """Shared and exclusive runs of one handler in one process (a readers-writer lock).

    ``async with exclusion.shared:`` and ``async with exclusion.alone():``. The shared side
    is on every delivery's path, so it is a plain object, not a generator context manager.
    """

    def __init__(self) -> None:
        self._running: set[asyncio.Task[Any]] = set()
        self._orphans: set[asyncio.Task[Any]] = set()
        self._alone = False
        self._waiting_alone = 0
        self._changed = asyncio.Condition()
        self._notifying: asyncio.Future[None] | None = None
        self._quarantined = asyncio.Event()
        self.shared = _Shared(self)

    def _blocked(self) -> bool:
        return self._alone or self._waiting_alone > 0

    def _counted(self) -> int:
        return len(self._running) - len(self._orphans)

    def orphan(self, task: asyncio.Task[Any]) -> None:
        """``task``'s channel died: its shared run no longer keeps alone runs waiting."""
        if task in self._running and task not in self._orphans:
            self._orphans.add(task)
            if self._waiting_alone and self._counted() == 0:
                self._notifying = asyncio.ensure_future(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def wake(self) -> None:
        """A delivery of this handler was just quarantined: the quarantine poller may look."""
        self._quarantined.set()

    async def quarantined(self, timeout: float) -> None:  # noqa: ASYNC109
        """Wait up to ``timeout`` seconds, or until :meth:`wake` is called."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._quarantined.wait(), timeout)
        self._quarantined.clear()

    @contextlib.asynccontextmanager
    async def alone(self) -> AsyncIterator[None]:
        """Run with nothing else of this handler running."""
        async with self._changed:
            self._waiting_alone += 1
            try:
                await self._changed.wait_for(lambda: not self._alone and self._counted() == 0)
            finally:
                self._waiting_alone -= 1
            self._alone = True
        try:
            yield
        finally:
            async with self._changed:
                self._alone = False
                self._changed.notify_all()


class _Shared:
    """The shared side of an :class:`Exclusion`."""

    __slots__ = ("_of",)

    def __init__(self, of: Exclusion) -> None:
        self._of = of

    async def __aenter__(self) -> None:
        of = self._of
        if of._blocked():
            async with of._changed:
                await of._changed.wait_for(lambda: not of._blocked())
        task = asyncio.current_task()
        assert task is not None
        of._running.add(task)

    async def __aexit__(self, *exc_info: object) -> None:
        of = self._of
        task = asyncio.current_task()
        of._running.discard(task)
        of._orphans.discard(task)
        if of._waiting_alone and of._counted() == 0:
            async with of._changed:
                of._changed.notify_all()
