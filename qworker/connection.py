"""Connecting to the first broker URL that answers, with masked passwords in every error."""

from __future__ import annotations

import ssl
from collections.abc import Sequence

import aio_pika
from aio_pika.abc import AbstractConnection
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_delay,
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
    """Try each URL in order; the first that accepts wins. Raises :class:`BrokerUnavailable`."""
    context = ssl_context(ca_file)
    failures = []
    for url in urls:
        try:
            return await aio_pika.connect(
                url,
                ssl_context=context,
                timeout=timeout,
                client_properties={"connection_name": name},
            )
        except CONNECT_ERRORS as exc:
            failures.append(f"{mask_url(url)}: {mask_url(str(exc)) or type(exc).__name__}")
    raise BrokerUnavailable("cannot connect to RabbitMQ (" + "; ".join(failures) + ")")


async def connect(
    urls: Sequence[str],
    *,
    ca_file: str | None = None,
    name: str = "qworker",
    give_up_after: float | None = None,
) -> AbstractConnection:
    """:func:`connect_once` with backoff (0.5 s to 15 s), forever or for ``give_up_after`` s."""
    stop = stop_after_delay(give_up_after) if give_up_after is not None else (lambda _: False)
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(BrokerUnavailable),
        wait=wait_exponential(multiplier=0.5, max=15) + wait_random(0, 0.5),
        stop=stop,
        reraise=True,
    ):
        with attempt:
            return await connect_once(urls, ca_file=ca_file, name=name)
    raise AssertionError("unreachable")  # pragma: no cover
