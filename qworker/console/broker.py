"""The console's one AMQP connection: made when first needed, made again after a loss.

Requests share it (the DLQ library opens a channel of its own per pass). When the
broker does not answer, the request gets :class:`~qworker.console.errors.Unavailable`
at once, and the next attempt to connect waits for a back-off that doubles from
one second to thirty: however many browser tabs refresh, the console tries at most
once per back-off, so a down broker is never stormed with reconnects.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from aio_pika.abc import AbstractConnection

from qworker.connection import close_quietly, connect_once
from qworker.console.errors import Unavailable
from qworker.errors import BrokerUnavailable

#: The first and the longest wait between two attempts to connect, in seconds.
FIRST_WAIT = 1.0
LONGEST_WAIT = 30.0
#: How long one attempt may take (a console request should not hang on a dead host).
CONNECT_TIMEOUT = 5.0


class BrokerLink:
    """Hands out an open connection to the broker, or says why there is none.

    Args:
        urls: Broker URLs (cluster nodes); the first that accepts wins.
        ca_file: CA bundle for ``amqps://`` URLs (None: the system's).
    """

    def __init__(self, urls: Sequence[str], ca_file: str | None = None) -> None:
        self.urls = list(urls)
        self._ca_file = ca_file
        self._connection: AbstractConnection | None = None
        self._lock = asyncio.Lock()
        self._wait = 0.0
        self._next_try = 0.0
        self._problem = ""

    async def connection(self) -> AbstractConnection:
        """The open connection; connects first if there is none (within the back-off).

        Raises:
            Unavailable: the broker did not answer now, or did not at the last attempt
                and the back-off has not run out yet.
        """
        current = self._connection
        if current is not None and _usable(current):
            return current
        async with self._lock:
            current = self._connection
            if current is not None:
                if _usable(current):
                    return current
                self._connection = None
                await close_quietly(current)
            now = time.monotonic()
            if now < self._next_try:
                raise Unavailable(f"{self._problem} (next attempt in {self._next_try - now:.0f} s)")
            try:
                self._connection = await connect_once(
                    self.urls,
                    ca_file=self._ca_file,
                    name="qworker-console",
                    timeout=CONNECT_TIMEOUT,
                )
            except BrokerUnavailable as exc:
                self._wait = min(LONGEST_WAIT, self._wait * 2 or FIRST_WAIT)
                self._next_try = time.monotonic() + self._wait
                self._problem = str(exc)
                raise Unavailable(self._problem) from None
            self._wait = 0.0
            return self._connection

    async def close(self) -> None:
        """Close the connection, if any."""
        if self._connection is not None:
            await close_quietly(self._connection)
            self._connection = None


def _usable(connection: AbstractConnection) -> bool:
    """Open and still connected. ``is_closed`` alone is not enough: aio-pika sets it only
    when the client closes; a connection the broker closed (or a node that died) only
    clears ``connected``, and every ``channel()`` on it then raises ``RuntimeError``."""
    return not connection.is_closed and connection.connected.is_set()
