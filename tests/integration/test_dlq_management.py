"""``qworker dlq ls --management-url``: DLQs found through the management API."""

from __future__ import annotations

import aio_pika
import pytest

from qworker.dlq.management import ManagementError, dlq_names, queues_url
from tests.support.cli import run_cli


def test_dlq_names_keeps_only_dlq_suffixed_names_sorted() -> None:
    """Only names ending in .dlq, deduplicated and sorted; garbage entries are ignored."""
    answer = [
        {"name": "b.dlq"},
        {"name": "a"},
        {"name": "a.dlq"},
        {"name": 5},
        "x",
        {"name": "b.dlq"},
    ]
    assert dlq_names(answer) == ["a.dlq", "b.dlq"]
    with pytest.raises(ManagementError):
        dlq_names({"error": "not a list"})


def test_queues_url_moves_credentials_to_a_header_and_quotes_the_vhost() -> None:
    """The password never goes into the request URL; the vhost is percent-encoded."""
    url, auth = queues_url("http://ops:s3cret@rabbit:15672/", "/")
    assert url == "http://rabbit:15672/api/queues/%2F?columns=name"
    assert auth is not None and auth.startswith("Basic ") and "s3cret" not in url
    with pytest.raises(ManagementError):
        queues_url("amqp://guest:guest@rabbit/", "/")


@pytest.mark.rabbitmq
async def test_ls_with_management_url_lists_every_dlq_of_the_broker(
    amqp: aio_pika.abc.AbstractConnection,
    queue_name: str,
    cleanup: list[str],
    management_url: str,
) -> None:
    """A DLQ no APP names shows up in `dlq ls --management-url`, with its message count."""
    dlq = f"{queue_name}.dlq"
    cleanup.append(dlq)
    channel = await amqp.channel()
    await channel.declare_queue(dlq, durable=True)
    await channel.default_exchange.publish(aio_pika.Message(b"x"), routing_key=dlq)
    result = run_cli("dlq", "ls", "--management-url", management_url, timeout=60)
    assert result.returncode == 0, result.stderr
    (row,) = [line for line in result.stdout.splitlines() if line.startswith(dlq)]
    assert row.split()[1] == "1"
    assert "guest:guest" not in result.stdout + result.stderr


def test_ls_with_an_unreachable_management_api_is_one_line_and_exit_1() -> None:
    """A management URL that does not answer: one line on stderr, password masked, exit 1."""
    result = run_cli("dlq", "ls", "--management-url", "http://u:s3cret@127.0.0.1:1", timeout=60)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert "s3cret" not in result.stderr and "Traceback" not in result.stderr
