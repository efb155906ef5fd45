"""The one place that acks, nacks, and moves failed messages with confirms.

A :class:`Consumer` serves one handler queue on one channel. For each delivery
it decodes the payload, runs the handler (see :mod:`qworker.execution`), and on
failure publishes a copy (to a retry tier or the DLQ), waits for the broker's
confirm, and only then acks the original. When the copy is not confirmed, it
backs off and returns the original with ``basic.nack``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection

from qworker import headers as h
from qworker.breaker import Circuit
from qworker.classify import Action, Classification, Classifier, Decision, Reason, classify, decide
from qworker.context import PublishFunc
from qworker.delivery import Delivery
from qworker.events import CircuitState, Observer, Outcome, OutcomeKind, severity_of
from qworker.execution import Run, Runner
from qworker.flow import Gate, Route
from qworker.handler import Handler
from qworker.publish import ConfirmedPublisher
from qworker.retry import plan_retry, tier_name
from qworker.topology import declare, dlq_name, retry_queue, retry_queue_name

_MAX_BACKOFF = 30.0
_FALLBACK_REASONS = (Reason.RETRIES_EXHAUSTED, Reason.TIMEOUT)
_NO_PAYLOAD = object()


@dataclass(frozen=True, slots=True)
class Policy:
    """App-wide settings the consumer applies to every handler."""

    classifier: Classifier | None
    default: Classification
    worker_id: str
    observers: Sequence[Observer] = ()


class Consumer:
    """Runs one handler for the deliveries of its queue."""

    def __init__(
        self,
        handler: Handler,
        policy: Policy,
        connection: AbstractConnection,
        publisher: ConfirmedPublisher,
        publish: PublishFunc,
        concurrency: int,
        circuit: Circuit | None = None,
    ) -> None:
        self.handler = handler
        self._policy = policy
        self._connection = connection
        self._publisher = publisher
        self._slots = asyncio.Semaphore(concurrency)
        self._tiers = set(handler.retry.tiers())
        self._log = structlog.get_logger("qworker").bind(queue=handler.queue, handler=handler.name)
        self._runner = Runner(handler, self._retry_in_process, publish, self._log)
        self._circuit = circuit
        self._gate: Gate | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._publish_failures = 0
        self._resume_at = 0.0
        self._observers = tuple(policy.observers)
        self.in_flight = 0

    @property
    def consuming(self) -> bool:
        """A consumer is attached to the queue (false while the breaker holds it off)."""
        return self._gate is not None and self._gate.consuming

    async def start(self, channel: AbstractChannel, prefetch: int) -> None:
        """Start consuming the handler's queue on ``channel``."""
        self._gate = Gate(
            channel,
            self.handler.queue,
            prefetch,
            self._circuit,
            self.handler.fallback is not None,
            self._circuit_changed,
        )
        await self._gate.start(self.on_message)

    # Delivery lifecycle

    def on_message(self, message: Delivery) -> None:
        """Hand the delivery to a task of our own.

        aiormq cancels its consumer tasks when the channel closes; our own task
        lets a running handler finish after a connection loss.
        """
        task = asyncio.create_task(self._guarded(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guarded(self, message: Delivery) -> None:
        async with self._slots:
            if self._stopping:
                await self._settle(message, requeue=True, event="message.returned_on_stop")
                return
            if (pause := self._resume_at - time.monotonic()) > 0:
                await asyncio.sleep(pause)
            self._count_in_flight(+1)
            try:
                await self._process(message)
            except asyncio.CancelledError:
                # Grace period over: the handler did not finish; give the message back.
                await asyncio.shield(
                    self._settle(message, requeue=True, event="message.returned_on_stop")
                )
                raise
            except Exception:
                # A bug of ours must not kill the consumer nor lose the message.
                self._log.exception("message.internal_error", message_id=message.message_id)
                await self._settle(message, requeue=True, event="message.returned")
            finally:
                self._count_in_flight(-1)

    async def _process(self, message: Delivery) -> None:
        handler = self.handler
        failed_before = h.read_attempt(message.headers)
        try:
            payload = handler.decode(message.body, message.content_type, message.content_encoding)
        except Exception as exc:
            await self._fail(message, Run(failed_before + 1, exc, 0.0))
            return
        route = self._gate.route() if self._gate is not None else Route.PRIMARY
        if route is Route.RETURN:
            await self._settle(message, requeue=True, event="message.returned_circuit_open")
            return
        if route is Route.FALLBACK:
            await self._fallback(message, payload, Run(failed_before + 1, None, 0.0))
            return
        run = await self._runner.run(payload, message, failed_before)
        self._count_for_breaker(run, probe=route is Route.PROBE)
        if run.error is not None:
            await self._fail(message, run, payload)
            return
        await self._settle(message, event="message.succeeded")
        if self._observers:
            self._emit_success(message, run)

    async def _fallback(self, message: Delivery, payload: Any, run: Run) -> bool:
        """Serve ``message`` with the fallback; False (nothing settled) if the fallback failed."""
        fallback = self.handler.fallback
        assert fallback is not None
        try:
            await self._runner.call(fallback, payload, message, run.attempt)
        except Exception as exc:
            self._log.error(
                "message.fallback_failed",
                message_id=message.message_id,
                error=f"{h.error_type_name(exc)}: {h.ErrorInfo.from_exception(exc).message}",
            )
            if run.error is None:  # the breaker sent it here: it fails like a handler would
                await self._fail(message, Run(run.attempt, exc, run.duration), _NO_PAYLOAD)
                return True
            return False
        await self._settle(message, event=None)
        self._log.info("message.fallback_served", message_id=message.message_id)
        if self._observers:
            self._emit_success(message, run)
        return True

    def _retry_in_process(self, exc: BaseException, attempt: int) -> bool:
        decision = self._decide(exc, attempt)
        return decision.action is Action.RETRY and decision.requested_delay is None

    # Circuit breaker

    def _count_for_breaker(self, run: Run, *, probe: bool) -> None:
        gate = self._gate
        if gate is None or self._circuit is None:
            return
        if run.error is None:
            gate.record(True, probe=probe)
        elif self._decide(run.error, run.attempt).classification is Classification.TRANSIENT:
            gate.record(False, probe=probe)
        elif probe:
            gate.probe_settled()

    def _circuit_changed(self, state: CircuitState) -> None:
        self._log.warning(f"circuit.{state.value}", state=state.value)
        for observer in self._observers:
            try:
                observer.circuit(self.handler.queue, self.handler.name, state)
            except Exception:
                self._log.exception("observer.failed", observer=type(observer).__name__)

    # Observers

    def _count_in_flight(self, delta: int) -> None:
        self.in_flight += delta
        for observer in self._observers:
            try:
                observer.in_flight(self.handler.queue, self.in_flight)
            except Exception:
                self._log.exception("observer.failed", observer=type(observer).__name__)

    def _emit(self, outcome: Outcome) -> None:
        for observer in self._observers:
            try:
                observer.outcome(outcome)
            except Exception:
                self._log.exception("observer.failed", observer=type(observer).__name__)

    def _emit_success(self, message: Delivery, run: Run) -> None:
        handler = self.handler
        self._emit(
            Outcome(
                OutcomeKind.SUCCEEDED,
                handler.queue,
                handler.name,
                message.message_id,
                run.attempt,
                run.duration,
            )
        )

    # Failure path

    def _decide(self, exc: BaseException, attempt: int) -> Decision:
        handler = self.handler
        classification = classify(
            exc,
            permanent=handler.permanent,
            transient=handler.transient,
            classifier=self._policy.classifier,
            default=self._policy.default,
        )
        return decide(exc, classification, attempt, handler.retry.max_attempts)

    async def _fail(self, message: Delivery, run: Run, payload: Any = _NO_PAYLOAD) -> None:
        """Retry or dead-letter ``message`` after ``run`` failed (fallback first, if it applies)."""
        exc = run.error
        assert exc is not None
        attempt = run.attempt
        decision = self._decide(exc, attempt)
        if (
            decision.reason in _FALLBACK_REASONS
            and self.handler.fallback is not None
            and payload is not _NO_PAYLOAD
            and await self._fallback(message, payload, run)
        ):
            return
        error = h.ErrorInfo.from_exception(exc)
        log = self._log.bind(
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            attempt=attempt,
            error_type=error.error_type,
            error_message=error.message,
            classification=decision.classification.value,
        )
        origin = h.Origin(
            queue=self.handler.queue,
            handler=self.handler.name,
            exchange=message.exchange or "",
            routing_key=message.routing_key or "",
            worker=self._policy.worker_id,
        )
        incoming: dict[str, Any] = dict(message.headers or {})
        if run.earlier:
            incoming[h.HISTORY] = [
                *(f.to_header() for f in h.read_history(incoming)),
                *(f.to_header() for f in run.earlier),
            ]
        reason = decision.reason.value if decision.reason else None
        new_headers = h.failure_headers(
            incoming,
            error=error,
            attempt=attempt,
            classification=decision.classification.value,
            origin=origin,
            reason=reason,
        )
        if decision.action is Action.RETRY:
            plan = plan_retry(
                self.handler.retry,
                attempt,
                requested_delay=decision.requested_delay,
                random_fraction=random.random(),
            )
            target = retry_queue_name(self.handler.queue, plan.tier_ms)
            moved = await self._move(
                message,
                target,
                new_headers,
                plan.expiration_ms,
                log,
                lambda: self._ensure_tier(plan.tier_ms),
            )
            if not moved:
                return
            log.warning("message.retry_scheduled", delay=plan.wait_seconds, tier=target)
            kind, tier = OutcomeKind.RETRIED, tier_name(plan.tier_ms)
        else:
            target = dlq_name(self.handler.queue)
            if not await self._move(message, target, new_headers, None, log, None):
                return
            log.error("message.dead_lettered", reason=reason, dlq=target)
            kind, tier = OutcomeKind.DEAD_LETTERED, None
        if self._observers:
            self._emit(
                Outcome(
                    kind,
                    self.handler.queue,
                    self.handler.name,
                    message.message_id,
                    attempt,
                    run.duration,
                    severity=severity_of(kind, reason, self.handler.severity),
                    error_type=error.error_type,
                    error_message=error.message,
                    classification=decision.classification.value,
                    reason=reason,
                    tier=tier,
                )
            )

    async def _ensure_tier(self, tier_ms: int) -> None:
        if tier_ms not in self._tiers:
            await declare(
                self._connection,
                [retry_queue(self.handler.queue, tier_ms, self.handler.queue_type)],
            )
            self._tiers.add(tier_ms)

    async def _move(
        self,
        message: Delivery,
        target: str,
        new_headers: dict[str, Any],
        expiration_ms: int | None,
        log: structlog.typing.FilteringBoundLogger,
        prepare: Callable[[], Awaitable[None]] | None,
    ) -> bool:
        """Publish the copy to ``target`` with confirms, then ack; on doubt back off and nack."""
        properties = message.copy_properties(new_headers, expiration_ms)
        try:
            if prepare is not None:
                await prepare()
            await self._publisher.publish_body(message.body, properties, target)
        except Exception as exc:  # PublishFailed, or the tier could not be declared
            now = time.monotonic()
            if now >= self._resume_at:
                # Concurrent failures within one pause are one outage, not a longer one:
                # only a failure after the pause has run out doubles the next pause.
                self._publish_failures += 1
            pause = min(_MAX_BACKOFF, 0.5 * 2 ** (self._publish_failures - 1))
            self._resume_at = max(self._resume_at, now + pause)
            log.error("message.move_failed", target=target, error=str(exc), backoff=pause)
            await asyncio.sleep(pause)
            await self._settle(message, requeue=True, event="message.returned")
            return False
        self._publish_failures = 0
        await self._settle(message, event=None)
        return True

    async def _settle(
        self, message: Delivery, *, requeue: bool | None = None, event: str | None
    ) -> None:
        """Ack (``requeue`` None) or nack; a lost channel means the broker redelivers it."""
        try:
            if requeue is None:
                await message.ack()
            else:
                await message.nack(requeue=requeue)
        except Exception as exc:
            self._log.warning(
                "message.settle_lost",
                message_id=message.message_id,
                action="ack" if requeue is None else "nack",
                error=repr(exc),
                note="channel closed; the broker will redeliver the message",
            )
            return
        if event is not None:
            self._log.debug(event, message_id=message.message_id)

    # Stopping

    async def stop_taking(self) -> None:
        """Cancel the consumer; deliveries not yet started are returned instead of run."""
        self._stopping = True
        if self._gate is not None:
            await self._gate.stop()

    async def drain(self, grace: float) -> int:
        """Wait up to ``grace`` s for running handlers, then cancel the rest; returns how many."""
        pending = set(self._tasks)
        if not pending:
            return 0
        _, still = await asyncio.wait(pending, timeout=grace)
        for task in still:
            task.cancel()
        if still:
            await asyncio.wait(still, timeout=5)
        return len(still)
