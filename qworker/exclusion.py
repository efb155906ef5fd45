"""Running one handler's deliveries side by side, or one alone.

A delivery from the quarantine runs *alone*: no other delivery of its handler runs in this
process meanwhile, so that if the process dies, the quarantined delivery is the only one that
was running (and the only one whose crash count grows). Everything else runs *shared*, as
many at once as the concurrency allows. Waiting ``alone`` requests go first: once one waits,
no new shared run starts, so a quarantined delivery is not starved by a busy queue.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class Exclusion:
    """Shared and exclusive runs of one handler in one process (a readers-writer lock).

    ``async with exclusion.shared:`` and ``async with exclusion.alone():``. The shared side
    is on every delivery's path, so it is a plain object, not a generator context manager.
    """

    def __init__(self) -> None:
        self._running = 0
        self._alone = False
        self._waiting_alone = 0
        self._changed = asyncio.Condition()
        self.shared = _Shared(self)

    def _blocked(self) -> bool:
        return self._alone or self._waiting_alone > 0

    @contextlib.asynccontextmanager
    async def alone(self) -> AsyncIterator[None]:
        """Run with nothing else of this handler running."""
        async with self._changed:
            self._waiting_alone += 1
            try:
                await self._changed.wait_for(lambda: not self._alone and self._running == 0)
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
        of._running += 1

    async def __aexit__(self, *exc_info: object) -> None:
        of = self._of
        of._running -= 1
        if of._waiting_alone and of._running == 0:
            async with of._changed:
                of._changed.notify_all()
