"""The in-memory broker's queues and rules, without I/O: what RabbitMQ does with a message.

Modelled on RabbitMQ 3.10-3.13, the version qworker's contract suite runs against, and
its 4.x differences are noted where qworker could see them:

- Queues: ``classic``, ``quorum`` and ``stream`` (``x-queue-type``), reached through the
  default exchange only (qworker declares no exchange).
- FIFO with expiry at the head only (``x-message-ttl`` and a message's ``expiration``,
  the lower wins), on a clock that runs in real time and can jump (:meth:`State.advance`).
- Requeue order: a classic queue puts a message back at its original position; a quorum
  queue delivers returned messages first, in the order they were returned.
- Quorum delivery counts: every return adds one to ``x-delivery-count`` (shown on the
  next delivery); above ``x-delivery-limit`` the message is dead-lettered with reason
  ``delivery_limit``. (4.x counts every acquisition against the limit the same way but
  shows only failed deliveries in ``x-delivery-count``, and defaults the limit to 20.)
- Dead-lettering (``x-dead-letter-exchange`` "" and ``x-dead-letter-routing-key``):
  ``x-death`` as 3.10 writes it (:func:`record_death`; 3.13+ adds ``x-last-death-*``,
  not written here), ``expiration`` moved to ``original-expiration``; a cycle without a
  rejection is dropped (:func:`is_cycle`); an unroutable dead letter is dropped.
- ``x-overflow: reject-publish`` with ``x-max-length``: the publish is nacked.
- Prefetch per consumer (``basic.qos`` global=False) or per channel (global=True).
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pamqp.commands import Basic

from qworker.wire import LongLongInt

#: Queue arguments compared when a queue is declared again (RabbitMQ's equivalence check).
EQUIVALENT_ARGUMENTS = (
    "x-queue-type",
    "x-message-ttl",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-delivery-limit",
    "x-overflow",
    "x-max-length",
    "x-max-length-bytes",
    "x-expires",
    "x-dead-letter-strategy",
    "x-max-age",
)


class ChannelError(Exception):
    """A soft error: the broker closes the channel with this code and text."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


@dataclass(slots=True)
class Message:
    """A message in a queue (a dead-lettered copy is a new Message with new headers)."""

    seq: int
    body: bytes
    properties: Basic.Properties
    exchange: str
    routing_key: str
    expires_at: float | None = None
    delivery_count: int = 0
    redelivered: bool = False
    offset: int = 0  # streams only: the message's offset
    stored_at: float = 0.0  # streams only: when it was appended (broker clock)


@dataclass(eq=False, slots=True)
class Consumer:
    """A basic.consume: its queue, its prefetch, and where deliveries go."""

    tag: str
    queue: Queue
    channel: Any  # the server's channel: deliver(consumer, message, redelivered)
    no_ack: bool
    prefetch: int  # 0: unlimited
    unacked: int = 0
    stream_next: int = 0  # streams: the next offset to deliver

    def has_room(self) -> bool:
        return self.no_ack or self.channel.has_room(self)


@dataclass(eq=False)
class Queue:
    """A queue and its messages."""

    name: str
    durable: bool
    exclusive_owner: object | None
    auto_delete: bool
    arguments: dict[str, Any]
    ready: deque[Message] = field(default_factory=deque)
    returns: deque[Message] = field(default_factory=deque)  # quorum: delivered first
    log: list[Message] = field(default_factory=list)  # streams
    consumers: list[Consumer] = field(default_factory=list)
    unacked: int = 0
    blocked: bool = False  # quorum with reject-publish: over its limit, refusing publishes
    _turn: int = 0

    @property
    def kind(self) -> str:
        return str(self.arguments.get("x-queue-type", "classic"))

    @property
    def depth(self) -> int:
        """Messages ready (not delivered, not expired yet): DeclareOk's message_count."""
        if self.kind == "stream":
            return len(self.log)
        return len(self.ready) + len(self.returns)

    def head(self) -> Message | None:
        if self.returns:
            return self.returns[0]
        return self.ready[0] if self.ready else None

    def pop(self) -> Message:
        return self.returns.popleft() if self.returns else self.ready.popleft()

    def put_back(self, message: Message) -> None:
        message.redelivered = True
        if self.kind == "quorum":
            self.returns.append(message)
            return
        # A classic queue requeues at the original position (by publish order).
        keys = [m.seq for m in self.ready]
        self.ready.insert(bisect.bisect_left(keys, message.seq), message)

    def next_consumer(self) -> Consumer | None:
        """The next consumer with room, round robin."""
        count = len(self.consumers)
        for i in range(count):
            consumer = self.consumers[(self._turn + i) % count]
            if consumer.has_room():
                self._turn = (self._turn + i + 1) % count
                return consumer
        return None


