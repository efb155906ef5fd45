"""``App``: the handler registry, publishing, and the settings handlers share."""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from aio_pika.abc import AbstractConnection
from typing_extensions import Unpack

from qworker.alerts import AlertRule, Notify
from qworker.breaker import CircuitBreaker
from qworker.classify import Classification, Classifier
from qworker.connection import close_quietly, connect_once, normalise_urls
from qworker.errors import ConfigurationError
from qworker.events import Observer
from qworker.handler import (
    DEFAULT_MAX_DELIVERIES,
    DEFAULT_TIMEOUT,
    Handler,
    HandlerFunc,
    build_handler,
)
from qworker.handler import options as handler_options
from qworker.hooks import Hook, HookRunner
from qworker.publish import (
    DEFAULT_CONFIRM_TIMEOUT,
    ConfirmedPublisher,
    PublishOptions,
    build_message,
)
from qworker.redact import mask_url
from qworker.retry import RetryPolicy
from qworker.topology import DEFAULT_DELIVERY_LIMIT, QueueSpec, declare, queue_specs

if TYPE_CHECKING:
    from qworker.tracing import Tracing


class App:
    """A set of handlers sharing a broker and failure settings.

    Args:
        url: One AMQP URL, or the list of a cluster's nodes (tried in order).
        name: The connection name the broker shows, and the prefix of the publishing
            connection's name.
        classify: An app-wide classifier, asked after the handler's own rules: returns
            ``"transient"``, ``"permanent"`` or None (see :func:`qworker.classify.classify`).
        default: The classification of exceptions nothing else recognises.
        ssl_ca: A CA file to verify the broker's certificate with (``amqps://`` URLs).
        confirm_timeout: Seconds :meth:`publish` waits for the broker's confirm before
            raising ``PublishFailed``; copies of failed messages wait as long as the
            channel lives and log ``publish.confirm_slow`` after this long.
        declare: Declare the topology when a worker connects (needs ``configure``
            permission). With False the worker only checks that every queue exists
            and refuses to start otherwise (``qworker run --no-declare``).
        environment: Where the app runs (``production``, ``staging``): the ``environment``
            field of every log event. Default: ``QWORKER_ENV``, else none.
        runbooks: Runbook links by error code (``{"CUSTOMER_UNKNOWN": "https://..."}``),
            for failures whose handler has no ``runbook=`` of its own.
        tracing: Trace with OpenTelemetry when ``opentelemetry-api`` is installed
            (``qworker[otel]``) and the application configured a tracer provider; qworker
            never configures one. False: never. Decided when a worker starts (and at the
            first publish of an app that only publishes). See docs/operations.md, Tracing.
    """

    def __init__(
        self,
        url: str | Sequence[str] = "amqp://guest:guest@localhost:5672/",
        name: str = "qworker",
        *,
        classify: Classifier | None = None,
        default: Literal["transient", "permanent"] = "transient",
        ssl_ca: str | None = None,
        confirm_timeout: float = DEFAULT_CONFIRM_TIMEOUT,
        declare: bool = True,
        environment: str | None = None,
        runbooks: Mapping[str, str] | None = None,
        tracing: bool = True,
    ) -> None:
        self.urls = normalise_urls(url)
        self.name = name
        if classify is not None and not callable(classify):
            raise ConfigurationError("classify= takes a callable")
        if default not in ("transient", "permanent"):
            raise ConfigurationError(f"default must be 'transient' or 'permanent', got {default!r}")
        self.classifier = classify
        self.default = Classification(default)
        self.ssl_ca = ssl_ca
        self.confirm_timeout = confirm_timeout
        #: Whether workers declare the topology (False: they only check it exists).
        self.declares = declare
        self.environment = environment or os.environ.get("QWORKER_ENV") or None
        if runbooks is not None and not (
            isinstance(runbooks, Mapping)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in runbooks.items())
        ):
            raise ConfigurationError("runbooks= takes a mapping of error code -> URL")
        self.runbooks: dict[str, str] = dict(runbooks or {})
        self.handlers: dict[str, Handler] = {}
        self.observers: list[Observer] = []
        self._hooks: HookRunner | None = None
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self._connection: AbstractConnection | None = None
        self._owns_connection = False
        self._publisher: ConfirmedPublisher | None = None
        self._lock = asyncio.Lock()
        self._closing: asyncio.Future[Any] | None = None
        #: ``App(tracing=...)``: whether tracing may be on (see :meth:`start_tracing`).
        self.tracing = bool(tracing)
        self._tracer: Tracing | None = None
        self._tracing_decided = False

    def __repr__(self) -> str:
        return f"App({self.name!r}, urls={[mask_url(u) for u in self.urls]})"

    def handler(
        self,
        queue: str,
        *,
        retry: RetryPolicy | None = None,
        transient: type[BaseException] | Sequence[type[BaseException]] = (),
        permanent: type[BaseException] | Sequence[type[BaseException]] = (),
        timeout: float | None = DEFAULT_TIMEOUT,
        queue_type: Literal["quorum", "classic"] = "quorum",
        delivery_limit: int = DEFAULT_DELIVERY_LIMIT,
        severity: Mapping[str, Literal["critical", "high", "medium", "low"]] | None = None,
        fallback: HandlerFunc | None = None,
        breaker: CircuitBreaker | None = None,
        max_deliveries: int = DEFAULT_MAX_DELIVERIES,
        runbook: str | None = None,
    ) -> Callable[[HandlerFunc], HandlerFunc]:
        """Register the decorated coroutine as the handler of ``queue``.

        The coroutine takes the payload (annotated: a pydantic model, dict, list, str or
        bytes) and optionally ``ctx: Context``. Every option is checked here, at import
        time, not when the first message arrives.

        Args:
            queue: The work queue; its retry tiers and DLQ are named after it.
            retry: Attempts, delays and immediate retries (default ``RetryPolicy()``).
            transient: Exception types always retried (after ``Transient``/``Permanent``).
            permanent: Exception types always dead-lettered at once.
            timeout: Seconds one execution may run before it fails with
                ``HandlerTimeout`` (transient); default 300, finite so that a hung handler
                ends long before RabbitMQ's ``consumer_timeout`` closes the channel.
                None: no limit.
            queue_type: ``"quorum"`` (default) or ``"classic"``, for all its queues.
            delivery_limit: The work queue's ``x-delivery-limit`` (quorum): the broker's
                safety net for messages that crash workers.
            severity: Overrides of the severity of outcomes by reason (``"retry"`` for
                retries), e.g. ``{"timeout": "critical"}``.
            fallback: Awaited like the handler when its retries are exhausted (or it timed
                out on the last attempt) or its ``breaker`` is open, before dead-lettering.
            breaker: A :class:`CircuitBreaker`: stop consuming while a dependency fails.
            max_deliveries: A message delivered this many times without an outcome (the
                worker running it died: a crash, an OOM kill) is dead-lettered by qworker
                before the handler runs again, reason ``poison``, severity critical
                (quorum queues: they count deliveries). Keep it below ``delivery_limit``,
                the broker's own limit, which otherwise dead-letters it first, without
                qworker's context.
            runbook: A link for people, put into dead-letter log events, alerts and the DLQ
                tool's ``stats`` and ``show`` for this handler's failures.
        """

        # Every keyword is a field of HandlerOptions, passed on by name: the list lives there
        # (tests/unit/test_handler.py keeps this signature equal to it).
        given = {name: value for name, value in locals().items() if name not in ("self", "queue")}
        chosen = handler_options(**given)

        def register(func: HandlerFunc) -> HandlerFunc:
            if queue in self.handlers:
                raise ConfigurationError(
                    f"queue {queue!r} already has a handler: {self.handlers[queue].name}"
                )
            self.handlers[queue] = build_handler(func, queue, chosen)
            return func

        return register

    def on_retry(self, hook: Hook) -> Hook:
        """Decorator: ``hook(outcome)`` runs in the background after every scheduled retry."""
        self._hook_runner().on_retry.append(_checked_hook(hook))
        return hook

    def on_dead_letter(self, hook: Hook) -> Hook:
        """Decorator: ``hook(outcome)`` runs in the background after every dead letter."""
        self._hook_runner().on_dead_letter.append(_checked_hook(hook))
        return hook

    def alert(
        self,
        *,
        notify: Notify,
        when: Literal["dead_lettered", "retried", "new_fingerprint", "dlq_depth"] = "dead_lettered",
        count: int = 5,
        within: float = 60.0,
        cooldown: float | None = None,
        severity: Literal["critical", "high", "medium", "low"] | None = None,
        queue: str | None = None,
        above: int | None = None,
    ) -> AlertRule:
        """Call ``notify(alert)`` when a rule trips; every notification is also appended to the
        audit trail (``qworker.audit``, action ``alert``).

        - ``when="dead_lettered"`` / ``"retried"``: ``count`` outcomes of that kind (at least
          ``severity``, on ``queue`` if given) within ``within`` seconds; quiet for ``cooldown``.
        - ``when="new_fingerprint"``: once per new kind of failure among dead letters
          (``Outcome.fingerprint``), remembered across restarts through the audit trail.
        - ``when="dlq_depth", above=N``: once when a DLQ's depth (polled, see
          ``qworker run --dlq-poll``) crosses above ``N``; again only after it dropped to ``N``
          or below and at least ``cooldown`` seconds later (default 300).

        Under ``qworker run --processes N`` rules count the outcomes of every worker process:
        they run in the supervisor (and so does ``notify``).

        Args:
            notify: An async function called with the :class:`~qworker.Alert` (in its own
                task, with a time limit; it never changes a message's outcome).
            when: What the rule watches (see above).
            count: How many outcomes within ``within`` seconds fire the alert.
            within: The sliding window, in seconds.
            cooldown: Seconds of quiet after an alert (default: ``within``; 300 for dlq_depth).
            severity: Count only outcomes at least this severe.
            queue: Only this queue's outcomes, or its DLQ (default: every queue).
            above: ``dlq_depth`` only: the depth that must be exceeded.
        """
        from qworker.alerts import make_rule

        options: dict[str, Any] = {"severity": severity, "queue": queue, "cooldown": cooldown}
        if when in ("dead_lettered", "retried"):
            options.update(count=count, within=within)
        rule = make_rule(_checked_hook(notify), when=when, above=above, **options)
        self.add_observer(rule)
        return rule

    def _hook_runner(self) -> HookRunner:
        if self._hooks is None:
            self._hooks = HookRunner()
            self.add_observer(self._hooks)
        return self._hooks

    def add_observer(self, observer: Observer) -> None:
        """Report every outcome and state change to ``observer`` (metrics, hooks, alerts)."""
        self.observers.append(observer)

    def topology(self, queues: Sequence[str] | None = None) -> list[QueueSpec]:
        """Every queue the app's handlers (or those of ``queues``) need, with arguments."""
        specs: list[QueueSpec] = []
        for handler in self.select(queues):
            specs += queue_specs(
                handler.queue,
                handler.options.queue_type,
                handler.options.delivery_limit,
                handler.options.retry.tiers(),
            )
        return specs

    def select(self, queues: Sequence[str] | None) -> list[Handler]:
        """The handlers of ``queues`` (all when None); unknown names are an error."""
        if queues is None:
            return list(self.handlers.values())
        unknown = [q for q in queues if q not in self.handlers]
        if unknown:
            raise ConfigurationError(
                f"no handler for queue(s) {', '.join(unknown)}; known: {', '.join(self.handlers)}"
            )
        return [self.handlers[q] for q in queues]

    async def declare(self, queues: Sequence[str] | None = None) -> None:
        """Declare the topology (idempotent)."""
        await declare(await self._ensure_connection(), self.topology(queues))

    async def publish(
        self, queue_or_routing_key: str, payload: Any, **options: Unpack[PublishOptions]
    ) -> None:
        """Publish ``payload`` and wait for the broker's confirm (raises ``PublishFailed``).

        Models and dicts are sent as JSON, str as UTF-8 text, bytes as they are; the
        message is persistent, with a message id and a timestamp.

        Args:
            queue_or_routing_key: The queue (default exchange), or the routing key.
            payload: What to send.
            options: ``exchange``, ``headers``, ``message_id``, ``correlation_id``: see
                :class:`~qworker.publish.PublishOptions`.
        """
        message = build_message(
            payload,
            headers=options.get("headers"),
            message_id=options.get("message_id"),
            correlation_id=options.get("correlation_id"),
        )
        publisher = await self._ensure_publisher()
        exchange = options.get("exchange", "")
        tracer = self._tracer if self._tracing_decided else self.start_tracing()
        if tracer is None:
            await publisher.publish(message, queue_or_routing_key, exchange=exchange)
            return
        with tracer.publishing(
            message.headers,
            queue_or_routing_key,
            exchange,
            message.message_id,
            message.correlation_id,
        ):
            await publisher.publish(message, queue_or_routing_key, exchange=exchange)

    def start_tracing(self) -> Tracing | None:
        """Decide now whether this app traces (:func:`qworker.tracing.resolve`), and keep
        the answer: a worker calls it when it starts, :meth:`publish` before its first
        publish. None when tracing is off."""
        self._tracer = None
        if self.tracing and _provider_possible():
            from qworker.tracing import resolve

            self._tracer = resolve()
        self._tracing_decided = True
        return self._tracer

    async def _ensure_connection(self) -> AbstractConnection:
        async with self._lock:
            if self._connection is None or self._connection.is_closed:
                connection = await connect_once(
                    self.urls, ca_file=self.ssl_ca, name=f"{self.name}-publisher"
                )
                self._use(connection, owned=True)
            assert self._connection is not None
            return self._connection

    async def _ensure_publisher(self) -> ConfirmedPublisher:
        connection = await self._ensure_connection()
        async with self._lock:
            if self._publisher is None or self._publisher.channel.is_closed:
                channel = await connection.channel(publisher_confirms=True)
                publisher = ConfirmedPublisher(channel, self.confirm_timeout)
                # A broker-closed channel or connection does not always read as closed
                # afterwards: forget it when the close arrives, so the next publish reopens.
                channel.close_callbacks.add(lambda *_: self._forget_publisher(publisher))
                self._publisher = publisher
            return self._publisher

    def _use(self, connection: AbstractConnection, *, owned: bool) -> None:
        self._connection, self._owns_connection, self._publisher = connection, owned, None
        connection.close_callbacks.add(lambda *_: self._forget_connection(connection))

    def _forget_connection(self, connection: AbstractConnection) -> None:
        if self._connection is connection:
            if self._owns_connection:  # release what is left of it (aio-pika warns otherwise)
                self._closing = asyncio.ensure_future(close_quietly(connection))
            self._connection, self._publisher = None, None

    def _forget_publisher(self, publisher: ConfirmedPublisher) -> None:
        if self._publisher is publisher:
            self._publisher = None

    def attach(self, connection: AbstractConnection) -> None:
        """Publish over a worker's connection (called by the worker on every (re)connect)."""
        previous = self._connection
        if previous is not None and self._owns_connection and not previous.is_closed:
            self._closing = asyncio.ensure_future(previous.close())
        self._use(connection, owned=False)

    async def close(self) -> None:
        """Close the app's own publishing connection, if it opened one."""
        connection, self._connection, self._publisher = self._connection, None, None
        if connection is not None and self._owns_connection and not connection.is_closed:
            await connection.close()

    async def __aenter__(self) -> App:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _provider_possible() -> bool:
    """Whether the application may have configured a tracer provider: it imported the
    OpenTelemetry API (``trace.set_tracer_provider``, the SDK and ``opentelemetry-instrument``
    all do), or names a provider in ``OTEL_PYTHON_TRACER_PROVIDER``. Otherwise tracing is
    off without importing OpenTelemetry at all (0.4 MiB and 19 modules in every worker)."""
    return "opentelemetry.trace" in sys.modules or "OTEL_PYTHON_TRACER_PROVIDER" in os.environ


def _checked_hook(hook: Any) -> Any:
    if not inspect.iscoroutinefunction(hook):
        raise ConfigurationError(f"hooks must be async functions, got {hook!r}")
    return hook
