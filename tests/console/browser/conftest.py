"""Browser tests of the console: Playwright driving Debian's Chromium against a console
served in-process (uvicorn in a thread) on the real broker.

No browser can be downloaded here, so Chromium is launched by its path
(``QWORKER_CHROMIUM``, default ``/usr/bin/chromium``; ``apt-get install -y chromium``).
Without it (or without the ``playwright`` package) these tests skip, except with
``CI=true``, where they fail.

``QWORKER_CONSOLE_SCREENSHOTS=DIR`` makes the tests save their screenshots of each page
into ``DIR`` (``docs/console`` for the docs).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from qworker.app import App

if TYPE_CHECKING:
    from playwright.async_api import Browser, ConsoleMessage, Dialog, Page

CHROMIUM = os.environ.get("QWORKER_CHROMIUM", "/usr/bin/chromium")
#: A token long enough for the console (it refuses short ones at start).
TOKEN = "browser-test-token-0123456789abcdef"
SERVER_START = 15.0
SERVER_STOP = 20.0


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: browser tests must run)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """Debian's Chromium and the playwright package, or a skip (a failure in CI)."""
    if not os.path.exists(CHROMIUM):
        _unavailable(f"no Chromium at {CHROMIUM}: apt-get install -y chromium")
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        _unavailable("the playwright package is not installed: pip install playwright")
    return CHROMIUM


class ConsoleServer:
    """One console (``create_app``) served by uvicorn on 127.0.0.1 and a free port, in a thread."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + SERVER_START
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise AssertionError("the console did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(SERVER_STOP)
        self._sock.close()
        assert not self._thread.is_alive(), "the console did not stop"


ServeConsole = Callable[..., ConsoleServer]


@pytest.fixture
def serve_console(broker_url: str) -> Iterator[ServeConsole]:
    """``serve_console(dlqs, token=None, app=None)``: a running console showing ``dlqs``
    (and the DLQs of ``app``); stopped after the test."""
    from qworker.console.security import Access
    from qworker.console.service import Console, ConsoleSettings
    from qworker.console.web import create_app

    servers: list[ConsoleServer] = []

    def serve(
        dlqs: list[str], *, token: str | None = None, app: App | None = None
    ) -> ConsoleServer:
        settings = ConsoleSettings(urls=[broker_url], app=app, extra_dlqs=tuple(dlqs))
        server = ConsoleServer(create_app(Console(settings), Access(token)))
        server.start()
        servers.append(server)
        return server

    yield serve
    for server in servers:
        server.stop()


@pytest.fixture
async def browser(chromium_path: str) -> AsyncIterator[Browser]:
    """Chromium, headless, launched by its path."""
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=chromium_path)
        try:
            yield launched
        finally:
            await launched.close()


@dataclass
class Watch:
    """What a page did that it must not: dialogs (script ran), errors on its console
    (a CSP violation is one), uncaught exceptions."""

    dialogs: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    failed_responses: list[str] = field(default_factory=list)

    def assert_clean(self) -> None:
        assert self.dialogs == [], f"a dead letter ran script: {self.dialogs}"
        assert self.page_errors == [], self.page_errors
        assert self.console_errors == [], (self.console_errors, self.failed_responses)


async def watched_page(
    browser: Browser, *, bypass_csp: bool = False, allow: tuple[str, ...] = ()
) -> tuple[Page, Watch]:
    """A new page (own context, 1280x900) whose dialogs and console errors are recorded.

    ``allow``: console errors containing one of these texts are expected (an API
    answering 4xx on purpose logs "Failed to load resource").
    """
    context = await browser.new_context(
        viewport={"width": 1280, "height": 900}, bypass_csp=bypass_csp, accept_downloads=True
    )
    page = await context.new_page()
    watch = Watch()

    async def on_dialog(dialog: Dialog) -> None:
        watch.dialogs.append(f"{dialog.type}: {dialog.message}")
        await dialog.dismiss()

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error" and not any(a in message.text for a in allow):
            watch.console_errors.append(message.text)

    page.on("dialog", on_dialog)
    page.on("console", on_console)
    page.on("pageerror", lambda exc: watch.page_errors.append(str(exc)))
    page.on(
        "response",
        lambda r: watch.failed_responses.append(f"{r.status} {r.url}") if r.status >= 400 else None,
    )
    return page, watch


async def log_in(page: Page, base: str, token: str = TOKEN) -> None:
    """Log in through the login page's form."""
    await page.goto(f"{base}/login")
    await page.fill("#token", token)
    async with page.expect_navigation():
        await page.click("form.login button[type=submit]")
    assert "/login" not in page.url, f"login failed: {await page.inner_text('body')}"


SCREENSHOTS = os.environ.get("QWORKER_CONSOLE_SCREENSHOTS")


async def shoot(page: Page, name: str, *, only: str | None = None) -> None:
    """Save a screenshot of ``page`` (or of its element ``only``, a selector) as ``NAME.png``
    when QWORKER_CONSOLE_SCREENSHOTS is set."""
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        path = str(Path(SCREENSHOTS) / f"{name}.png")
        if only is not None:
            await page.locator(only).screenshot(path=path)
        else:
            await page.screenshot(path=path, full_page=True)
