"""Running a handler for one delivery: its context, time limit and immediate retries.

No acking or publishing here: :mod:`qworker.verdict` decides what the result means.
Each failed execution is classified exactly once, here (``decide``), and the last
decision travels on the :class:`~qworker.verdict.Run`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import structlog
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt

from qworker.classify import Action, Decision
from qworker.context import Context, PublishFunc
from qworker.delivery import Delivery
from qworker.errors import HandlerTimeout
from qworker.failures import Failure
from qworker.handler import Handler, HandlerFunc
from qworker.verdict import Run

Decide = Callable[[Exception, int], Decision]
"""Classify a failed execution: (exception, 1-based attempt number) -> decision."""


class Runner:
    """Calls one handler (or its fallback) the way its options say."""

    def __init__(
        self,
        handler: Handler,
        decide: Decide,
        publish: PublishFunc,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self._handler = handler
        self._decide = decide
        self._publish = publish
        self._log = log

    async def run(self, payload: Any, message: Delivery, failed_before: int) -> Run:
        """Run once, or up to 1 + ``immediate`` times while failures are transient.

        A failed run carries the decision of its last failure. Cancellation (the
        worker's grace period ran out) is never retried: it propagates at once.
        """
        retry = self._handler.options.retry
        allowed = max(1, min(retry.executions_per_delivery, retry.max_attempts - failed_before))
        started = time.perf_counter()
        attempt = failed_before + 1
        if allowed == 1:
            try:
                await self.call(self._handler.func, payload, message, attempt)
            except Exception as exc:
                elapsed = time.perf_counter() - started
                return Run(attempt, exc, elapsed, self._decide(exc, attempt))
            return Run(attempt, None, time.perf_counter() - started)
        failures: list[Failure] = []
        decisions: list[Decision] = []
        try:
            await self._with_immediate_retries(
                payload, message, failed_before, allowed, failures, decisions
            )
        except Exception as exc:
            attempt = failed_before + len(failures)
            # tenacity asks about every failure, so the last decision is this one's.
            decision = decisions[-1] if decisions else self._decide(exc, attempt)
            return Run(attempt, exc, time.perf_counter() - started, decision, failures[:-1])
        return Run(failed_before + len(failures) + 1, None, time.perf_counter() - started)

    async def call(self, func: HandlerFunc, payload: Any, message: Delivery, attempt: int) -> None:
        """Await ``func`` (the handler or its fallback) within the handler's time limit."""
        handler = self._handler
        args: tuple[Any, ...] = (payload,)
        if handler.wants_context:
            args = (payload, self.context(message, attempt))
        if handler.options.timeout is None:
            await func(*args)
            return
        try:
            async with asyncio.timeout(handler.options.timeout) as deadline:
                await func(*args)
        except TimeoutError:
            if deadline.expired():
                raise HandlerTimeout(
                    f"handler exceeded its {handler.options.timeout:g}s timeout"
                ) from None
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
        failures: list[Failure],
        decisions: list[Decision],
    ) -> None:
        """Run up to ``allowed`` times while failures are worth retrying in-process (tenacity)
        and the delivery's channel is open.

        Every failure is appended to ``failures`` and its decision to ``decisions``,
        the last one included.
        """

        def worth_retrying(exc: BaseException) -> bool:
            if not isinstance(exc, Exception):  # CancelledError, KeyboardInterrupt: never
                return False
            decision = self._decide(exc, failed_before + len(failures))
            decisions.append(decision)
            immediate = decision.action is Action.RETRY and decision.requested_delay is None
            # Not once the delivery's channel closed: the broker has the message back, and a
            # run here would only duplicate the one its redelivery gets.
            return immediate and message.channel_open

        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(allowed), retry=retry_if_exception(worth_retrying), reraise=True
        ):
            with attempt:
                number = failed_before + len(failures) + 1
                try:
                    await self.call(self._handler.func, payload, message, number)
                except Exception as exc:
                    failures.append(Failure.from_exception(number, exc))
                    raise
