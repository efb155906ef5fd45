"""Classification order (SPEC section 2): raised Permanent/Transient/Retry, the handler's
permanent= then transient= types, the app's classifier, the built-in rules, the default."""

from __future__ import annotations

import json
from collections.abc import Callable

from qworker import App, Context, Permanent, Transient
from qworker import headers as hd
from tests.contract.conftest import Run
from tests.contract.helpers import Order, fast, kinds


class TransientLookup(Transient, LookupError):
    """Transient raised, although the handler lists LookupError as permanent."""


class PermanentConnection(Permanent, ConnectionError):
    """Permanent raised, although ConnectionError is transient everywhere else."""


class Unrecognised(Exception):
    """Nothing recognises it: the app's default decides."""


def _raise(kind: str) -> None:
    if kind == "permanent":
        raise Permanent("bad order")
    if kind == "transient":
        raise Transient("try later")
    if kind == "transient-lookup":
        raise TransientLookup("raised Transient wins over permanent=")
    if kind == "permanent-connection":
        raise PermanentConnection("raised Permanent wins over the built-in rule")
    if kind == "key-error":  # KeyError is in permanent= (as a LookupError) and in transient=
        raise KeyError("customer 42")
    if kind == "permission":  # transient= wins over the app's classifier
        raise PermissionError("denied")
    if kind == "timeout":  # the app's classifier says permanent, before the built-in rule
        raise TimeoutError("classifier says permanent")
    if kind == "classifier-raises":  # no opinion: the built-in rule (transient)
        raise ConnectionResetError("peer reset")
    if kind == "classifier-nonsense":  # an answer that is no classification: no opinion
        raise ArithmeticError("odd")
    if kind == "validation":  # built-in: a pydantic error inside the handler is permanent
        Order.model_validate({"order_id": "o"})
    if kind == "json":
        json.loads("{nope")
    if kind == "unrecognised":
        raise Unrecognised("who knows")


def _classifier(exc: BaseException) -> str | None:
    if isinstance(exc, ConnectionResetError):
        raise RuntimeError("the classifier itself is buggy")
    if isinstance(exc, ArithmeticError):
        return "maybe"
    if isinstance(exc, TimeoutError | PermissionError):
        return "permanent"
    return None


# kind -> (executions, the outcomes' (kind, attempt, tier or reason), error type)
EXPECTED: dict[str, tuple[int, list[tuple[str, int, str | None]], str]] = {
    "permanent": (1, [("dead_lettered", 1, "permanent_error")], "qworker.errors.Permanent"),
    "transient": (
        2,
        [("retried", 1, "50ms"), ("dead_lettered", 2, "retries_exhausted")],
        "qworker.errors.Transient",
    ),
    "transient-lookup": (
        2,
        [("retried", 1, "50ms"), ("dead_lettered", 2, "retries_exhausted")],
        f"{__name__}.TransientLookup",
    ),
    "permanent-connection": (
        1,
        [("dead_lettered", 1, "permanent_error")],
        f"{__name__}.PermanentConnection",
    ),
    "key-error": (1, [("dead_lettered", 1, "permanent_error")], "builtins.KeyError"),
    "permission": (
        2,
        [("retried", 1, "50ms"), ("dead_lettered", 2, "retries_exhausted")],
        "builtins.PermissionError",
    ),
    "timeout": (1, [("dead_lettered", 1, "permanent_error")], "builtins.TimeoutError"),
    "classifier-raises": (
        2,
        [("retried", 1, "50ms"), ("dead_lettered", 2, "retries_exhausted")],
        "builtins.ConnectionResetError",
    ),
    "classifier-nonsense": (
        2,
        [("retried", 1, "50ms"), ("dead_lettered", 2, "retries_exhausted")],
        "builtins.ArithmeticError",
    ),
    "validation": (
        1,
        [("dead_lettered", 1, "permanent_error")],
        "pydantic_core._pydantic_core.ValidationError",
    ),
    "json": (1, [("dead_lettered", 1, "permanent_error")], "json.decoder.JSONDecodeError"),
    "unrecognised": (
        2,
        [("retried", 1, "50ms"), ("dead_lettered", 2, "retries_exhausted")],
        f"{__name__}.Unrecognised",
    ),
}


