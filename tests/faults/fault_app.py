"""Worker apps for the fault suite, run as ``qworker run tests.faults.fault_app:<app>``.

Environment (set by the harness):
- ``QWF_URL``: comma-separated broker URL(s); ``QWF_NAME``: the connection name (the harness
  closes connections by this name); ``QWF_CA``: optional CA file for ``amqps://``.
- ``QWF_QUEUE``: the handler queue (``hostile_app`` adds suffixes ``.json``, ``.model``, ...).
- ``QWF_LEDGER``: a directory; each process appends ``S <id> <attempt> <unix time>`` to its own
  ``ledger-<pid>.txt`` (``os.write`` on an ``O_APPEND`` file, then ``fsync``) *before* the handler
  returns, so a success is on disk before the worker can ack it.
- ``QWF_CONTROL``: a directory; while a file ``hang`` exists there, every handler hangs past its
  timeout (a stuck downstream dependency).
- ``QWF_TIMEOUT``: the handler timeout in seconds (default 0.5).

Payload modes (``fault_app``): ``ok``; ``transient`` (ConnectionError on attempt 1, then ok);
``hang`` (sleeps past the timeout on attempt 1, then ok); ``permanent`` (LookupError, a
``permanent=`` type: dead letter ``permanent_error``); ``exhausted`` (ConnectionError on every
attempt: dead letter ``retries_exhausted``); ``replay`` (Permanent until the message was replayed
from the DLQ, then ok).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from qworker import App, Context, Permanent, RetryPolicy
from tests.support.cli import subprocess_env

URLS = os.environ.get("QWF_URL", "amqp://guest:guest@127.0.0.1:5672/").split(",")
NAME = os.environ.get("QWF_NAME", "qwf")
QUEUE = os.environ.get("QWF_QUEUE", "qwf.default")
TIMEOUT = float(os.environ.get("QWF_TIMEOUT", "0.5"))
LEDGER = os.environ.get("QWF_LEDGER")
CONTROL = os.environ.get("QWF_CONTROL")
CA = os.environ.get("QWF_CA") or None
POLICY = RetryPolicy(max_attempts=3, initial_delay=0.2, multiplier=2.0, jitter=0)

_fd: int | None = None


def worker_env(
    urls: Sequence[str], name: str, queue: str, ledger: Path, control: Path, **extra: str
) -> dict[str, str]:
    """The environment of a worker of these apps, for :class:`tests.support.workers.WorkerPool`."""
    return subprocess_env(
        {
            "QWF_URL": ",".join(urls),
            "QWF_NAME": name,
            "QWF_QUEUE": queue,
            "QWF_LEDGER": str(ledger),
            "QWF_CONTROL": str(control),
            **extra,
        }
    )


def record(kind: str, message_id: str, attempt: int) -> None:
    """Append one line to this process's ledger file and fsync it."""
    global _fd
    if LEDGER is None:
        return
    if _fd is None:
        path = os.path.join(LEDGER, f"ledger-{os.getpid()}.txt")
        _fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(_fd, f"{kind} {message_id} {attempt} {time.time():.6f}\n".encode())
    os.fsync(_fd)


async def _hang_if_told() -> None:
    if CONTROL and os.path.exists(os.path.join(CONTROL, "hang")):
        await asyncio.sleep(TIMEOUT * 20)


class Item(BaseModel):
    id: str
    mode: str = "ok"


app = App(URLS, name=NAME, ssl_ca=CA)


@app.handler(
    QUEUE, retry=POLICY, timeout=TIMEOUT, transient=(ConnectionError,), permanent=(LookupError,)
)
async def handle(item: Item, ctx: Context) -> None:
    """Behave as ``item.mode`` says; record the success in the ledger."""
    await _hang_if_told()
    mode = item.mode
    if mode == "transient" and ctx.attempt == 1:
        raise ConnectionError("downstream refused the connection (attempt 1)")
    if mode == "hang" and ctx.attempt == 1:
        await asyncio.sleep(TIMEOUT * 20)
    if mode == "permanent":
        raise LookupError(f"no such account for {item.id}")
    if mode == "exhausted":
        raise ConnectionError(f"downstream still down (attempt {ctx.attempt})")
    if mode == "replay" and not ctx.headers.get("x-qworker-replay-count"):
        raise Permanent("rejected until an operator replays it")
    record("S", item.id, ctx.attempt)


