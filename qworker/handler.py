"""A handler: the decorated coroutine, its options, and its payload decoder.

Everything is checked when the decorator runs, so that a mistake fails at
import time rather than on the first message.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import pydantic

from qworker.breaker import CircuitBreaker
from qworker.classify import ExceptionTypes
from qworker.context import Context
from qworker.errors import ConfigurationError, DecodeError
from qworker.events import DEFAULT_SEVERITY, Severity
from qworker.retry import RetryPolicy
from qworker.topology import DEFAULT_DELIVERY_LIMIT, QueueType, validate_queue_name

HandlerFunc = Callable[..., Awaitable[Any]]
Decoder = Callable[[bytes, str | None, str | None], Any]

_JSON_TYPES = ("application/json", "text/json")

#: Deliveries of one message that may end without an outcome (the worker died running it)
#: before qworker dead-letters it as poison; below the quorum queue's ``x-delivery-limit``
#: (default 10), which stays as the broker's own safety net.
DEFAULT_MAX_DELIVERIES = 5

#: A handler's default time limit per execution, in seconds. Finite on purpose: RabbitMQ
#: closes the channel of a delivery held past its ``consumer_timeout`` (30 minutes by
#: default), which would return every delivery of that channel; a handler that hangs
#: is turned into a ``HandlerTimeout`` (transient) long before. ``timeout=None`` lifts it.
DEFAULT_TIMEOUT = 300.0


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return True
    base = content_type.split(";", 1)[0].strip().lower()
    return base in _JSON_TYPES or base.endswith("+json")


def _describe(exc: pydantic.ValidationError, type_name: str) -> str:
    problems = []
    for error in exc.errors(include_url=False)[:3]:
        where = ".".join(str(p) for p in error.get("loc", ())) or "body"
        problems.append(f"{where}: {error.get('msg', 'invalid')}")
    more = f" (+{exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
    return f"payload does not match {type_name}: " + "; ".join(problems) + more


def make_decoder(annotation: Any) -> Decoder:
    """A function (body, content_type, content_encoding) -> payload raising :class:`DecodeError`."""
    if annotation is bytes:
        return lambda body, _ct, _ce: body

    def check_encoding(content_encoding: str | None) -> None:
        if content_encoding and content_encoding.lower() not in ("identity", "utf-8", "utf8"):
            raise DecodeError(f"content encoding {content_encoding!r} is not supported")

    if annotation is str:

        def decode_text(body: bytes, _ct: str | None, content_encoding: str | None) -> Any:
            check_encoding(content_encoding)
            try:
                return body.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DecodeError(f"body is not valid UTF-8 (byte {exc.start})") from None

        return decode_text

    name = getattr(annotation, "__name__", None) or str(annotation)
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        validate: Callable[[bytes], Any] = annotation.model_validate_json
    else:
        try:
            validate = pydantic.TypeAdapter(annotation).validate_json
        except pydantic.PydanticSchemaGenerationError as exc:
            raise ConfigurationError(f"cannot decode payloads of type {name}: {exc}") from None

    def decode_json(body: bytes, content_type: str | None, content_encoding: str | None) -> Any:
        if not _is_json(content_type):
            raise DecodeError(f"content type {content_type!r} is not JSON (handler expects {name})")
        check_encoding(content_encoding)
        try:
            return validate(body)
        except pydantic.ValidationError as exc:
            raise DecodeError(_describe(exc, name)) from None

    return decode_json


@dataclass(frozen=True, slots=True)
class HandlerOptions:
    """Every option of :meth:`qworker.App.handler`, validated and normalised.

    The one list of handler options: ``App.handler`` documents each of them and passes
    them on by name (a unit test keeps its keyword parameters equal to these fields), and
    :func:`options` validates each with the check of the same name.
    """

    retry: RetryPolicy = field(default_factory=RetryPolicy)
    transient: ExceptionTypes = ()
    permanent: ExceptionTypes = ()
    timeout: float | None = DEFAULT_TIMEOUT
    queue_type: QueueType = "quorum"
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT
    severity: Mapping[str, Severity] | None = None
    """Overrides of :data:`qworker.events.DEFAULT_SEVERITY` by reason (or ``"retry"``)."""
    fallback: HandlerFunc | None = None
    """Called like the handler when retries are exhausted or the breaker is open."""
    breaker: CircuitBreaker | None = None
    max_deliveries: int = DEFAULT_MAX_DELIVERIES
    """Deliveries without an outcome after which a message is dead-lettered as poison."""
    runbook: str | None = None
    """A link for people: what to do when this handler's messages fail."""


@dataclass(frozen=True, slots=True)
class Handler:
    """A registered handler and everything needed to run it."""

    queue: str
    func: HandlerFunc
    name: str
    decode: Decoder
    wants_context: bool
    options: HandlerOptions


def _exception_types(option: str) -> Callable[[Any], ExceptionTypes]:
    def check(value: Any) -> ExceptionTypes:
        types = value if isinstance(value, tuple | list) else (value,)
        for t in types:
            if not (isinstance(t, type) and issubclass(t, BaseException)):
                raise ConfigurationError(f"{option}= takes exception classes, got {t!r}")
        return tuple(types)

    return check


