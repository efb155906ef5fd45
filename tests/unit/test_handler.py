"""Payload decoding (make_decoder) and handler validation (build_handler), both pure."""

from __future__ import annotations

import functools
import gzip
import json
import math
from typing import Any

import pydantic
import pytest

from qworker.context import Context
from qworker.errors import ConfigurationError, DecodeError
from qworker.handler import Handler, build_handler, make_decoder, options
from qworker.retry import MAX_TIER_MS, RetryPolicy
from qworker.topology import dlq_name, retry_queue_name


def _short_id(value: object) -> str:
    """A readable test id for huge parameters."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:30]}...({len(text)} chars)"


class OrderPlaced(pydantic.BaseModel):
    order_id: str
    amount_cents: int


class Envelope(pydantic.BaseModel):
    order: OrderPlaced
    tags: list[str] = []


VALID = b'{"order_id": "o-1", "amount_cents": 1250}'


# make_decoder: pydantic models.


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "",
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON;charset=UTF-8",
        "text/json",
        "application/vnd.shop.order+json",
        "application/problem+json; charset=utf-8",
    ],
)
@pytest.mark.parametrize("content_encoding", [None, "", "identity", "utf-8", "UTF8"])
def test_model_decodes_json_with_json_content_types(
    content_type: str | None, content_encoding: str | None
) -> None:
    """A JSON body is validated into the model for JSON content types, or none given."""
    decode = make_decoder(OrderPlaced)
    assert decode(VALID, content_type, content_encoding) == OrderPlaced(
        order_id="o-1", amount_cents=1250
    )


@pytest.mark.parametrize(
    ("body", "fragments"),
    [
        (b'{"order_id": "o-1", "amount_cents": "lots"}', ["OrderPlaced", "amount_cents"]),
        (b'{"order_id": "o-1"}', ["OrderPlaced", "amount_cents", "required"]),
        (b'{"amount_cents": 5}', ["order_id", "required"]),
        (b"[1, 2]", ["OrderPlaced"]),
        (b'"just a string"', ["OrderPlaced"]),
        (b"null", ["OrderPlaced"]),
    ],
)
def test_model_schema_mismatch_is_a_decode_error_naming_the_field(
    body: bytes, fragments: list[str]
) -> None:
    """Valid JSON of the wrong shape fails with DecodeError saying which field is wrong."""
    with pytest.raises(DecodeError) as caught:
        make_decoder(OrderPlaced)(body, "application/json", None)
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_nested_field_errors_name_the_full_path() -> None:
    """A nested field error gives its dotted location."""
    body = b'{"order": {"order_id": "o-1", "amount_cents": "x"}, "tags": ["a", 3]}'
    with pytest.raises(DecodeError) as caught:
        make_decoder(Envelope)(body, None, None)
    assert "order.amount_cents" in str(caught.value)
    assert "tags.1" in str(caught.value)


def test_many_field_errors_are_summarised() -> None:
    """More than three problems are listed as the first three and a count."""

    body = json.dumps({"order": {}, "tags": [1, 2, 3, 4]}).encode()
    with pytest.raises(DecodeError) as caught:
        make_decoder(Envelope)(body, None, None)
    assert "more)" in str(caught.value)


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b"{'single': 'quotes'}", b"not json", b'{"order_id": "o-1",}', b"\xff\xfe{}"],
)
@pytest.mark.parametrize("annotation", [OrderPlaced, dict, list, dict[str, int]])
def test_invalid_json_is_a_decode_error(body: bytes, annotation: Any) -> None:
    """Broken JSON or invalid UTF-8 fails with DecodeError, never a raw parser error."""
    with pytest.raises(DecodeError):
        make_decoder(annotation)(body, "application/json", None)


def test_decode_error_does_not_chain_the_pydantic_error() -> None:
    """The DecodeError stands alone, so its traceback header is short and readable."""
    with pytest.raises(DecodeError) as caught:
        make_decoder(OrderPlaced)(b"{", None, None)
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/octet-stream", "application/xml", "text/html; charset=utf-8"],
)
@pytest.mark.parametrize("annotation", [OrderPlaced, dict, list])
def test_non_json_content_type_is_a_decode_error(content_type: str, annotation: Any) -> None:
    """A JSON payload type refuses a body that declares another content type."""
    with pytest.raises(DecodeError, match="not JSON"):
        make_decoder(annotation)(VALID, content_type, None)


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "GZIP"])
@pytest.mark.parametrize("annotation", [OrderPlaced, dict, str])
def test_compressed_bodies_are_a_decode_error(encoding: str, annotation: Any) -> None:
    """Content encodings qworker does not decode fail clearly instead of as garbage JSON."""
    with pytest.raises(DecodeError, match="encoding"):
        make_decoder(annotation)(gzip.compress(VALID), "application/json", encoding)


# make_decoder: dict, list, str, bytes.


@pytest.mark.parametrize(
    ("annotation", "body", "value"),
    [
        (dict, b'{"a": 1, "b": [true, null]}', {"a": 1, "b": [True, None]}),
        (dict[str, int], b'{"a": 1}', {"a": 1}),
        (list, b'[1, "two", {"three": 3}]', [1, "two", {"three": 3}]),
        (list[int], b"[1, 2, 3]", [1, 2, 3]),
        (dict, '{"name": "Zoë 🎉"}'.encode(), {"name": "Zoë 🎉"}),
    ],
)
def test_json_containers_decode(annotation: Any, body: bytes, value: Any) -> None:
    """dict and list annotations (generic or not) decode JSON."""
    assert make_decoder(annotation)(body, "application/json", None) == value


@pytest.mark.parametrize(
    ("annotation", "body"),
    [(dict, b"[1]"), (list, b'{"a": 1}'), (dict[str, int], b'{"a": "x"}'), (list[int], b'["x"]')],
)
def test_json_of_the_wrong_container_is_a_decode_error(annotation: Any, body: bytes) -> None:
    """A list where a dict is expected (and vice versa) is a DecodeError."""
    with pytest.raises(DecodeError):
        make_decoder(annotation)(body, None, None)


@pytest.mark.parametrize(
    ("body", "text"),
    [(b"hello", "hello"), ("Zoë 🎉".encode(), "Zoë 🎉"), (b"", ""), (b"{not json", "{not json")],
)
@pytest.mark.parametrize("content_type", [None, "text/plain", "application/octet-stream"])
def test_str_decodes_utf8_whatever_the_content_type(
    body: bytes, text: str, content_type: str | None
) -> None:
    """A str payload is the body decoded as UTF-8."""
    assert make_decoder(str)(body, content_type, None) == text


@pytest.mark.parametrize("body", [b"\xff", b"caf\xe9", b"\xc3", b"ok \xed\xa0\x80 surrogate"])
def test_str_with_invalid_utf8_is_a_decode_error(body: bytes) -> None:
    """Invalid UTF-8 fails with DecodeError saying where."""
    with pytest.raises(DecodeError, match="UTF-8"):
        make_decoder(str)(body, "text/plain", None)


@pytest.mark.parametrize("content_type", [None, "application/json", "image/png"])
@pytest.mark.parametrize("encoding", [None, "gzip"])
def test_bytes_are_passed_through_untouched(content_type: str | None, encoding: str | None) -> None:
    """A bytes payload is the raw body, whatever its content type or encoding."""
    body = bytes(range(256)) + gzip.compress(b"x" * 100)
    assert make_decoder(bytes)(body, content_type, encoding) is body


def test_undecodable_annotation_is_a_configuration_error() -> None:
    """A payload type pydantic cannot build a schema for fails when the handler is declared."""

    class Opaque:
        pass

    with pytest.raises(ConfigurationError, match="cannot decode"):
        make_decoder(Opaque)


# build_handler.

OPTIONS: dict[str, Any] = {
    "retry": None,
    "transient": (),
    "permanent": (),
    "timeout": None,
    "queue_type": "quorum",
    "delivery_limit": 10,
}


def _build(func: Any, queue: str = "orders.placed", **overrides: Any) -> Handler:
    return build_handler(func, queue, options(**{**OPTIONS, **overrides}))


async def charge(order: OrderPlaced, ctx: Context) -> None:
    """A well-formed handler."""


async def charge_without_context(order: OrderPlaced) -> None:
    """A well-formed handler without Context."""


async def renamed_context(payload: dict[str, Any], delivery: Context) -> None:
    """Context is found by annotation, whatever the parameter's name."""