# Secrets: every failure text carries credentials that must not leave the process.
SECRETS = {
    "password": "hunter2-Zq8xWv3",
    "bearer": "eyJhbGciOiJIUzI1NiJ9.c2VjcmV0LXRva2Vu.Qm9yaW5nU2lnbmF0dXJl",
    "url_password": "Amqp-S3cret-pw7",
    "api_key": "ak_live_9f8e7d6c5b4a3210",
    "token_header": "tok-5f4e3d2c1b0a",
}

secrets_app = App(URLS, name=NAME, ssl_ca=CA)


class _LeakyError(RuntimeError):
    """An exception whose ``str`` and ``repr`` both carry a password."""


@secrets_app.handler(
    QUEUE,
    retry=RetryPolicy(max_attempts=2, initial_delay=0.1, jitter=0),
    permanent=(ValueError,),
)
async def leak(payload: dict[str, Any], ctx: Context) -> None:
    """Fail with a secret in the message, in a chained cause, or both, as the payload says."""
    s = SECRETS
    kind = payload["kind"]
    if kind == "password":
        raise ValueError(f"login failed for user=bob password={s['password']}")
    if kind == "bearer":
        raise ValueError(f"HTTP 401 calling api with Authorization: Bearer {s['bearer']}")
    if kind == "url":
        url = f"amqp://admin:{s['url_password']}@rabbit.internal:5672/prod"
        raise ConnectionError(f"cannot reach {url}")  # transient: retried, then exhausted
    if kind == "chained":
        try:
            raise _LeakyError(f"config: api_key={s['api_key']} token: {s['token_header']}")
        except _LeakyError as inner:
            raise ValueError("upstream call failed") from inner
    if kind == "dict":
        config = {"password": s["password"], "api_key": s["api_key"]}
        raise ValueError(f"bad config {config!r}")
    record("S", ctx.message_id or "?", ctx.attempt)


# Hostile input: one queue per payload type, so that every decoder sees the fuzzed bodies.
hostile_app = App(URLS, name=NAME, ssl_ca=CA)
HOSTILE_POLICY = RetryPolicy(max_attempts=2, initial_delay=0.05, jitter=0)


async def _hostile_outcome(ctx: Context) -> None:
    # A header the fuzzer may set asks for a failure, so that failure paths see hostile input too.
    wanted = ctx.headers.get("fail")
    if wanted == "permanent":
        raise Permanent("asked to fail")
    if wanted == "transient":
        raise ConnectionError("asked to fail transiently")
    record("S", ctx.message_id or "?", ctx.attempt)


@hostile_app.handler(f"{QUEUE}.json", retry=HOSTILE_POLICY, timeout=5)
async def hostile_json(payload: dict[str, Any], ctx: Context) -> None:
    await _hostile_outcome(ctx)


@hostile_app.handler(f"{QUEUE}.model", retry=HOSTILE_POLICY, timeout=5)
async def hostile_model(payload: Item, ctx: Context) -> None:
    await _hostile_outcome(ctx)


@hostile_app.handler(f"{QUEUE}.text", retry=HOSTILE_POLICY, timeout=5)
async def hostile_text(payload: str, ctx: Context) -> None:
    await _hostile_outcome(ctx)


@hostile_app.handler(f"{QUEUE}.bytes", retry=HOSTILE_POLICY, timeout=5)
async def hostile_bytes(payload: bytes, ctx: Context) -> None:
    await _hostile_outcome(ctx)
