"""Whether a queue is consumed: the channel's consumer, steered by the circuit breaker.

A :class:`Gate` is the consumer of one queue on one channel: consume, pause
(``basic.cancel``), resume. It lives as long as its channel.

A :class:`CircuitControl` applies a handler's circuit breaker to whichever gate
consumes the handler's queue *now*. It lives as long as the worker: handlers that
were still running on an old channel or connection report their results here, and
a state change they cause steers the current gate, never a dead one.

Closed breaker (or none): consume normally. Open: without a fallback, stop
consuming so the messages wait in the broker and spend no deliveries; with a
fallback, keep consuming and serve every message with it. After the cool-down,
half-open: one probe delivery runs the real handler (prefetch 1 without a
fallback); its success closes the breaker.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import aiormq
from aio_pika.abc import AbstractChannel
from aiormq.abc import DeliveredMessage

from qworker.acking import ChannelAcks
from qworker.breaker import Circuit, CircuitBreaker
from qworker.delivery import Delivery
from qworker.events import CircuitState
from qworker.publish import ConfirmedPublisher
from qworker.verdict import Route

OnMessage = Callable[[Delivery, "Gate"], None]
"""Called with each delivery and the gate (channel) it came through."""


class Gate:
    """The consumer of one queue on one channel."""

    def __init__(
        self,
        channel: AbstractChannel,
        publisher: ConfirmedPublisher,
        queue: str,
        prefetch: int,
        on_message: OnMessage,
    ) -> None:
        self.channel = channel
        #: Publishes copies of this channel's deliveries (on the same channel, so that a
        #: copy and the ack of its original share one fate).
        self.publisher = publisher
        self._queue = queue
        self._prefetch = prefetch
        self._on_message = on_message
        self._tag: str | None = None
        self._stopped = False
        self._acks: ChannelAcks | None = None

    def acks_on(self, underlay: aiormq.abc.AbstractChannel) -> ChannelAcks:
        """The acks of this gate's channel (``underlay`` is its aiormq channel); one book for
        every delivery of the channel, consumed or fetched, since tags are per channel."""
        if self._acks is None:
            self._acks = ChannelAcks(underlay)
        return self._acks

    async def acks_written(self, timeout: float) -> None:  # noqa: ASYNC109
        """Wait (at most ``timeout`` s) until the acks booked on this channel are written."""
        if self._acks is not None:
            await self._acks.written(timeout)

    @property
    def consuming(self) -> bool:
        """A consumer is attached (the breaker may hold it off)."""
        return self._tag is not None and not self.channel.is_closed

    async def consume(self, *, probe: bool = False) -> None:
        """Start consuming (prefetch 1 for a probe); nothing if already consuming or stopped."""
        if self._tag is not None or self._stopped or self.channel.is_closed:
            return
        await self.channel.set_qos(prefetch_count=1 if probe else self._prefetch)
        on_message = self._on_message
        # Straight on aiormq's channel: aio-pika's message wrapper is not needed.
        underlay = await self.channel.get_underlay_channel()
        acks = self.acks_on(underlay)

        async def deliver(raw: DeliveredMessage) -> None:
            on_message(Delivery(raw, acks), self)

        consume_ok = await underlay.basic_consume(self._queue, deliver)
        self._tag = consume_ok.consumer_tag

    async def full_prefetch(self) -> None:
        """Back to the normal prefetch after a probe."""
        if not self.channel.is_closed:
            await self.channel.set_qos(prefetch_count=self._prefetch)

    async def pause(self) -> None:
        """Stop deliveries (``basic.cancel``) until :meth:`consume`."""
        tag, self._tag = self._tag, None
        if tag is not None and not self.channel.is_closed:
            with contextlib.suppress(Exception):  # a closed channel has stopped consuming anyway
                underlay = await self.channel.get_underlay_channel()
                await underlay.basic_cancel(tag)

    async def stop(self) -> None:
        """Stop deliveries for good."""
        self._stopped = True
        await self.pause()


class CircuitControl:
    """A handler's circuit breaker, applied to the gate that consumes its queue now.

    Args:
        config: The breaker's thresholds.
        has_fallback: The handler has a fallback: an open breaker serves with it
            instead of pausing the queue.
        on_change: Called with every new state (logs, observers).
    """

    def __init__(
        self,
        config: CircuitBreaker,
        has_fallback: bool,
        on_change: Callable[[CircuitState], None],
    ) -> None:
        self.circuit = Circuit(config)
        self._has_fallback = has_fallback
        self._on_change = on_change
        self._gate: Gate | None = None
        self._probing = False
        self._cooldown: asyncio.Task[None] | None = None
        self._pausing: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def state(self) -> CircuitState:
        return self.circuit.state

    async def attach(self, gate: Gate) -> None:
        """Make ``gate`` the current gate and start it as the breaker's state allows."""
        self._gate = gate
        self._probing = False  # a probe of an old channel will never report back
        state = self.circuit.state
        if state is CircuitState.CLOSED or self._has_fallback:
            await gate.consume()
        elif state is CircuitState.HALF_OPEN:
            await gate.consume(probe=True)
        self._ensure_cooldown()

    def detach(self, gate: Gate) -> None:
        """``gate``'s channel is gone; state changes no longer reach it."""
        if self._gate is gate:
            self._gate = None

    def route(self) -> Route:
        """How to treat the next delivery (marks the probe as taken)."""
        state = self.circuit.state
        if state is CircuitState.CLOSED:
            return Route.PRIMARY
        if state is CircuitState.HALF_OPEN and not self._probing:
            self._probing = True
            return Route.PROBE
        return Route.FALLBACK if self._has_fallback else Route.RETURN

    def record(self, ok: bool, *, probe: bool) -> None:
        """Count a success (``ok``) or a transient failure, whichever channel it ran on."""
        if probe:
            self._probing = False
        changed = self.circuit.record(ok, time.monotonic())
        if changed is not None:
            self._changed(changed)

    async def paused(self) -> None:
        """Return once a pause in progress has reached the broker.

        A delivery the open breaker gives back is returned only after the ``basic.cancel``:
        returned earlier, the broker could hand it straight back to the same consumer,
        and every return may count toward the queue's delivery limit.
        """
        pausing = self._pausing
        if pausing is not None and not pausing.done():
            await asyncio.shield(pausing)

    def probe_settled(self) -> None:
        """The probe ended without counting (e.g. a permanent error): let another probe run."""
        self._probing = False

    def stop(self) -> None:
        """The worker is stopping: no more probes."""
        for task in self._tasks:
            task.cancel()

    def _changed(self, state: CircuitState) -> None:
        self._on_change(state)
        gate = self._gate
        if state is CircuitState.OPEN:
            if gate is not None and not self._has_fallback:
                self._pausing = self._spawn(gate.pause())
            self._ensure_cooldown()
        elif state is CircuitState.HALF_OPEN:
            if gate is not None and not self._has_fallback:
                self._spawn(gate.consume(probe=True))
        elif state is CircuitState.CLOSED and gate is not None and not self._has_fallback:
            self._spawn(gate.full_prefetch())

    def _ensure_cooldown(self) -> None:
        """While open, one task (for the whole worker, not per channel) waits for the probe."""
        if self.circuit.state is not CircuitState.OPEN:
            return
        if self._cooldown is None or self._cooldown.done():
            self._cooldown = self._spawn(self._half_open_after_cooldown())

    async def _half_open_after_cooldown(self) -> None:
        circuit = self.circuit
        await asyncio.sleep(
            max(0.0, circuit.opened_at + circuit.config.cooldown - time.monotonic())
        )
        changed = circuit.half_open(time.monotonic())
        if changed is not None:
            self._changed(changed)

    def _spawn(self, coro: Awaitable[object]) -> asyncio.Task[None]:
        async def run() -> None:
            with contextlib.suppress(Exception):  # a channel lost meanwhile: attach redoes it
                await coro

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
