"""The console's JSON API (the pages use it for every change; scripts and chat bots can too).

| request | answer |
|---|---|
| ``GET /api/dlqs`` | ``[{"queue", "messages", "oldest_failure", ...}]`` |
| ``GET /api/dlqs/{dlq}/groups[?rescan=1]`` | ``[{"fingerprint", "count", "reason", ...}]`` |
| ``GET /api/dlqs/{dlq}/messages?<filter>&limit=&offset=`` | records in the export format |
| ``GET /api/dlqs/{dlq}/messages/{message_id}`` | one record |
| ``GET /api/dlqs/{dlq}/export?<filter>&limit=`` | JSONL, as ``qworker dlq export`` writes it |
| ``POST /api/dlqs/{dlq}/replay`` | ``{"job": id}`` (202) |
| ``POST /api/dlqs/{dlq}/purge`` | ``{"job": id}`` (202) |
| ``POST /api/dlqs/{dlq}/messages/{message_id}/edit`` | ``{"target", "validated", ...}`` |
| ``GET /api/jobs/{id}`` | ``{"state", "replayed", "skipped", "failed", ...}`` |
| ``GET /api/openapi.json`` | the OpenAPI description of all this |

Every error is ``{"error": "<one sentence>"}`` with a 4xx/5xx status (see
:mod:`qworker.console.errors`). Request bodies are JSON objects of at most
:data:`BODY_BYTES`; unknown fields are refused, so a typo never means "everything".
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from qworker import dlq as lib
from qworker.console import paths
from qworker.console.errors import ConsoleError, Invalid
from qworker.console.masking import masked_record
from qworker.console.openapi import DESCRIPTION
from qworker.console.service import FILTER_KEYS, PAGE_LIMIT, Console, filter_from
from qworker.dlq import audit
from qworker.dlq.jsonl import to_record

#: The largest request body read (an edited message body included).
BODY_BYTES = 8 * 1024 * 1024
#: Bounds of replay options, so that a typo cannot ask for a week of waiting.
MAX_CANARY = 10_000
MAX_RATE = 100_000.0
MAX_CANARY_SECONDS = 3600.0
_EXPORT_CHUNK = 64 * 1024

paths.install()  # the {name:segment} convertor, before the routes below are made


def console_of(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


def actor_of(request: Request) -> str:
    """Who acts, for the audit trail: the console's user and host, and the client's address."""
    client = request.client.host if request.client else "unknown"
    return f"{audit.actor()} (console, from {client})"[:200]


async def read_json(request: Request) -> dict[str, Any]:
    """The request body as a JSON object; raises :class:`Invalid` for anything else."""
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > BODY_BYTES:
            raise Invalid(f"request body over {BODY_BYTES // (1024 * 1024)} MiB")
    try:
        value = json.loads(bytes(raw) or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Invalid(f"the body is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise Invalid("the body must be a JSON object")
    return value


def _only(body: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(str(k) for k in body if k not in allowed)
    if unknown:
        raise Invalid(
            f"unknown field {', '.join(map(repr, unknown))[:200]}; known: {', '.join(allowed)}"
        )


def _int(value: Any, name: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(f"{name} must be a whole number")
    if value < low or (high is not None and value > high):
        raise Invalid(
            f"{name} must be {low} to {high}" if high else f"{name} must be {low} or more"
        )
    return value


def _number(value: Any, name: str, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= high:
        raise Invalid(f"{name} must be a number above 0 and at most {high:g}")
    return float(value)


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise Invalid(f"{name} must be non-empty text")
    return value


def _query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    if not re.fullmatch(r"\d{1,9}", raw):
        raise Invalid(f"{name} must be a whole number")
    return _int(int(raw), name, low, high)


def query_filter(request: Request, *extra: str) -> lib.Filter:
    """The filter in the query string (unknown parameters are refused)."""
    params = request.query_params
    unknown = sorted(k for k in params if k not in FILTER_KEYS and k not in extra)
    if unknown:
        raise Invalid(f"unknown parameter {', '.join(map(repr, unknown))[:200]}")
    return filter_from({key: params[key] for key in FILTER_KEYS if key in params})


async def list_dlqs(request: Request) -> Response:
    overview = await console_of(request).overview()
    return JSONResponse([dlq.to_json() for dlq in overview])


async def groups(request: Request) -> Response:
    rescan = request.query_params.get("rescan", "") in ("1", "true", "yes")
    scan = await console_of(request).scan(request.path_params["dlq"], rescan=rescan)
    info = scan.info
    return JSONResponse(
        [group.to_json() for group in scan.groups],
        headers={
            "x-qworker-scan-taken-at": info.taken_at.isoformat(),
            "x-qworker-scan-seconds": f"{info.seconds:.3f}",
            "x-qworker-scan-stale": "true" if info.stale else "false",
        },
    )


async def messages(request: Request) -> Response:
    chosen = query_filter(request, "limit", "offset")
    limit = _query_int(request, "limit", 50, 1, PAGE_LIMIT)
    offset = _query_int(request, "offset", 0, 0, 10**9)
    page = await console_of(request).messages(
        request.path_params["dlq"], chosen, limit=limit, offset=offset
    )
    headers = {}
    if page.next_offset is not None:
        headers["x-qworker-next-offset"] = str(page.next_offset)
    return JSONResponse([shown(dl) for dl in page.records], headers=headers)


async def message(request: Request) -> Response:
    found = await console_of(request).message(
        request.path_params["dlq"], request.path_params["message_id"]
    )
    return JSONResponse(shown(found))


def shown(dl: lib.DeadLetter) -> dict[str, Any]:
    """A dead letter as the API shows it: the export format, secret-looking headers masked."""
    return masked_record(to_record(dl))


def _safe_filename(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:100] or "dlq"


async def export(request: Request) -> Response:
    chosen = query_filter(request, "limit")
    limit = _query_int(request, "limit", 0, 0, 10**9) or None
    dlq = request.path_params["dlq"]
    exporting = console_of(request).export(dlq, chosen, limit=limit)
    out = await exporting.__aenter__()  # read now, so that errors answer with a status

    async def chunks() -> AsyncIterator[str]:
        try:
            while chunk := out.read(_EXPORT_CHUNK):
                yield chunk
        finally:
            await exporting.__aexit__(None, None, None)

    return StreamingResponse(
        chunks(),
        media_type="application/x-ndjson",
        headers={"content-disposition": f'attachment; filename="{_safe_filename(dlq)}.jsonl"'},
    )


REPLAY_FIELDS = (
    "filter",
    "canary",
    "rate",
    "dry_run",
    "to",
    "limit",
    "canary_wait",
    "canary_timeout",
)


def replay_options(body: Mapping[str, Any]) -> lib.ReplayOptions:
    """:class:`qworker.dlq.ReplayOptions` from a replay request; raises :class:`Invalid`."""
    _only(body, REPLAY_FIELDS)
    options: dict[str, Any] = {}
    if body.get("canary") is not None:
        options["canary"] = _int(body["canary"], "canary", 0, MAX_CANARY)
    if body.get("rate") is not None:
        options["rate"] = _number(body["rate"], "rate", MAX_RATE)
    if body.get("limit") is not None:
        options["limit"] = _int(body["limit"], "limit", 1)
    if body.get("to") is not None:
        options["to"] = _text(body["to"], "to")
    for name in ("canary_wait", "canary_timeout"):
        if body.get(name) is not None:
            options[name] = _number(body[name], name, MAX_CANARY_SECONDS)
    dry_run = body.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise Invalid("dry_run must be true or false")
    return lib.ReplayOptions(dry_run=dry_run, **options)


async def replay(request: Request) -> Response:
    body = await read_json(request)
    options = replay_options(body)
    job = await console_of(request).start_replay(
        request.path_params["dlq"],
        filter_from(body.get("filter")),
        options,
        actor=actor_of(request),
    )
    return JSONResponse({"job": job.id, "state": job.state}, status_code=202)


async def purge(request: Request) -> Response:
    body = await read_json(request)
    _only(body, ("filter", "confirm", "limit"))
    limit = _int(body["limit"], "limit", 1) if body.get("limit") is not None else None
    confirm = body.get("confirm")
    if not isinstance(confirm, str):
        raise Invalid('purging needs "confirm": the DLQ\'s exact name')
    job = await console_of(request).start_purge(
        request.path_params["dlq"],
        filter_from(body.get("filter")),
        confirm=confirm,
        limit=limit,
        actor=actor_of(request),
    )
    return JSONResponse({"job": job.id, "state": job.state}, status_code=202)


def edited_body(body: Mapping[str, Any]) -> bytes:
    """The new message body: ``body`` as text (``body_encoding`` ``utf-8``, the default)
    or base64 (``base64``), as the export format writes it."""
    text = body.get("body")
    if not isinstance(text, str):
        raise Invalid('"body" must be text (base64 with "body_encoding": "base64")')
    encoding = body.get("body_encoding", "utf-8")
    if encoding == "utf-8":
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:
            raise Invalid('"body" is not valid UTF-8 text') from None
    if encoding == "base64":
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise Invalid('"body" is not valid base64') from None
    raise Invalid('"body_encoding" must be "utf-8" or "base64"')


async def edit(request: Request) -> Response:
    body = await read_json(request)
    _only(body, ("body", "body_encoding", "to"))
    to = _text(body["to"], "to") if body.get("to") is not None else None
    result = await console_of(request).edit(
        request.path_params["dlq"],
        request.path_params["message_id"],
        edited_body(body),
        to=to,
        actor=actor_of(request),
    )
    return JSONResponse(result)


async def job(request: Request) -> Response:
    return JSONResponse(console_of(request).job(request.path_params["job_id"]).to_json())


async def openapi(request: Request) -> Response:
    return JSONResponse(DESCRIPTION)


def error_response(exc: ConsoleError) -> Response:
    """An error as the API answers it."""
    return JSONResponse({"error": exc.message}, status_code=exc.status)


routes = [
    Route("/api/dlqs", list_dlqs),
    Route("/api/openapi.json", openapi),
    Route("/api/dlqs/{dlq:segment}/groups", groups),
    Route("/api/dlqs/{dlq:segment}/messages", messages),
    Route("/api/dlqs/{dlq:segment}/export", export),
    Route("/api/dlqs/{dlq:segment}/messages/{message_id:segment}", message),
    Route("/api/dlqs/{dlq:segment}/messages/{message_id:segment}/edit", edit, methods=["POST"]),
    Route("/api/dlqs/{dlq:segment}/replay", replay, methods=["POST"]),
    Route("/api/dlqs/{dlq:segment}/purge", purge, methods=["POST"]),
    Route("/api/jobs/{job_id:segment}", job),
]
