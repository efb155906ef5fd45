"""Where a replayed dead letter may go: ``--to``, or its origin queue if that exists.

Headers are producer-controlled, so a target named by a header is only ever an
existing plain queue (see :func:`qworker.dlq.records.origin`), reached through
the default exchange; never an exchange, never the DLQ itself.
"""

from __future__ import annotations

from aio_pika.abc import AbstractConnection

from qworker.dlq.probes import queue_stat
from qworker.dlq.records import DeadLetter, Destination, origin, queue_name_problem
from qworker.errors import BadTarget, QueueNotFound


class Router:
    """Decides each dead letter's target: ``to`` if given, else its origin, if that queue exists.

    Existence is checked once per queue name with a passive declare.
    """

    def __init__(self, connection: AbstractConnection, to: str | None = None) -> None:
        self._connection = connection
        self._to = to
        self._exists: dict[str, bool] = {}

    async def check_to(self, dlq: str | None) -> None:
        """Refuse a ``to`` that is no plain queue name or is ``dlq``; QueueNotFound if missing."""
        if self._to is not None:
            problem = queue_name_problem(self._to, dlq)
            if problem is not None:
                raise BadTarget(f"--to: {problem}")
            await queue_stat(self._connection, self._to)  # exists? (one answer is enough)

    async def route(self, dl: DeadLetter) -> Destination:
        """Where ``dl`` goes, or why it cannot go anywhere."""
        if self._to is not None:
            problem = queue_name_problem(self._to, dl.queue)
            return Destination(None, problem) if problem else Destination(self._to)
        route = origin(dl)
        if route.queue is None:
            return route
        exists = self._exists.get(route.queue)
        if exists is None:
            exists = self._exists[route.queue] = await self._queue_exists(route.queue)
        return (
            route if exists else Destination(None, f"origin queue {route.queue!r} does not exist")
        )

    async def _queue_exists(self, name: str) -> bool:
        try:
            await queue_stat(self._connection, name)
        except QueueNotFound:
            return False
        return True