def _retry(value: Any) -> RetryPolicy:
    if value is None:
        return RetryPolicy()
    if not isinstance(value, RetryPolicy):
        raise ConfigurationError("retry= takes a RetryPolicy")
    return value


def _timeout(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not (isinstance(value, int | float) and value > 0):
        raise ConfigurationError(f"timeout must be a positive number of seconds, got {value!r}")
    return float(value)


def _queue_type(value: Any) -> QueueType:
    if value not in ("quorum", "classic"):
        raise ConfigurationError(f"queue_type must be 'quorum' or 'classic', got {value!r}")
    return typing.cast(QueueType, value)


def _delivery_limit(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"delivery_limit must be a positive int, got {value!r}")
    return value


def _fallback_function(value: Any) -> HandlerFunc | None:
    if value is not None and not inspect.iscoroutinefunction(value):
        raise ConfigurationError(f"fallback= takes an async def function, got {value!r}")
    return typing.cast("HandlerFunc | None", value)


def _max_deliveries(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"max_deliveries must be a positive int, got {value!r}")
    return value


def _runbook(value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ConfigurationError(f"runbook= takes a URL (a non-empty string), got {value!r}")
    return value


def options(**given: Any) -> HandlerOptions:
    """Validate handler options given by name (those not given keep their defaults).

    Raises:
        ConfigurationError: an unknown option, or a value the option cannot take.
    """
    unknown = set(given) - set(_CHECKS)
    if unknown:
        raise ConfigurationError(f"unknown handler option(s): {', '.join(sorted(unknown))}")
    return HandlerOptions(**{name: _CHECKS[name](value) for name, value in given.items()})


def build_handler(func: HandlerFunc, queue: str, chosen: HandlerOptions) -> Handler:
    """Check the function's signature (and its fallback's) and make the handler of ``queue``."""
    validate_queue_name(queue)
    qualname = getattr(func, "__qualname__", None) or repr(func)
    if not inspect.iscoroutinefunction(func):
        raise ConfigurationError(f"handler {qualname} must be an async def function")
    annotation, wants_context = _call_shape(func, f"handler {qualname}")
    if chosen.fallback is not None:
        what = f"fallback of {qualname}"
        if _call_shape(chosen.fallback, what)[1] != wants_context:
            raise ConfigurationError(f"{what} must take the same parameters as the handler")
    return Handler(
        queue=queue,
        func=func,
        name=f"{func.__module__}:{func.__qualname__}",
        decode=make_decoder(annotation),
        wants_context=wants_context,
        options=chosen,
    )


def _severities(value: Any) -> Mapping[str, Severity] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConfigurationError("severity= takes a mapping of reason -> severity")
    try:
        overrides = {key: Severity(level) for key, level in value.items()}
    except ValueError as exc:
        raise ConfigurationError(f"severity=: {exc}") from None
    unknown = set(overrides) - set(DEFAULT_SEVERITY)
    if unknown:
        raise ConfigurationError(
            f"severity= keys must be among {', '.join(DEFAULT_SEVERITY)}; got {', '.join(unknown)}"
        )
    return overrides


def _call_shape(func: HandlerFunc, what: str) -> tuple[Any, bool]:
    """The payload annotation of ``func`` and whether it takes a Context.

    The consumer calls ``func(payload)`` or ``func(payload, ctx)``, positionally.
    """
    params = list(inspect.signature(func).parameters.values())
    try:
        hints = typing.get_type_hints(func)
    except Exception as exc:
        raise ConfigurationError(f"cannot resolve annotations of {what}: {exc}") from None
    payload = [p for p in params if hints.get(p.name) is not Context]
    context = [p for p in params if hints.get(p.name) is Context]
    if len(payload) != 1 or len(context) > 1:
        raise ConfigurationError(
            f"{what} must take one payload parameter and optionally one parameter annotated Context"
        )
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if params[0] is not payload[0] or any(p.kind not in positional for p in params):
        raise ConfigurationError(
            f"{what} must take the payload as its first positional parameter, "
            "then optionally ctx: Context"
        )
    if payload[0].name not in hints:
        raise ConfigurationError(
            f"annotate the payload parameter {payload[0].name!r} of {what} "
            "(a pydantic model, dict, list, str or bytes)"
        )
    return hints[payload[0].name], bool(context)


def _breaker(value: Any) -> CircuitBreaker | None:
    if value is not None and not isinstance(value, CircuitBreaker):
        raise ConfigurationError("breaker= takes a CircuitBreaker")
    return value


#: The check of each option, by name: the same names as :class:`HandlerOptions`' fields.
_CHECKS: dict[str, Callable[[Any], Any]] = {
    "retry": _retry,
    "transient": _exception_types("transient"),
    "permanent": _exception_types("permanent"),
    "timeout": _timeout,
    "queue_type": _queue_type,
    "delivery_limit": _delivery_limit,
    "severity": _severities,
    "fallback": _fallback_function,
    "breaker": _breaker,
    "max_deliveries": _max_deliveries,
    "runbook": _runbook,
}
assert list(_CHECKS) == [f.name for f in fields(HandlerOptions)], "one check per option"
