"""Hooks: user coroutines called on retries and dead letters, never in the message's way.

A hook runs in its own task with a time limit. One that raises or hangs is
logged and forgotten: it cannot change the message's outcome nor slow the
consumer. When too many hook calls are pending (a hook far slower than the
failure rate), new ones are dropped with a warning instead of piling up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

from qworker.events import Observer, Outcome, OutcomeKind

Hook = Callable[[Outcome], Awaitable[None]]

DEFAULT_HOOK_TIMEOUT = 10.0
MAX_PENDING = 1000


class HookRunner(Observer):
    """Calls the ``on_retry`` and ``on_dead_letter`` hooks of an app."""

    def __init__(self, timeout: float = DEFAULT_HOOK_TIMEOUT, max_pending: int = MAX_PENDING):
        self.on_retry: list[Hook] = []
        self.on_dead_letter: list[Hook] = []
        self._timeout = timeout
        self._max_pending = max_pending
        self._pending: set[asyncio.Task[None]] = set()
        self._log = structlog.get_logger("qworker")

    def outcome(self, event: Outcome) -> None:
        if event.kind is OutcomeKind.RETRIED:
            hooks = self.on_retry
        elif event.kind is OutcomeKind.DEAD_LETTERED:
            hooks = self.on_dead_letter
        else:
            return
        for hook in hooks:
            if len(self._pending) >= self._max_pending:
                self._log.warning("hook.dropped", hook=_name(hook), message_id=event.message_id)
                continue
            task = asyncio.create_task(self._call(hook, event))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _call(self, hook: Hook, event: Outcome) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await hook(event)
        except TimeoutError:
            self._log.error("hook.timed_out", hook=_name(hook), timeout=self._timeout)
        except Exception:
            self._log.exception("hook.failed", hook=_name(hook), message_id=event.message_id)

    async def wait(self, grace: float) -> None:
        """Give pending hook calls up to ``grace`` seconds (used when a worker stops)."""
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=grace)


def _name(hook: Hook) -> str:
    return f"{getattr(hook, '__module__', '?')}:{getattr(hook, '__qualname__', repr(hook))}"
