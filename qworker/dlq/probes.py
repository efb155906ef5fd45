"""Probes of a queue that change nothing: does it exist, how deep is it, what kind is it.

Each probe uses a throwaway channel, because a failed (passive) declare closes its channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection

from qworker.dlq import management
from qworker.errors import BrokerStalled, BrowseRefused, ManagementError, QueueNotFound
from qworker.redact import mask_url
from qworker.topology import dead_letter_queue


class Safety(enum.Enum):
    """Whether reading a DLQ can count against a delivery limit.

    ``CLASSIC`` and ``QUORUM`` are DLQs declared as qworker declares them: a
    classic queue counts no deliveries, and qworker's quorum DLQs have a
    delivery limit of a billion. ``UNVERIFIED`` is a queue declared with other
    arguments: if it is a quorum queue, each read may count as a delivery (on
    RabbitMQ 4.0 to 4.2, where the default limit is 20, every returned message counts).
    """

    CLASSIC = "classic"
    QUORUM = "quorum"
    UNVERIFIED = "unverified"


async def close_channel_quietly(channel: AbstractChannel) -> None:
    """Close ``channel`` unless it is closed already; a channel lost meanwhile is no error."""
    if not channel.is_closed:
        with contextlib.suppress(aiormq.exceptions.AMQPError, ConnectionError, RuntimeError):
            await channel.close()


#: How long a quorum queue's leader gets to answer a passive declare: when it does not answer
#: in time, RabbitMQ replies 0 messages and 0 consumers instead of failing
#: (``rabbit_quorum_queue:stat/1`` calls ``stat(Q, 250)`` and maps ``{timeout, _}`` to
#: ``{ok, 0, 0}``; the same in 3.10.8, 4.1.0 and 4.3.5). A leader busy with a million
#: messages misses it: a reader that believed that zero would stop early.
QUORUM_STAT_TIMEOUT = 0.25
#: A "0 messages, 0 consumers" answer that took this long may be that timeout.
SUSPECT_AFTER = 0.8 * QUORUM_STAT_TIMEOUT
#: How often :func:`queue_depth` asks again about a suspect zero before believing it
#: (with pauses of 0.05 s doubling to 1 s: about 4 s of leader silence in all).
DEPTH_ATTEMPTS = 8


@dataclass(frozen=True, slots=True)
class QueueStat:
    """A passive declare's answer: ``ready`` messages, ``consumers``, and how long it took."""

    ready: int
    consumers: int
    seconds: float

    @property
    def suspect(self) -> bool:
        """True when this may be a quorum leader's timeout rather than the queue's state
        (see :data:`QUORUM_STAT_TIMEOUT`)."""
        return self.ready == 0 and self.consumers == 0 and self.seconds >= SUSPECT_AFTER


