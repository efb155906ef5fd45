"""``qworker console``: serve the failed-message console (pages and JSON API).

Exit codes: 0 stopped (Ctrl-C or SIGTERM); 1 the console could not start (the
``console`` extra is missing, the address is taken); 2 bad usage (nothing to show,
an unreadable or too short token); 3 the app cannot be loaded.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import urllib.parse
from collections.abc import Sequence
from types import FrameType

import click

from qworker.cli._common import EXIT_USAGE, fail, load_app, run_async, url_option
from qworker.cli._dlq_options import broker
from qworker.redact import escape_control, mask_url

TOKEN_ENV = "QWORKER_CONSOLE_TOKEN"


def read_token(token_file: str | None) -> str | None:
    """The token from ``--token-file`` (first line) or ``QWORKER_CONSOLE_TOKEN``; None without.

    Exits with :data:`EXIT_USAGE` for an unreadable file or a token shorter than
    :data:`qworker.console.security.MIN_TOKEN_LENGTH`.
    """
    from qworker.console.security import MIN_TOKEN_LENGTH

    if token_file is not None:
        try:
            with open(token_file, encoding="utf-8") as handle:
                token = handle.readline().strip()
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"cannot read --token-file: {exc}", EXIT_USAGE)
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
        if not token:
            return None
    if len(token) < MIN_TOKEN_LENGTH:
        fail(
            f"the console token must be at least {MIN_TOKEN_LENGTH} characters "
            "(for example: python3 -c 'import secrets; print(secrets.token_urlsafe(32))')",
            EXIT_USAGE,
        )
    return token


def is_local(host: str) -> bool:
    """True when ``host`` is reachable from this machine only."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, or one line and exit 1 when the address cannot be had."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    sock.setblocking(False)
    return sock


def _server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, with a signal being the normal way to stop (exit 0)."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            super().handle_exit(sig, frame)
            # uvicorn re-raises a captured signal once it has shut down (the process would
            # die of SIGTERM, or exit 130 on Ctrl-C); for the console, that is a clean stop.
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()

    return Server


@click.command()
@click.argument("app_spec", metavar="[APP]", required=False)
@click.option(
    "--management-url",
    envvar="QWORKER_MANAGEMENT_URL",
    help="Show every *.dlq the management API lists (http://user:pass@host:15672).",
)
@click.option("--queue", "queues", multiple=True, help="A DLQ to show (repeatable).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8025, show_default=True)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False),
    help=f"File whose first line is the token that allows changes (or env {TOKEN_ENV}).",
)
@url_option
def console(
    app_spec: str | None,
    management_url: str | None,
    queues: Sequence[str],
    host: str,
    port: int,
    token_file: str | None,
    url: str | None,
) -> None:
    """Serve the failed-message console: overview, groups, messages, replay, edit, purge.

    Without a token (--token-file or QWORKER_CONSOLE_TOKEN) it is read-only.
    """
    try:
        import uvicorn

        from qworker.console.security import Access
        from qworker.console.service import Console, ConsoleSettings
        from qworker.console.web import create_app
    except ImportError as exc:
        fail(f"the console needs its extra: pip install 'qworker[console]' ({exc})")
    from qworker.dlq.probes import use_management

    if app_spec is None and not management_url and not queues:
        fail("name an APP (module:attribute), --management-url or DLQs with --queue", EXIT_USAGE)
    app = load_app(app_spec, url) if app_spec is not None else None
    token = read_token(token_file)
    urls, ca_file = broker(url, app)
    vhost = urllib.parse.unquote(urllib.parse.urlsplit(urls[0]).path[1:]) or "/"
    settings = ConsoleSettings(
        urls=urls,
        ca_file=ca_file,
        app=app,
        management_url=management_url,
        vhost=vhost,
        extra_dlqs=tuple(queues),
    )
    sock = listen(host, port)
    bound_port = sock.getsockname()[1]
    if token is None and not is_local(host):
        click.echo(
            f"qworker: warning: the console listens on {escape_control(host)} without a token: "
            "anyone who reaches it can read every dead letter (changes stay disabled). "
            f"Set {TOKEN_ENV} or --token-file.",
            err=True,
        )
    mode = "read-only (no token)" if token is None else "changes need the token"
    click.echo(
        f"qworker console on http://{escape_control(host)}:{bound_port}/ for "
        f"{escape_control(mask_url(urls[0]))}; {mode}",
        err=True,
    )
    web = create_app(Console(settings), Access(token))
    config = uvicorn.Config(
        web,
        log_level="warning",
        access_log=False,
        server_header=False,
        proxy_headers=False,
        lifespan="on",
    )
    server = _server_class()(config)

    async def serve() -> None:
        with use_management(management_url):
            await server.serve(sockets=[sock])

    try:
        run_async(serve())
    finally:
        sock.close()
