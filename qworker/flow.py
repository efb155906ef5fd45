"""Whether a queue is consumed, steered by the handler's circuit breaker.

Closed breaker (or none): consume normally. Open: without a fallback, stop
consuming (``basic.cancel``) so the messages wait in the broker and burn no
retries; with a fallback, keep consuming and serve every message with it.
After the cool-down, half-open: one probe delivery runs the real handler
(prefetch 1 without a fallback); its success closes the breaker.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from enum import Enum

from aio_pika.abc import AbstractChannel
from aiormq.abc import DeliveredMessage

from qworker.breaker import Circuit
from qworker.delivery import Delivery
from qworker.events import CircuitState

OnMessage = Callable[[Delivery], None]


class Route(Enum):
    """What to do with one delivery."""

    PRIMARY = "primary"
    """Run the handler."""
    PROBE = "probe"
    """Run the handler as the half-open breaker's single probe."""
    FALLBACK = "fallback"
    """Breaker open, fallback configured: serve with the fallback."""
    RETURN = "return"
    """Breaker open, no fallback: give the message back to the broker."""


class Gate:
    """Consumption of one queue on one channel."""

    def __init__(
        self,
        channel: AbstractChannel,
        queue: str,
        prefetch: int,
        circuit: Circuit | None,
        has_fallback: bool,
        on_change: Callable[[CircuitState], None],
    ) -> None:
        self._channel = channel
        self._queue = queue
        self._prefetch = prefetch
        self._circuit = circuit
        self._has_fallback = has_fallback
        self._on_change = on_change
        self._on_message: OnMessage | None = None
        self._tag: str | None = None
        self._probing = False
        self._stopped = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, on_message: OnMessage) -> None:
        """Start consuming as the breaker's state allows."""
        self._on_message = on_message
        circuit = self._circuit
        if circuit is None or circuit.state is CircuitState.CLOSED or self._has_fallback:
            await self._consume(probe=False)
            if circuit is not None and circuit.state is CircuitState.OPEN:
                self._spawn(self._probe_after_cooldown())
        elif circuit.state is CircuitState.HALF_OPEN:
            await self._consume(probe=True)
        else:
            self._spawn(self._probe_after_cooldown())

    def route(self) -> Route:
        """Decide how to treat the next delivery (marks the probe as taken)."""
        circuit = self._circuit
        if circuit is None or circuit.state is CircuitState.CLOSED:
            return Route.PRIMARY
        if circuit.state is CircuitState.HALF_OPEN and not self._probing:
            self._probing = True
            return Route.PROBE
        return Route.FALLBACK if self._has_fallback else Route.RETURN

    def record(self, ok: bool, *, probe: bool) -> None:
        """Count a success (``ok``) or a transient failure; act on a state change."""
        if probe:
            self._probing = False
        if self._circuit is None:
            return
        changed = self._circuit.record(ok, time.monotonic())
        if changed is None:
            return
        self._on_change(changed)
        if changed is CircuitState.OPEN:
            if not self._has_fallback:
                self._spawn(self._pause())
            self._spawn(self._probe_after_cooldown())
        elif changed is CircuitState.CLOSED and not self._has_fallback:
            self._spawn(self._channel.set_qos(prefetch_count=self._prefetch))

    def probe_settled(self) -> None:
        """The probe ended without counting (e.g. a permanent error): let another probe run."""
        self._probing = False

    async def stop(self) -> None:
        """Stop deliveries for good (``basic.cancel``)."""
        self._stopped = True
        for task in self._tasks:
            task.cancel()
        await self._pause()

    @property
    def consuming(self) -> bool:
        """A consumer is attached (the breaker may hold it off)."""
        return self._tag is not None and not self._channel.is_closed

    async def _consume(self, *, probe: bool) -> None:
        if self._tag is not None or self._on_message is None or self._stopped:
            return
        await self._channel.set_qos(prefetch_count=1 if probe else self._prefetch)
        on_message = self._on_message

        async def deliver(raw: DeliveredMessage) -> None:
            on_message(Delivery(raw))

        # Straight on aiormq's channel: aio-pika's message wrapper is not needed.
        underlay = await self._channel.get_underlay_channel()
        consume_ok = await underlay.basic_consume(self._queue, deliver)
        self._tag = consume_ok.consumer_tag

    async def _pause(self) -> None:
        tag, self._tag = self._tag, None
        if tag is not None and not self._channel.is_closed:
            with contextlib.suppress(Exception):  # a closed channel has stopped consuming anyway
                underlay = await self._channel.get_underlay_channel()
                await underlay.basic_cancel(tag)

    async def _probe_after_cooldown(self) -> None:
        circuit = self._circuit
        assert circuit is not None
        await asyncio.sleep(
            max(0.0, circuit.opened_at + circuit.config.cooldown - time.monotonic())
        )
        changed = circuit.half_open(time.monotonic())
        if changed is None or self._stopped:
            return
        self._on_change(changed)
        if not self._has_fallback:
            await self._consume(probe=True)

    def _spawn(self, coro: Awaitable[object]) -> None:
        async def run() -> None:
            await coro

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