async def queue_stat(connection: AbstractConnection, name: str) -> QueueStat:
    """One passive declare of ``name``; raises :class:`QueueNotFound` if it does not exist.

    Uses a throwaway channel, because a failed passive declare closes its channel.
    """
    channel = await connection.channel(publisher_confirms=False)
    began = time.monotonic()
    try:
        declared = await channel.declare_queue(name, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise QueueNotFound(f"queue {name!r} not found") from None
    finally:
        await close_channel_quietly(channel)
    result = declared.declaration_result
    return QueueStat(
        int(result.message_count or 0), int(result.consumer_count or 0), time.monotonic() - began
    )


async def queue_depth(connection: AbstractConnection, name: str, *, strict: bool = False) -> int:
    """Ready messages in ``name``; raises :class:`QueueNotFound` if it does not exist.

    A zero that may be a busy quorum leader's timeout answer (:attr:`QueueStat.suspect`)
    is asked again, up to :data:`DEPTH_ATTEMPTS` times, before it is believed; with
    ``strict`` it is not believed at all: :class:`BrokerStalled` is raised instead (a
    reader must not report an empty queue that the broker only failed to count).
    """
    stat = await asked_until(connection, name, lambda answer: not answer.suspect)
    if stat is not None:
        return stat.ready
    if strict:
        raise BrokerStalled(
            f"RabbitMQ did not say how many messages {name!r} holds: {DEPTH_ATTEMPTS} answers "
            f"of 0 came late, as a quorum queue's busy leader answers; try again"
        )
    return 0  # every answer was a suspect zero


async def asked_until(
    connection: AbstractConnection, name: str, believed: Callable[[QueueStat], bool]
) -> QueueStat | None:
    """Ask ``name`` (:func:`queue_stat`) until an answer is ``believed``, at most
    :data:`DEPTH_ATTEMPTS` times with pauses of 0.05 s doubling to 1 s (about 4 s in all);
    that answer, or None when none was."""
    pause = 0.05
    for attempt in range(DEPTH_ATTEMPTS):
        stat = await queue_stat(connection, name)
        if believed(stat):
            return stat
        if attempt < DEPTH_ATTEMPTS - 1:
            await asyncio.sleep(pause)
            pause = min(2 * pause, 1.0)
    return None


async def safety(connection: AbstractConnection, name: str) -> Safety:
    """Check an existing queue's arguments by re-declaring it as qworker declares DLQs.

    The broker accepts a declaration only when the arguments are equivalent
    (``x-queue-type`` and ``x-delivery-limit`` included), so acceptance proves
    the queue's kind. Call it only after :func:`queue_depth` found the queue.
    Policies are invisible here: a ``delivery-limit`` policy can still cap a queue
    this calls ``QUORUM``; :class:`DeliveryGuard` covers that.
    """
    for kind in (Safety.QUORUM, Safety.CLASSIC):
        arguments = dead_letter_queue(name, kind.value).arguments
        channel = await connection.channel(publisher_confirms=False)
        try:
            await channel.declare_queue(name, durable=True, arguments=arguments)
            return kind
        except aiormq.exceptions.ChannelClosed:
            continue
        finally:
            await close_channel_quietly(channel)
    return Safety.UNVERIFIED


#: A known effective delivery limit below this is within reach of repeated reading:
#: the tool refuses to read such a queue at all.
MIN_LIMIT = 1000
#: With a known limit of at least :data:`MIN_LIMIT`: a read stops (refuses) once a
#: message's ``x-delivery-count`` comes within this many of it. A refused read still
#: gives back the one message it looked at (one delivery more), so this many refused
#: attempts stay possible before that message could reach the limit.
RESERVE = 100
#: Without the management API (policies are invisible over AMQP) a read refuses once
#: a message was delivered this often: that covers policies down to twice this value
#: (RabbitMQ 4.x's default of 20 included), with as many refused attempts in hand.
FALLBACK_COUNT = 10

#: The management API to ask for effective delivery limits (see :func:`use_management`).
_MANAGEMENT: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "qworker_dlq_management", default=None
)


@contextlib.contextmanager
def use_management(url: str | None) -> Iterator[None]:
    """Ask the management API at ``url`` for effective delivery limits (None: derive it
    from the AMQP URL: same host and credentials, port 15672)."""
    token = _MANAGEMENT.set(url)
    try:
        yield
    finally:
        _MANAGEMENT.reset(token)