async def context_named_ctx_but_not_annotated(payload: dict[str, Any], ctx: dict[str, Any]) -> None:
    """A parameter named ctx without the Context annotation is a second payload."""


def sync_handler(order: OrderPlaced) -> None:
    """Not a coroutine function."""


async def no_parameters() -> None:
    """No payload at all."""


async def only_context(ctx: Context) -> None:
    """Context without a payload."""


async def two_payloads(order: OrderPlaced, other: OrderPlaced) -> None:
    """Two payload parameters."""


async def two_contexts(order: OrderPlaced, a: Context, b: Context) -> None:
    """Two Context parameters."""


async def unannotated(order, ctx: Context) -> None:  # type: ignore[no-untyped-def]
    """Payload without annotation."""


async def context_first(ctx: Context, order: OrderPlaced) -> None:
    """The consumer calls handler(payload, ctx): Context first would swap them."""


async def keyword_only(*, order: OrderPlaced) -> None:
    """A keyword-only payload cannot be passed positionally."""


async def var_keyword(**order: Any) -> None:
    """A **kwargs payload cannot be passed positionally."""


async def unresolvable(order: NoSuchType) -> None:  # type: ignore[name-defined]  # noqa: F821
    """An annotation that names nothing."""


@pytest.mark.parametrize(
    ("func", "wants_context", "payload_value"),
    [
        (charge, True, OrderPlaced(order_id="o-1", amount_cents=1250)),
        (charge_without_context, False, OrderPlaced(order_id="o-1", amount_cents=1250)),
        (renamed_context, True, {"order_id": "o-1", "amount_cents": 1250}),
    ],
)
def test_build_handler_detects_context_by_annotation(
    func: Any, wants_context: bool, payload_value: Any
) -> None:
    """The Context parameter is the one annotated Context; the other decides decoding."""
    handler = _build(func)
    assert handler.wants_context is wants_context
    assert handler.decode(VALID, "application/json", None) == payload_value
    assert handler.name == f"{__name__}:{func.__qualname__}"
    assert handler.func is func


