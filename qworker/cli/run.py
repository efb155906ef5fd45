"""``qworker run`` (a worker, or a supervisor of several) and ``qworker topology``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

import click

from qworker.cli._common import EXIT_USAGE, fail, load_app, run_async, url_option
from qworker.errors import ConfigurationError
from qworker.logging import configure_logging
from qworker.redact import escape_control, mask_url
from qworker.worker import DEFAULT_CONCURRENCY, DEFAULT_GRACE, Worker


@click.command()
@click.argument("app_spec", metavar="APP")
@click.option("--queues", help="Comma-separated queues to consume (default: every handler's).")
@click.option(
    "--concurrency",
    type=click.IntRange(1),
    default=DEFAULT_CONCURRENCY,
    show_default=True,
    help="Handlers running at once, per queue.",
)
@click.option(
    "--prefetch",
    type=click.IntRange(1),
    default=None,
    help="Unacked deliveries held per queue (default and minimum: concurrency).",
)
@click.option(
    "--grace",
    type=click.FloatRange(0),
    default=DEFAULT_GRACE,
    show_default=True,
    help="Seconds in-flight handlers get to finish after SIGTERM/SIGINT.",
)
@click.option(
    "--log-format",
    type=click.Choice(["json", "console"]),
    default=None,
    help="Default: console on a terminal, JSON otherwise.",
)
@click.option("--log-level", default="INFO", show_default=True)
@click.option(
    "--processes",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Worker processes; above 1, a supervisor starts, restarts and drains them.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve /metrics, /healthz and /readyz on this port (needs qworker[metrics]).",
)
@click.option(
    "--metrics-host",
    default="127.0.0.1",
    show_default=True,
    help="Address the metrics and health server binds (0.0.0.0: every interface).",
)
@click.option(
    "--dlq-poll",
    type=click.FloatRange(0),
    default=15.0,
    show_default=True,
    help="Seconds between polls of the DLQs (qworker_dlq_* metrics, dlq_depth alerts); 0: off.",
)
@click.option(
    "--crash-limit",
    type=click.IntRange(1),
    default=10,
    show_default=True,
    help="Supervisor: this many worker exits within --crash-window stop everything.",
)
@click.option(
    "--crash-window",
    type=click.FloatRange(1),
    default=120.0,
    show_default=True,
    help="Supervisor: the crash-loop window, in seconds.",
)
@click.option(
    "--no-declare",
    is_flag=True,
    help="Do not declare queues (for users without configure permission): check that "
    "they exist and refuse to start otherwise.",
)
@url_option
def run(
    app_spec: str,
    queues: str | None,
    concurrency: int,
    prefetch: int | None,
    grace: float,
    log_format: str | None,
    log_level: str,
    processes: int,
    metrics_port: int | None,
    metrics_host: str,
    dlq_poll: float,
    crash_limit: int,
    crash_window: float,
    no_declare: bool,
    url: str | None,
) -> None:
    """Run a worker for APP (module:attribute) until SIGTERM or SIGINT.

    Supervisor exit codes (--processes above 1): 0 all workers drained after
    SIGTERM/SIGINT; 1 crash loop (--crash-limit exits within --crash-window; 5 exits
    of never-ready workers within 60 s) or an unclean drain; 2 or 3
    a worker failed to start with that code (1 for any other start failure).
    """
    from qworker import supervised

    configure_logging(log_format, log_level)  # type: ignore[arg-type]
    metrics = metrics_port is not None or supervised.metrics_requested()
    if metrics:
        try:
            from qworker.metrics import Metrics
        except ImportError as exc:
            fail(str(exc), EXIT_USAGE)
    app = load_app(app_spec, url)
    if no_declare:
        app.declares = False
    selected = [q.strip() for q in queues.split(",") if q.strip()] if queues else None
    try:
        app.select(selected)
    except ConfigurationError as exc:
        fail(str(exc), EXIT_USAGE)
    if processes > 1:
        from qworker import supervisor  # only here: a lone worker needs none of it

        options = [("--queues", queues), ("--prefetch", prefetch), ("--log-format", log_format)]
        command = [sys.executable, "-m", "qworker", "run", app_spec]
        command += ["--concurrency", str(concurrency), "--grace", repr(grace)]
        command += ["--log-level", log_level]
        command += ["--no-declare"] if no_declare else []
        command += [str(x) for option, value in options if value for x in (option, value)]
        env = dict(os.environ)
        if url:
            env["QWORKER_URL"] = url  # not on the command line, where `ps` shows passwords
        boss = supervisor.Supervisor(
            command,
            processes,
            grace,
            env,
            metrics_host=metrics_host,
            metrics_port=metrics_port,
            limits=supervisor.Limits(crash_limit=crash_limit, crash_window=crash_window),
            app=app,
            queues=selected,
            dlq_poll=dlq_poll,
        )
        outcome = run_async(boss.run())
        if outcome.error:
            fail(outcome.error, outcome.code)
        sys.exit(outcome.code)
    observer = Metrics().attach(app, selected) if metrics else None
    try:
        worker = Worker(
            app,
            queues=selected,
            concurrency=concurrency,
            prefetch=prefetch,
            grace=grace,
            dlq_poll=dlq_poll,
        )
    except ConfigurationError as exc:
        fail(str(exc), EXIT_USAGE)

    async def serve() -> None:
        from qworker.health import HttpServer, worker_routes

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        async with supervised.supervised(worker):
            if metrics_port is None:
                await worker.run()
                return
            render = observer.render if observer is not None else None
            async with HttpServer(worker_routes(worker, render), metrics_host, metrics_port):
                await worker.run()

    run_async(serve())


@click.command()
@click.argument("app_spec", metavar="APP")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per queue.")
def topology(app_spec: str, as_json: bool) -> None:
    """Print the queues, retry tiers and arguments APP declares."""
    app = load_app(app_spec)
    for spec in app.topology():
        if as_json:
            record = {"name": spec.name, "role": spec.role, "arguments": spec.arguments}
            click.echo(json.dumps(record))
        else:
            args = " ".join(f"{k}={v}" for k, v in spec.arguments.items())
            click.echo(f"{spec.role:<6} {escape_control(spec.name)}  {args}")
    click.echo(f"broker: {', '.join(mask_url(u) for u in app.urls)}", err=True)