def _int_argument(arguments: dict[str, Any], name: str) -> int | None:
    value = arguments.get(name)
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


class State:
    """Every queue, the clock, and the rules that move messages between queues.

    Args:
        schedule: Called with a real-time delay (seconds) whenever a message may expire
            next, so the server can come back then (None: no message waits on a TTL).
    """

    def __init__(self, schedule: Callable[[float | None], None] = lambda _: None) -> None:
        self.queues: dict[str, Queue] = {}
        self._seq = itertools.count(1)
        self._offset = 0.0  # seconds the virtual clock is ahead of the real one
        self._schedule = schedule
        self.fail_publish: dict[str, int] = {}  # queue -> how many publishes to nack
        self.drop_on_settle: set[str] = set()  # queues whose next settle loses the connection
        self.busy_until: dict[str, float] = {}  # queue -> time.monotonic() its leader answers again
        #: queue -> how soon a passive declare gets its "0, 0" while busy (default: 0.25 s, the
        #: busy leader's timeout; 0 for a leader that is not there).
        self.stat_answer_after: dict[str, float] = {}

    # The clock

    def now(self) -> float:
        """The broker's clock, seconds since the epoch: real time plus every advance."""
        return time.time() + self._offset

    def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` ahead and let due messages expire."""
        self._offset += max(0.0, seconds)
        self.expire_all()

    def next_expiry(self) -> float | None:
        """When the next queue head expires (broker clock), if one waits on a TTL."""
        due = [
            m.expires_at
            for q in self.queues.values()
            if (m := q.head()) is not None and m.expires_at is not None
        ]
        return min(due, default=None)

    def _reschedule(self) -> None:
        due = self.next_expiry()
        self._schedule(None if due is None else max(0.0, due - self.now()))

    # Queues

    def declare(
        self,
        name: str,
        *,
        passive: bool,
        durable: bool,
        exclusive: bool,
        auto_delete: bool,
        arguments: dict[str, Any],
        owner: object,
        named_by_broker: bool = False,
    ) -> Queue:
        queue = self.queues.get(name)
        if passive:
            if queue is None:
                raise ChannelError(404, f"NOT_FOUND - no queue '{name}' in vhost '/'")
            self._check_owner(queue, owner)
            return queue
        if queue is not None:
            self._check_owner(queue, owner)
            self._check_equivalent(queue, durable, arguments)
            return queue
        if name.startswith("amq.") and not named_by_broker:
            raise ChannelError(
                403, f"ACCESS_REFUSED - queue name '{name}' contains reserved prefix 'amq.*'"
            )
        kind = arguments.get("x-queue-type", "classic")
        if kind not in ("classic", "quorum", "stream"):
            raise ChannelError(
                406, f"PRECONDITION_FAILED - invalid arg 'x-queue-type' for queue '{name}'"
            )
        if kind != "classic" and (exclusive or auto_delete or not durable):
            raise ChannelError(
                406,
                f"PRECONDITION_FAILED - invalid property 'non-durable/exclusive/auto-delete' "
                f"for queue '{name}' in vhost '/'",
            )
        queue = Queue(name, durable, owner if exclusive else None, auto_delete, dict(arguments))
        self.queues[name] = queue
        return queue

    @staticmethod
    def _check_owner(queue: Queue, owner: object) -> None:
        if queue.exclusive_owner is not None and queue.exclusive_owner is not owner:
            raise ChannelError(
                405,
                f"RESOURCE_LOCKED - cannot obtain exclusive access to locked queue "
                f"'{queue.name}' in vhost '/'",
            )

    @staticmethod
    def _check_equivalent(queue: Queue, durable: bool, arguments: dict[str, Any]) -> None:
        if queue.durable != durable:
            raise ChannelError(
                406,
                f"PRECONDITION_FAILED - inequivalent arg 'durable' for queue '{queue.name}' "
                f"in vhost '/': received '{str(durable).lower()}' but current is "
                f"'{str(queue.durable).lower()}'",
            )
        for name in EQUIVALENT_ARGUMENTS:
            mine, theirs = queue.arguments.get(name), arguments.get(name)
            if name == "x-queue-type" and theirs is None:
                continue  # a declare without a type matches any type
            if mine != theirs:
                received = "none" if theirs is None else f"the value '{theirs}'"
                current = "none" if mine is None else f"the value '{mine}'"
                raise ChannelError(
                    406,
                    f"PRECONDITION_FAILED - inequivalent arg '{name}' for queue "
                    f"'{queue.name}' in vhost '/': received {received} but current is {current}",
                )

    def lookup(self, name: str) -> Queue:
        queue = self.queues.get(name)
        if queue is None:
            raise ChannelError(404, f"NOT_FOUND - no queue '{name}' in vhost '/'")
        return queue

    def delete(self, queue: Queue) -> int:
        count = queue.depth
        self.queues.pop(queue.name, None)
        for consumer in list(queue.consumers):
            consumer.channel.cancelled_by_broker(consumer)
        queue.consumers.clear()
        return count

    def purge(self, queue: Queue) -> int:
        count = len(queue.ready) + len(queue.returns)
        queue.ready.clear()
        queue.returns.clear()
        self._maybe_unblock(queue)
        self._reschedule()
        return count

    # Publishing

    def publish(
        self, exchange: str, routing_key: str, body: bytes, properties: Basic.Properties
    ) -> str:
        """Route one published message: ``"routed"``, ``"unroutable"`` or ``"rejected"``
        (the queue is full with reject-publish, or a fault hook said so)."""
        if exchange not in ("", "amq.default"):
            raise ChannelError(404, f"NOT_FOUND - no exchange '{exchange}' in vhost '/'")
        expiration = properties.expiration
        if expiration is not None and not (expiration.isascii() and expiration.isdigit()):
            raise ChannelError(406, f"PRECONDITION_FAILED - invalid expiration '{expiration}'")
        queue = self.queues.get(routing_key)
        if queue is None:
            return "unroutable"
        if self.fail_publish.get(queue.name):
            self.fail_publish[queue.name] -= 1
            return "rejected"
        if self._refuses(queue):
            return "rejected"
        self.enqueue(queue, Message(next(self._seq), body, properties, exchange, routing_key))
        return "routed"

    # Length limits (x-max-length counts ready messages only)

    @staticmethod
    def _refuses(queue: Queue) -> bool:
        """``x-overflow: reject-publish`` refuses a message now. A classic queue refuses at
        its limit; a quorum queue takes one more, then refuses until its ready messages fall
        to 80 % of the limit (3.10.8 and 4.1 ``rabbit_fifo``: ``is_over_limit``,
        ``is_below_soft_limit``, ``?LOW_LIMIT``)."""
        limit = _int_argument(queue.arguments, "x-max-length")
        if limit is None or queue.arguments.get("x-overflow") != "reject-publish":
            return False
        if queue.kind == "quorum":
            return queue.blocked
        return queue.depth >= limit

    def _apply_length_limit(self, queue: Queue) -> None:
        """After an enqueue: block (quorum, reject-publish) or drop heads (``drop-head``)."""
        limit = _int_argument(queue.arguments, "x-max-length")
        if limit is None or queue.kind == "stream" or queue.depth <= limit:
            return
        if queue.arguments.get("x-overflow") == "reject-publish":
            queue.blocked = True
            return
        while queue.depth > limit:
            self.dead_letter(queue, queue.pop(), "maxlen")

    @staticmethod
    def _maybe_unblock(queue: Queue) -> None:
        limit = _int_argument(queue.arguments, "x-max-length")
        if queue.blocked and (limit is None or queue.depth <= int(limit * 0.8)):
            queue.blocked = False

    def enqueue(self, queue: Queue, message: Message) -> None:
        if queue.kind == "stream":
            message.offset = len(queue.log)
            message.stored_at = self.now()
            queue.log.append(message)
            self.dispatch(queue)
            return
        message.expires_at = self._expiry(queue, message)
        queue.ready.append(message)
        self._apply_length_limit(queue)
        self.dispatch(queue)
        self._reschedule()

    def _expiry(self, queue: Queue, message: Message) -> float | None:
        ttls = [_int_argument(queue.arguments, "x-message-ttl")]
        if message.properties.expiration is not None:
            ttls.append(int(message.properties.expiration))  # checked by publish()
        known = [t for t in ttls if t is not None]
        return self.now() + min(known) / 1000 if known else None

    # Delivering

    def expire_all(self) -> None:
        for queue in list(self.queues.values()):
            self._expire(queue)
            self.dispatch(queue)
        self._reschedule()

    def _expire(self, queue: Queue) -> None:
        now = self.now()
        while (head := queue.head()) is not None and head.expires_at is not None:
            if head.expires_at > now:
                return
            queue.pop()
            self.dead_letter(queue, head, "expired")

    def dispatch(self, queue: Queue) -> None:
        """Deliver what can be delivered to the queue's consumers."""
        if queue.kind == "stream":
            for consumer in queue.consumers:
                while consumer.stream_next < len(queue.log) and consumer.has_room():
                    message = queue.log[consumer.stream_next]
                    consumer.stream_next += 1
                    consumer.channel.deliver(consumer, message)
            return
        if self.busy(queue.name):
            return  # MemoryBroker.busy_leader dispatches again when the silence ends
        self._expire(queue)
        while queue.consumers and queue.head() is not None:
            chosen = queue.next_consumer()
            if chosen is None:
                break
            message = queue.pop()
            if not chosen.no_ack:
                queue.unacked += 1
            chosen.channel.deliver(chosen, message)
            self._expire(queue)
        self._maybe_unblock(queue)

    def busy(self, name: str) -> bool:
        """True while the queue's leader is too busy to deliver or to answer in time."""
        until = self.busy_until.get(name)
        if until is None:
            return False
        if time.monotonic() < until:
            return True
        del self.busy_until[name]
        return False

    def get(self, queue: Queue) -> Message | None:
        """basic.get: the head, or None."""
        self._expire(queue)
        if queue.kind == "stream":
            raise ChannelError(406, "PRECONDITION_FAILED - queue type does not support basic.get")
        if queue.head() is None:
            return None
        message = queue.pop()
        self._expire(queue)  # a GetOk's count leaves out an expired message behind it
        self._maybe_unblock(queue)
        return message

    # Settling

    def settle(self, queue: Queue, message: Message, *, requeue: bool | None) -> None:
        """The end of a delivery: acked (``requeue`` None), returned (True) or rejected."""
        if queue.kind == "stream":
            return
        queue.unacked = max(0, queue.unacked - 1)
        if self.queues.get(queue.name) is not queue:
            return  # deleted meanwhile
        if requeue is None:
            pass
        elif requeue:
            self._return(queue, message, requeued=True)
        else:
            self.dead_letter(queue, message, "rejected")
        self.dispatch(queue)
        self._reschedule()

    def _return(self, queue: Queue, message: Message, *, requeued: bool) -> None:
        """A delivery comes back: ``requeued`` by a nack/reject, or its channel closed."""
        if queue.kind == "quorum":
            message.delivery_count += 1
            limit = _int_argument(queue.arguments, "x-delivery-limit")
            if limit is not None and message.delivery_count > limit:
                self.dead_letter(queue, message, "delivery_limit")
                return
            if limit is None and requeued:
                # 3.10 without a delivery limit turns a requeue into a new enqueue at the
                # back (rabbit_fifo handle_aux #return{} -> #requeue{}); 4.x always has a
                # limit (20 by default), so there it goes to the returns like below.
                message.redelivered = True
                queue.ready.append(message)
                return
        queue.put_back(message)

    # Dead-lettering

    def dead_letter(self, queue: Queue, message: Message, reason: str) -> None:
        """Send ``message`` to the queue's dead-letter target as RabbitMQ 3.10 does
        (``rabbit_dead_letter:publish/5``), or drop it."""
        exchange = queue.arguments.get("x-dead-letter-exchange")
        if exchange is None or exchange not in ("", "amq.default"):
            return  # no DLX (or one qworker does not model): the message is dropped
        routing_key = queue.arguments.get("x-dead-letter-routing-key")
        target_name = str(routing_key) if routing_key is not None else message.routing_key
        target = self.queues.get(target_name)
        if target is None:
            return  # unroutable dead letters are dropped
        headers = record_death(
            dict(message.properties.headers or {}),
            queue=queue.name,
            reason=reason,
            exchange=message.exchange,
            routing_key=message.routing_key,
            expiration=message.properties.expiration,
            now=self.now(),
        )
        if reason != "rejected" and is_cycle(target_name, headers["x-death"]):
            return  # "Dead-letter queues cycle detected": dropped
        properties = copy_properties(message.properties)
        properties.headers = headers
        properties.expiration = None
        copy = Message(next(self._seq), message.body, properties, str(exchange), target_name)
        if self._refuses(target):
            return  # at-most-once: a full target drops it
        self.enqueue(target, copy)

    # Connections going away

    def give_back(self, deliveries: Iterable[tuple[Queue, Message]]) -> None:
        """A channel closed with these deliveries unsettled: each goes back (counted)."""
        touched: dict[str, Queue] = {}
        for queue, message in deliveries:
            if queue.kind == "stream":
                continue
            queue.unacked = max(0, queue.unacked - 1)
            if self.queues.get(queue.name) is queue:
                self._return(queue, message, requeued=False)
                touched[queue.name] = queue
        for queue in touched.values():
            self.dispatch(queue)
        self._reschedule()


def record_death(
    headers: dict[str, Any],
    *,
    queue: str,
    reason: str,
    exchange: str,
    routing_key: str,
    expiration: str | None,
    now: float,
) -> dict[str, Any]:
    """``headers`` with this death recorded, as 3.10's ``update_x_death_header`` does.

    The first death adds ``x-first-death-reason``/``-queue``/``-exchange`` and an entry
    ``count, reason, queue, time, exchange, routing-keys[, original-expiration]``. A later
    death of the same (queue, reason) adds one to that entry's count and keeps its other
    fields (first time, first routing keys), with the entry's keys sorted; other entries
    follow, regrouped by (queue, reason) (3.10's fold leaves them in reverse order). An
    ``x-death`` that is not an array is replaced. 3.13+ also writes ``x-last-death-*``;
    3.10 does not, and neither does this.
    """
    info: dict[str, Any] = {
        "reason": reason,
        "queue": queue,
        "time": datetime.fromtimestamp(int(now), UTC),
        "exchange": exchange,
        "routing-keys": [routing_key],
    }
    if expiration is not None:
        info["original-expiration"] = expiration
    fresh = {"count": LongLongInt(1), **info}
    if "x-death" not in headers:
        headers["x-first-death-reason"] = reason
        headers["x-first-death-queue"] = queue
        headers["x-first-death-exchange"] = exchange
        headers["x-death"] = [fresh]
        return headers
    deaths = headers["x-death"]
    if not isinstance(deaths, list):
        headers["x-death"] = [fresh]
        return headers
    grouped = _group_by_queue_and_reason([d for d in deaths if isinstance(d, dict)])
    matches = [d for d in grouped if d.get("queue") == queue and d.get("reason") == reason]
    others = [d for d in grouped if not (d.get("queue") == queue and d.get("reason") == reason)]
    if matches:
        entry = dict(matches[0])
        count = entry.get("count")
        entry["count"] = LongLongInt(count + 1 if isinstance(count, int) else 1)
    else:
        entry = fresh
    headers["x-death"] = [dict(sorted(entry.items())), *others]
    return headers


def _group_by_queue_and_reason(deaths: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if len(deaths) <= 1:
        return deaths
    seen: set[tuple[Any, Any]] = set()
    grouped: list[dict[str, Any]] = []
    for death in deaths:
        key = (death.get("queue"), death.get("reason"))
        same = [d for d in deaths if (d.get("queue"), d.get("reason")) == key]
        first = dict(same[0])
        if "count" not in first:
            first = {"count": LongLongInt(len(same)), **first}
        if not grouped or key not in seen:
            grouped.insert(0, first)
        seen.add(key)
    return grouped


def is_cycle(target: str, deaths: list[Any]) -> bool:
    """3.10's ``is_cycle``: the deaths since the message last died in ``target`` (the one
    just recorded included) were all automatic (none ``rejected``, none malformed)."""
    for i, death in enumerate(deaths):
        if isinstance(death, dict) and death.get("queue") == target:
            return all(
                isinstance(d, dict) and d.get("reason") != "rejected" for d in deaths[: i + 1]
            )
    return False


def copy_properties(properties: Basic.Properties) -> Basic.Properties:
    """A shallow copy of a message's properties (the copy's headers are set anew)."""
    copy = Basic.Properties()
    for name in properties.__slots__:
        setattr(copy, name, getattr(properties, name))
    return copy