def test_build_handler_fills_defaults() -> None:
    """Without options the handler gets the default policy, quorum queue and limit 10."""
    handler = _build(charge, transient=KeyError, permanent=[ValueError, TypeError], timeout=2)
    assert handler.options.retry == RetryPolicy()
    assert handler.options.transient == (KeyError,)
    assert handler.options.permanent == (ValueError, TypeError)
    assert handler.options.timeout == 2.0
    assert isinstance(handler.options.timeout, float)
    assert handler.options.queue_type == "quorum"
    assert handler.options.delivery_limit == 10
    assert handler.queue == "orders.placed"


@pytest.mark.parametrize(
    ("func", "match"),
    [
        (sync_handler, "async def"),
        (functools.partial(sync_handler), "async def"),
        (functools.partial(charge_without_context), "cannot resolve"),
        (no_parameters, "one payload parameter"),
        (only_context, "one payload parameter"),
        (two_payloads, "one payload parameter"),
        (two_contexts, "one payload parameter"),
        (context_named_ctx_but_not_annotated, "one payload parameter"),
        (unannotated, "annotate the payload"),
        (context_first, "first positional"),
        (keyword_only, "first positional"),
        (var_keyword, "first positional"),
        (unresolvable, "cannot resolve"),
        (print, "async def"),
    ],
    ids=lambda v: getattr(v, "__name__", None) or type(v).__name__ if callable(v) else None,
)
def test_build_handler_rejects_bad_signatures(func: Any, match: str) -> None:
    """A handler that the consumer could not call correctly fails when declared."""
    with pytest.raises(ConfigurationError, match=match):
        _build(func)


