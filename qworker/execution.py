"""Running a handler for one delivery: its context, time limit and immediate retries.

No acking or publishing here: the consumer decides what the result means.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt

from qworker import headers as h
from qworker.context import Context, PublishFunc
from qworker.delivery import Delivery
from qworker.errors import HandlerTimeout
from qworker.handler import Handler, HandlerFunc


@dataclass(slots=True)
class Run:
    """What happened when a handler ran for a delivery."""

    attempt: int
    """1-based number of the last execution."""
    error: Exception | None
    """The last execution's error; None on success."""
    duration: float
    earlier: list[h.Failure] = field(default_factory=list)
    """In-process (immediate) failures before the last execution."""


class Runner:
    """Calls one handler (or its fallback) the way its options say."""

    def __init__(
        self,
        handler: Handler,
        retry_in_process: Callable[[BaseException, int], bool],
        publish: PublishFunc,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self._handler = handler
        self._retry_in_process = retry_in_process
        self._publish = publish
        self._log = log

    async def run(self, payload: Any, message: Delivery, failed_before: int) -> Run:
        """Run once, or up to 1 + ``immediate`` times while failures are transient."""
        retry = self._handler.retry
        allowed = max(1, min(retry.executions_per_delivery, retry.max_attempts - failed_before))
        started = time.perf_counter()
        if allowed == 1:
            try:
                await self.call(self._handler.func, payload, message, failed_before + 1)
            except Exception as exc:
                return Run(failed_before + 1, exc, time.perf_counter() - started)
            return Run(failed_before + 1, None, time.perf_counter() - started)
        failures: list[h.Failure] = []
        try:
            await self._with_immediate_retries(payload, message, failed_before, allowed, failures)
        except Exception as exc:
            attempt = failed_before + len(failures)
            return Run(attempt, exc, time.perf_counter() - started, failures[:-1])
        return Run(failed_before + len(failures) + 1, None, time.perf_counter() - started)

    async def call(self, func: HandlerFunc, payload: Any, message: Delivery, attempt: int) -> None:
        """Await ``func`` (the handler or its fallback) within the handler's time limit."""
        handler = self._handler
        args: tuple[Any, ...] = (payload,)
        if handler.wants_context:
            args = (payload, self.context(message, attempt))
        if handler.timeout is None:
            await func(*args)
            return
        try:
            async with asyncio.timeout(handler.timeout) as deadline:
                await func(*args)
        except TimeoutError:
            if deadline.expired():
                raise HandlerTimeout(f"handler exceeded its {handler.timeout:g}s timeout") from None
            raise

    def context(self, message: Delivery, attempt: int) -> Context:
        """The :class:`Context` a handler sees for ``message``."""
        return Context(
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            attempt=attempt,
            headers=message.headers or {},
            queue=self._handler.queue,
            base_log=self._log,
            publish=self._publish,
        )

    async def _with_immediate_retries(
        self,
        payload: Any,
        message: Delivery,
        failed_before: int,
        allowed: int,
        failures: list[h.Failure],
    ) -> None:
        """Run up to ``allowed`` times while failures are worth retrying in-process (tenacity).

        Every failure is appended to ``failures``, the last one included.
        """

        def worth_retrying(exc: BaseException) -> bool:
            return self._retry_in_process(exc, failed_before + len(failures))

        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(allowed), retry=retry_if_exception(worth_retrying), reraise=True
        ):
            with attempt:
                number = failed_before + len(failures) + 1
                try:
                    await self.call(self._handler.func, payload, message, number)
                except Exception as exc:
                    failures.append(h.Failure.from_exception(number, exc))
                    raise
