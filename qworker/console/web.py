"""The console as an ASGI application: the JSON API, the pages, the assets, the guard.

Request path: :class:`~qworker.console.paths.RawPath` (route on the path as sent, so a
``%2F`` inside a queue name stays inside it) -> :class:`~qworker.console.security.Guard`
(who may do what; security headers on every answer) -> the routes. Page and API
routes name their parameters ``{name:segment}`` (decoded once, after routing).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from qworker.console import api, pages, paths, security
from qworker.console.errors import ConsoleError
from qworker.console.security import Access, Guard
from qworker.console.service import Console

STATIC = Path(__file__).parent / "static"


async def _console_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ConsoleError)
    if request.url.path.startswith("/api/"):
        return api.error_response(exc)
    return PlainTextResponse(exc.message, status_code=exc.status)


def create_app(console: Console, access: Access) -> Starlette:
    """The console's ASGI application.

    Args:
        console: What it serves (the DLQs and the actions on them).
        access: Its token and sessions.
    """
    paths.install()

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await console.close()

    app = Starlette(
        routes=[
            *api.routes,
            Route("/login", security.login, methods=["POST"]),
            Route("/logout", security.logout, methods=["POST"]),
            *pages.routes(),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        middleware=[Middleware(paths.RawPath), Middleware(Guard, access=access)],
        exception_handlers={ConsoleError: _console_error},
        lifespan=lifespan,
    )
    app.state.console = console
    app.state.access = access
    return app
