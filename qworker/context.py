"""What a handler learns about the delivery it is handling."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

PublishFunc = Callable[..., Awaitable[None]]


@dataclass(slots=True)
class Context:
    """The delivery a handler runs for. Take it by annotating a parameter ``ctx: Context``."""

    message_id: str | None
    correlation_id: str | None
    attempt: int
    """1-based: 1 on the first execution, 2 on the first retry, ..."""
    headers: Mapping[str, Any]
    queue: str
    log: structlog.typing.FilteringBoundLogger
    """A structlog logger bound to this delivery's ids, queue, handler and attempt."""
    _publish: PublishFunc

    async def publish(
        self,
        queue_or_routing_key: str,
        payload: Any,
        *,
        exchange: str = "",
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        correlation_id: str | None = None,
    ) -> None:
        """Publish with confirms, carrying this delivery's correlation id (or message id)."""
        await self._publish(
            queue_or_routing_key,
            payload,
            exchange=exchange,
            headers=headers,
            message_id=message_id,
            correlation_id=correlation_id or self.correlation_id or self.message_id,
        )