@dataclass(frozen=True, slots=True)
class DeliveryGuard:
    """Refuses to read a queue whose delivery limit repeated reading could reach.

    On RabbitMQ before 4.3 every message a browse gives back to a quorum queue
    counts as a delivery (``x-delivery-count`` + 1), and a message returned more
    often than the queue's *effective* delivery limit (the lower of the
    ``x-delivery-limit`` argument and a policy's ``delivery-limit``) is dropped or
    dead-lettered onwards. ``limit`` is that effective limit when the management API
    told it (``source`` says so; :data:`UNLIMITED` for a queue without one), else
    None: then a read refuses once a message shows :data:`FALLBACK_COUNT` deliveries.
    A cursor looks at the first message alone before taking more (see
    :class:`~qworker.dlq.cursor.Cursor`), so a refused read costs one delivery of one
    message.
    """

    queue: str
    limit: int | None
    source: str

    @property
    def counted(self) -> bool:
        """Whether a read of this queue may count against a delivery limit."""
        return self.limit is None or self.limit < UNLIMITED

    def check_open(self) -> None:
        """Raise :class:`BrowseRefused` if the known limit is within reach of repeated reads."""
        if self.limit is not None and self.limit < MIN_LIMIT:
            raise BrowseRefused(
                f"refusing to read {self.queue}: its effective delivery limit is {self.limit} "
                f"({self.source}); every read counts one delivery per message on RabbitMQ "
                "before 4.3, so reading it could drop dead letters. Exclude the DLQ from the "
                "delivery-limit policy (or raise the limit) and retry"
            )

    def check(self, delivery_count: int) -> None:
        """Raise :class:`BrowseRefused` if a delivery with this count nears the limit."""
        if self.limit is None:
            if delivery_count >= FALLBACK_COUNT:
                raise BrowseRefused(
                    f"refusing to read {self.queue} further: a message was delivered "
                    f"{delivery_count} times already and the DLQ's delivery limit cannot be "
                    f"read ({self.source}); a delivery-limit policy could drop dead letters "
                    "(nothing was removed). Pass --management-url (or enable the management "
                    "plugin) so the tool can read the real limit"
                )
        elif delivery_count + RESERVE >= self.limit:
            raise BrowseRefused(
                f"refusing to read {self.queue} further: a message was delivered "
                f"{delivery_count} times already and its effective delivery limit is "
                f"{self.limit} ({self.source}); reading it again could drop dead letters "
                "(nothing was removed). Raise or remove the delivery-limit policy"
            )


#: The ``limit`` of a queue that counts no deliveries, or has no delivery limit.
UNLIMITED = 1 << 62


def _vhost_of(url: str) -> str:
    return urllib.parse.unquote(urllib.parse.urlsplit(url).path[1:]) or "/"


async def delivery_guard(connection: AbstractConnection, name: str) -> DeliveryGuard:
    """The :class:`DeliveryGuard` of ``name``: asks the management API (see
    :func:`use_management`) for its effective delivery limit."""
    amqp_url = str(getattr(connection, "url", "") or "")
    management_url = _MANAGEMENT.get() or (
        management.management_url_for(amqp_url) if amqp_url else None
    )
    if management_url is None:
        return DeliveryGuard(name, None, "no management API known")
    vhost = _vhost_of(amqp_url) if amqp_url else "/"

    def ask() -> tuple[int | None, bool]:
        info = management.queue_info(management_url, vhost, name)
        quorum = isinstance(info, dict) and info.get("type") == "quorum"
        if not quorum:
            return None, False
        major = management.broker_major(management_url)
        limits = [management.effective_delivery_limit(info, major)]
        # The queue's own view lags a policy change by seconds: read the policies too.
        for kind in ("policies", "operator-policies"):
            try:
                found = management.policies(management_url, vhost, kind)
            except ManagementError:
                continue  # a user without the rights to list them: the queue's view decides
            limits.append(management.policy_delivery_limit(found, name))
        known = [limit for limit in limits if limit is not None]
        return (min(known) if known else None), True

    try:
        limit, quorum = await asyncio.to_thread(ask)
    except ManagementError as exc:
        return DeliveryGuard(name, None, str(exc))
    source = f"management API at {mask_url(management_url)}"
    if limit is None:
        # A classic queue, or a quorum queue without any limit: nothing to reach.
        return DeliveryGuard(name, UNLIMITED, source + (": no limit" if quorum else ": not quorum"))
    return DeliveryGuard(name, limit, source)