async def test_classification_follows_the_contracts_order(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    """One message per rule; each ends as the first applicable rule says, with the
    classification, reason, attempt and error type written to its dead letter."""
    app = make_app(classify=_classifier)
    calls: dict[str, int] = {}

    @app.handler(
        queue,
        retry=fast(max_attempts=2),
        permanent=(LookupError,),
        transient=(KeyError, PermissionError),
    )
    async def handle(payload: dict[str, str], ctx: Context) -> None:
        calls[payload["kind"]] = calls.get(payload["kind"], 0) + 1
        _raise(payload["kind"])

    async with run(app) as h:
        for kind in EXPECTED:
            await h.publish(queue, {"kind": kind}, message_id=kind)
        await h.run_until_idle()
        dead = {dl.message_id: dl for dl in await h.dead_letters(queue)}
        for kind, (executions, outcomes, error_type) in EXPECTED.items():
            assert (kind, calls[kind]) == (kind, executions)
            assert (kind, kinds(h.outcomes, kind)) == (kind, outcomes)
            dl = dead[kind]
            transient = outcomes[-1][2] == "retries_exhausted"
            assert (kind, dl.error_type, dl.attempt, dl.headers[hd.CLASSIFICATION]) == (
                kind,
                error_type,
                executions,
                "transient" if transient else "permanent",
            )
        assert len(dead) == len(EXPECTED)


async def test_the_apps_default_permanent_applies_only_to_unrecognised_errors(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    """App(default="permanent"): an unknown error is dead-lettered at once; a ConnectionError
    is still transient (built-in rule before the default)."""
    app = make_app(default="permanent")

    @app.handler(queue, retry=fast(max_attempts=2))
    async def handle(payload: dict[str, str]) -> None:
        if payload["kind"] == "connection":
            raise ConnectionError("down")
        raise Unrecognised("bug")

    async with run(app) as h:
        await h.publish(queue, {"kind": "bug"}, message_id="bug")
        await h.publish(queue, {"kind": "connection"}, message_id="connection")
        await h.run_until_idle()
        assert kinds(h.outcomes, "bug") == [("dead_lettered", 1, "permanent_error")]
        assert kinds(h.outcomes, "connection") == [
            ("retried", 1, "50ms"),
            ("dead_lettered", 2, "retries_exhausted"),
        ]


async def test_error_codes_and_runbooks_reach_the_dead_letter(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    """Permanent(code=...) gives x-qworker-error-code and, through App(runbooks=), the
    runbook; an exception with a string code attribute counts too; a code that is not a
    name is left out."""

    class GatewayError(Exception):
        code = "GATEWAY_DOWN"

    app = make_app(runbooks={"CUSTOMER_UNKNOWN": "https://runbooks.example/customer"})

    @app.handler(queue, retry=fast(max_attempts=1))
    async def handle(payload: dict[str, str]) -> None:
        if payload["kind"] == "coded":
            raise Permanent("no such customer", code="CUSTOMER_UNKNOWN")
        if payload["kind"] == "attribute":
            raise GatewayError("gateway 502")
        raise Permanent("odd code", code="not a code!")

    async with run(app) as h:
        for kind in ("coded", "attribute", "bad-code"):
            await h.publish(queue, {"kind": kind}, message_id=kind)
        await h.run_until_idle()
        coded = await h.assert_dead_lettered("coded", queue=queue, reason="permanent_error")
        assert coded.headers[hd.ERROR_CODE] == "CUSTOMER_UNKNOWN"
        assert coded.headers[hd.RUNBOOK] == "https://runbooks.example/customer"
        assert (coded.error_code, coded.runbook) == (
            "CUSTOMER_UNKNOWN",
            "https://runbooks.example/customer",
        )
        attribute = await h.assert_dead_lettered("attribute", reason="retries_exhausted")
        assert attribute.headers[hd.ERROR_CODE] == "GATEWAY_DOWN"
        assert hd.RUNBOOK not in attribute.headers
        bad = await h.assert_dead_lettered("bad-code", reason="permanent_error")
        assert hd.ERROR_CODE not in bad.headers
        by_id = {o.message_id: o for o in h.outcomes}
        assert (by_id["coded"].error_code, by_id["coded"].runbook) == (
            "CUSTOMER_UNKNOWN",
            "https://runbooks.example/customer",
        )
        assert (by_id["attribute"].error_code, by_id["attribute"].runbook) == (
            "GATEWAY_DOWN",
            None,
        )


async def test_the_handlers_runbook_comes_before_the_apps(
    make_app: Callable[..., App], run: Run, queue: str
) -> None:
    app = make_app(runbooks={"CUSTOMER_UNKNOWN": "https://runbooks.example/app"})

    @app.handler(queue, retry=fast(max_attempts=1), runbook="https://runbooks.example/handler")
    async def handle(payload: dict[str, str]) -> None:
        raise Permanent("no such customer", code="CUSTOMER_UNKNOWN")

    async with run(app) as h:
        await h.publish(queue, {"n": "1"}, message_id="m-1")
        await h.run_until_idle()
        dl = await h.assert_dead_lettered("m-1", queue=queue, reason="permanent_error")
        assert dl.headers[hd.RUNBOOK] == "https://runbooks.example/handler"
        assert dl.headers[hd.ERROR_CODE] == "CUSTOMER_UNKNOWN"
