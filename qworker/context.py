"""What a handler learns about the delivery it is handling."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog
from typing_extensions import Unpack

from qworker.publish import PublishOptions

PublishFunc = Callable[..., Awaitable[None]]


class Context:
    """The delivery a handler runs for. Take it by annotating a parameter ``ctx: Context``."""

    __slots__ = (
        "_base_log",
        "_log",
        "_publish",
        "attempt",
        "correlation_id",
        "headers",
        "message_id",
        "queue",
    )

    def __init__(
        self,
        *,
        message_id: str | None,
        correlation_id: str | None,
        attempt: int,
        headers: Mapping[str, Any],
        queue: str,
        base_log: structlog.typing.FilteringBoundLogger,
        publish: PublishFunc,
    ) -> None:
        self.message_id = message_id
        self.correlation_id = correlation_id
        self.attempt = attempt
        """1-based: 1 on the first execution, 2 on the first retry, ..."""
        self.headers = headers
        self.queue = queue
        self._base_log = base_log
        self._log: structlog.typing.FilteringBoundLogger | None = None
        self._publish = publish

    def __repr__(self) -> str:
        return (
            f"Context(queue={self.queue!r}, message_id={self.message_id!r}, "
            f"correlation_id={self.correlation_id!r}, attempt={self.attempt})"
        )

    @property
    def log(self) -> structlog.typing.FilteringBoundLogger:
        """A structlog logger bound to this delivery's ids, queue, handler and attempt."""
        if self._log is None:  # bound on first use: most handlers never log
            self._log = self._base_log.bind(
                message_id=self.message_id, correlation_id=self.correlation_id, attempt=self.attempt
            )
        return self._log

    async def publish(
        self, queue_or_routing_key: str, payload: Any, **options: Unpack[PublishOptions]
    ) -> None:
        """:meth:`qworker.App.publish`, carrying this delivery's correlation id (or, without
        one, its message id) unless ``correlation_id`` is given.

        Args:
            queue_or_routing_key: The queue (default exchange), or the routing key.
            payload: What to send.
            options: ``exchange``, ``headers``, ``message_id``, ``correlation_id``: see
                :class:`~qworker.publish.PublishOptions`.
        """
        if not options.get("correlation_id"):
            options["correlation_id"] = self.correlation_id or self.message_id
        await self._publish(queue_or_routing_key, payload, **options)
