"""What every ``qworker`` command shares: exit codes, one-line failures, loading APP, ``--url``.

Exit codes: 0 success; 1 runtime failure (broker unreachable, queue missing,
unreadable file, ...); 2 bad usage or arguments; 3 the app cannot be loaded or is
misconfigured. Failures are one line on stderr, never a traceback.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from qworker.connection import normalise_urls
from qworker.errors import ConfigurationError, QworkerError
from qworker.redact import escape_control, redact

if TYPE_CHECKING:
    from qworker.app import App

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_APP = 3
DEFAULT_URL = "amqp://guest:guest@localhost:5672/"

T = TypeVar("T")


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    """Print one escaped, redacted line to stderr and exit with ``code``."""
    click.echo(f"qworker: error: {escape_control(redact(message))}", err=True)
    sys.exit(code)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro``; turn any failure into one line on stderr."""
    try:
        return asyncio.run(coro)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except ConfigurationError as exc:
        fail(str(exc), EXIT_APP)
    except QworkerError as exc:
        fail(str(exc))
    except Exception as exc:
        if os.environ.get("QWORKER_DEBUG"):
            raise
        fail(f"{type(exc).__name__}: {exc}")


def load_app(spec: str, url: str | None = None) -> App:
    """Import ``module:attribute`` (from the current directory too) and return the App."""
    from qworker.app import App  # the worker's modules: only commands that load an app

    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        fail(f"APP must look like module:attribute, got {spec!r}", EXIT_USAGE)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        fail(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}", EXIT_APP)
    app = getattr(module, attribute, None)
    if not isinstance(app, App):
        fail(f"{spec!r} is not a qworker App (got {type(app).__name__})", EXIT_APP)
    if url:
        try:
            app.urls = normalise_urls(url.split(","))
        except ConfigurationError as exc:
            fail(str(exc), EXIT_USAGE)
    return app


def url_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--url``, also read from ``QWORKER_URL``; several cluster nodes separated by commas."""
    return click.option(
        "--url",
        envvar="QWORKER_URL",
        default=None,
        help="Broker URL(s), comma separated (env QWORKER_URL). Default: the app's own URL.",
    )(func)