def test_build_handler_rejects_a_callable_object() -> None:
    """An object with an async __call__ is not an async def function."""

    class Callable:
        async def __call__(self, order: OrderPlaced) -> None:
            pass

    with pytest.raises(ConfigurationError, match="async def"):
        _build(Callable())


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"timeout": 0}, "timeout"),
        ({"timeout": -1}, "timeout"),
        ({"timeout": math.nan}, "timeout"),
        ({"timeout": "30"}, "timeout"),
        ({"timeout": True}, "timeout"),
        ({"queue_type": "stream"}, "queue_type"),
        ({"queue_type": "Quorum"}, "queue_type"),
        ({"queue_type": None}, "queue_type"),
        ({"delivery_limit": 0}, "delivery_limit"),
        ({"delivery_limit": -1}, "delivery_limit"),
        ({"delivery_limit": 2.5}, "delivery_limit"),
        ({"delivery_limit": True}, "delivery_limit"),
        ({"delivery_limit": "10"}, "delivery_limit"),
        ({"retry": {"max_attempts": 3}}, "RetryPolicy"),
        ({"transient": "TimeoutError"}, "transient"),
        ({"transient": (TimeoutError, "ConnectionError")}, "transient"),
        ({"transient": TimeoutError()}, "transient"),
        ({"transient": (int,)}, "transient"),
        ({"transient": None}, "transient"),
        ({"permanent": [KeyError, 3]}, "permanent"),
        ({"permanent": object}, "permanent"),
    ],
    ids=_short_id,
)
def test_build_handler_rejects_bad_options(overrides: dict[str, Any], match: str) -> None:
    """Every invalid option fails when the decorator runs, naming the option."""
    with pytest.raises(ConfigurationError, match=match):
        _build(charge, **overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        {"timeout": 0.001},
        {"timeout": 3600},
        {"queue_type": "classic"},
        {"delivery_limit": 1},
        {"transient": [TimeoutError, ConnectionError]},
        {"permanent": BaseException},
        {"retry": RetryPolicy(max_attempts=1)},
    ],
    ids=_short_id,
)
def test_build_handler_accepts_valid_options(overrides: dict[str, Any]) -> None:
    """Valid edge values are accepted."""
    _build(charge, **overrides)


@pytest.mark.parametrize(
    ("queue", "match"),
    [
        ("", "non-empty"),
        (None, "non-empty"),
        (123, "non-empty"),
        (b"orders", "non-empty"),
        ("amq.orders", "amq."),
        ("amq.", "amq."),
        ("q" * 240, "too long"),
        ("é" * 120, "too long"),
    ],
    ids=_short_id,
)
def test_build_handler_rejects_bad_queue_names(queue: Any, match: str) -> None:
    """Empty, reserved (amq.*) or too long names (no room for .retry.<tier>) are rejected."""
    with pytest.raises(ConfigurationError, match=match):
        _build(charge, queue=queue)


@pytest.mark.parametrize("queue", ["orders", "amqp.orders", "x.amq.y", "q" * 200, "заказы"])
def test_build_handler_accepts_reasonable_queue_names(queue: str) -> None:
    """Ordinary names, including non-ASCII and up to ~230 bytes, are accepted."""
    assert _build(charge, queue=queue).queue == queue


def test_longest_accepted_name_still_fits_every_derived_queue() -> None:
    """The longest accepted name plus the longest tier suffix stays within AMQP's 255 bytes."""
    longest = max(
        (n for n in range(1, 256) if _accepts("q" * n)),
        default=0,
    )
    assert longest >= 200
    queue = "q" * longest
    assert len(retry_queue_name(queue, MAX_TIER_MS - 1).encode()) <= 255
    assert len(dlq_name(queue).encode()) <= 255


def _accepts(queue: str) -> bool:
    try:
        _build(charge, queue=queue)
    except ConfigurationError:
        return False
    return True


def test_app_handler_takes_exactly_the_handler_options_in_their_order() -> None:
    """One list of handler options: App.handler's keyword parameters are HandlerOptions' fields
    (App.handler passes them on by name), and each is documented in its Args block."""
    import dataclasses
    import inspect

    from qworker import App
    from qworker.handler import HandlerOptions

    fields = [f.name for f in dataclasses.fields(HandlerOptions)]
    keywords = [
        p.name
        for p in inspect.signature(App.handler).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    assert keywords == fields
    defaults = {f.name: f.default for f in dataclasses.fields(HandlerOptions)}
    for p in inspect.signature(App.handler).parameters.values():
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not None:
            assert p.default == defaults[p.name], p.name


def test_an_unknown_handler_option_is_a_configuration_error() -> None:
    """options() names what it does not know instead of ignoring it."""
    with pytest.raises(ConfigurationError, match=r"unknown handler option.*retries"):
        options(retries=3)
