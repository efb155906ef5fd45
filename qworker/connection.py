"""Connecting to the first broker URL that answers, with masked passwords in every error."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Sequence

import aio_pika
import aiormq
import structlog
from aio_pika.abc import AbstractConnection
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    wait_exponential,
    wait_random,
)

from qworker.errors import BrokerUnavailable, ConfigurationError
from qworker.redact import mask_url

#: Exceptions that mean "this broker did not let us in right now".
CONNECT_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,
    OSError,
    TimeoutError,
    aio_pika.exceptions.AMQPConnectionError,
    # e.g. InvalidFrameError when a node refuses the vhost while it starts or loses permissions
    aiormq.exceptions.AMQPError,
)


def normalise_urls(url: str | Sequence[str]) -> list[str]:
    """One URL or a list of cluster node URLs, validated."""
    urls = [url] if isinstance(url, str) else list(url)
    if not urls or not all(isinstance(u, str) and "://" in u for u in urls):
        raise ConfigurationError("App needs an AMQP URL or a non-empty list of them")
    for u in urls:
        if not u.startswith(("amqp://", "amqps://")):
            raise ConfigurationError(f"not an AMQP URL: {mask_url(u)}")
    return urls


def ssl_context(ca_file: str | None) -> ssl.SSLContext | None:
    """A client TLS context trusting ``ca_file``; None to use the URL's own options."""
    if ca_file is None:
        return None
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"cannot load CA file {ca_file!r}: {exc}") from None


async def connect_once(
    urls: Sequence[str],
    *,
    ca_file: str | None = None,
    name: str = "qworker",
    timeout: float = 10,  # noqa: ASYNC109
) -> AbstractConnection:
    """Try each URL in order; the first that accepts wins.

    Raises :class:`BrokerUnavailable`, or :class:`ConfigurationError` when every URL
    failed certificate verification (the next try would fail the same way).
    """
    context = ssl_context(ca_file)
    failures = []
    untrusted = 0
    for url in urls:
        connection = aio_pika.Connection(
            aio_pika.connection.make_url(url),
            ssl_context=context,
            client_properties={"connection_name": name},
        )
        try:
            await connection.connect(timeout=timeout)
            return connection
        except CONNECT_ERRORS as exc:
            # Mark the attempt closed: otherwise aio-pika's __del__ schedules a close that
            # nobody awaits, and Python prints a RuntimeWarning on stderr at exit.
            await close_quietly(connection)
            # aiormq wraps the ssl error in AMQPConnectionError
            untrusted += any(
                isinstance(e, ssl.SSLCertVerificationError) for e in (exc, exc.__cause__)
            )
            failures.append(f"{mask_url(url)}: {mask_url(str(exc)) or type(exc).__name__}")
    if untrusted == len(urls):
        raise ConfigurationError("TLS certificate verification failed: " + "; ".join(failures))
    raise BrokerUnavailable("cannot connect to RabbitMQ (" + "; ".join(failures) + ")")


def _log_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome is not None else None
    wait = state.next_action.sleep if state.next_action is not None else 0.0
    structlog.get_logger("qworker").warning(
        "broker.unavailable",
        error=str(error),
        attempt=state.attempt_number,
        retry_in=round(wait, 2),
    )


async def connect(
    urls: Sequence[str], *, ca_file: str | None = None, name: str = "qworker"
) -> AbstractConnection:
    """:func:`connect_once` with backoff (0.5 s to 15 s, jittered) until one URL answers.

    Every failed round is logged (``broker.unavailable``, passwords masked); the caller
    cancels the task to give up.
    """
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(BrokerUnavailable),
        wait=wait_exponential(multiplier=0.5, max=15) + wait_random(0, 0.5),
        before_sleep=_log_retry,
        reraise=True,
    ):
        with attempt:
            return await connect_once(urls, ca_file=ca_file, name=name)
    raise AssertionError("unreachable")  # pragma: no cover


async def close_quietly(connection: AbstractConnection) -> None:
    """Close ``connection`` if it is open; closing one the broker already closed may fail,
    and it is gone either way."""
    if not connection.is_closed:
        with contextlib.suppress(Exception):
            await connection.close()
