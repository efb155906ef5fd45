"""Payload decoding (README "Payloads"): what each annotation accepts, and every body that
cannot be decoded dead-lettered at once with reason decode_error, body untouched."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qworker import App
from qworker import headers as hd
from tests.contract.conftest import Run
from tests.contract.helpers import Order, fast, kinds

# message id -> (body, properties, words of the error message)
UNDECODABLE: dict[str, tuple[bytes, dict[str, Any], str]] = {
    "invalid-json": (b"{not json", {"content_type": "application/json"}, "Invalid JSON"),
    "schema-mismatch": (
        b'{"order_id": "o"}',
        {"content_type": "application/json"},
        "payload does not match Order: amount_cents: Field required",
    ),
    "wrong-type": (
        b'{"order_id": "o", "amount_cents": "many"}',
        {},
        "payload does not match Order: amount_cents: Input should be a valid integer",
    ),
    "binary": (b"\xff\xfe\x00binary", {}, "Invalid JSON"),
    "text-plain": (
        b'{"order_id": "o", "amount_cents": 1}',
        {"content_type": "text/plain"},
        "content type 'text/plain' is not JSON (handler expects Order)",
    ),
    "gzip": (
        b'{"order_id": "o", "amount_cents": 1}',
        {"content_type": "application/json", "content_encoding": "gzip"},
        "content encoding 'gzip' is not supported",
    ),
    "empty": (b"", {}, "Invalid JSON"),
}

ACCEPTED: dict[str, tuple[bytes, dict[str, Any]]] = {
    "no-content-type": (b'{"order_id": "a", "amount_cents": 1}', {}),
    "json": (b'{"order_id": "b", "amount_cents": 2}', {"content_type": "application/json"}),
    "text-json": (b'{"order_id": "c", "amount_cents": 3}', {"content_type": "text/json"}),
    "vendor-json": (
        b'{"order_id": "d", "amount_cents": 4}',
        {"content_type": "application/vnd.shop.order+json; charset=utf-8"},
    ),
    "identity": (
        b'{"order_id": "e", "amount_cents": 5}',
        {"content_type": "application/json", "content_encoding": "identity"},
    ),
}


async def test_a_model_handler_accepts_json_and_dead_letters_what_it_cannot_decode(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    """Undecodable bodies never reach the handler: one dead letter each (decode_error,
    DecodeError, permanent, attempt 1, the body byte for byte, no retry); JSON under any
    JSON content type (or none) is handled."""
    app = make_app()
    handled: dict[str, Order] = {}

    @app.handler(queue, retry=fast())
    async def handle(order: Order) -> None:
        handled[order.order_id] = order

    async with run(app) as h:
        for message_id, (body, props) in ACCEPTED.items():
            await h.publish_raw(queue, body, message_id=message_id, **props)
        for message_id, (body, props, _) in UNDECODABLE.items():
            await h.publish_raw(queue, body, message_id=message_id, **props)
        await h.run_until_idle()
        assert sorted(handled) == ["a", "b", "c", "d", "e"]
        dead = {dl.message_id: dl for dl in await h.dead_letters(queue)}
        assert sorted(dead) == sorted(UNDECODABLE)
        for message_id, (body, props, words) in UNDECODABLE.items():
            dl = dead[message_id]
            assert (message_id, dl.reason, dl.error_type) == (
                message_id,
                "decode_error",
                "qworker.errors.DecodeError",
            )
            assert words in dl.error_message, (message_id, dl.error_message)
            assert dl.body == body
            assert dl.headers[hd.CLASSIFICATION] == "permanent"
            assert dl.attempt == 1
            for name, value in props.items():
                assert dl.properties[name] == value
            assert kinds(h.outcomes, message_id) == [("dead_lettered", 1, "decode_error")]
            (outcome,) = [o for o in h.outcomes if o.message_id == message_id]
            assert (outcome.severity, outcome.duration) == ("medium", 0.0)


async def test_str_bytes_and_dict_handlers_decode_as_annotated(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    """str: UTF-8 text whatever the content type; invalid UTF-8 is a decode_error. bytes:
    anything, as it is. dict: JSON objects; a JSON list is a decode_error."""
    app = make_app()
    texts: list[str] = []
    raws: list[bytes] = []
    dicts: list[dict[str, Any]] = []

    @app.handler(f"{queue}.str", retry=fast())
    async def as_text(payload: str) -> None:
        texts.append(payload)

    @app.handler(f"{queue}.bytes", retry=fast())
    async def as_bytes(payload: bytes) -> None:
        raws.append(payload)

    @app.handler(f"{queue}.dict", retry=fast())
    async def as_dict(payload: dict[str, Any]) -> None:
        dicts.append(payload)

    async with run(app) as h:
        await h.publish_raw(f"{queue}.str", "héllo".encode(), content_type="text/plain")
        await h.publish_raw(f"{queue}.str", b"\xc3\x28", message_id="bad-utf8")
        await h.publish_raw(f"{queue}.bytes", b"\xff\x00\xfe", content_type="image/png")
        await h.publish(f"{queue}.dict", {"a": [1, 2]})
        await h.publish_raw(f"{queue}.dict", b"[1, 2]", message_id="a-list")
        await h.run_until_idle()
        assert texts == ["héllo"]
        assert raws == [b"\xff\x00\xfe"]
        assert dicts == [{"a": [1, 2]}]
        bad = await h.assert_dead_lettered("bad-utf8", queue=f"{queue}.str", reason="decode_error")
        assert bad.error_message == "body is not valid UTF-8 (byte 0)"
        assert bad.body == b"\xc3\x28"
        listed = await h.assert_dead_lettered(
            "a-list", queue=f"{queue}.dict", reason="decode_error"
        )
        assert (
            listed.error_message == "payload does not match dict: body: Input should be an object"
        )
        assert await h.dead_letters(f"{queue}.bytes") == []
