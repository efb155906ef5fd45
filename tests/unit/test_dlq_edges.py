"""Edge cases of the DLQ tool's logic: fingerprint normalisation, bounded grouping, the
delivery-limit guard, and per-message containment of replay failures. No broker."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from qworker import failures
from qworker import headers as h
from qworker.dlq import management
from qworker.dlq.jsonl import BadRecord, read_records
from qworker.dlq.probes import (
    FALLBACK_COUNT,
    MIN_LIMIT,
    RESERVE,
    UNLIMITED,
    BrowseRefused,
    DeliveryGuard,
)
from qworker.dlq.records import DeadLetter, dead_letter
from qworker.dlq.send import (
    ReplayOutcome,
    ReplayResult,
    Sender,
    encoding_problem,
    unpublishable,
)
from qworker.dlq.stats import OTHER_KEY, Stats
from qworker.errors import PublishFailed
from qworker.fingerprint import normalise


def failed(message: str, *, message_id: str = "m", error_type: str = "app.Err") -> DeadLetter:
    """A dead letter of ``orders.dlq`` whose error message is ``message``."""
    headers = h.failure_headers(
        None,
        error=failures.ErrorInfo(error_type, message, ""),
        attempt=1,
        classification="permanent",
        origin=h.Origin("orders", "app:handle", "", "orders", "host:1"),
        reason="permanent_error",
    )
    return dead_letter("orders.dlq", b"{}", {"message_id": message_id}, headers)


# Fingerprint normalisation: (message, normalised)
NORMALISED = [
    ("customer 42 not found", "customer <n> not found"),
    ("customer cus_NffrFeUfNV2Hib not found", "customer cus_<id> not found"),
    ("customer cus_Q1w2E3r4T5y6U7 not found", "customer cus_<id> not found"),
    ("order ord_991 failed", "order ord_<n> failed"),
    ("payment pi_3MtwBwLkdIwHu7ix28a3tqPa failed", "payment pi_<id> failed"),
    ("request req-8f3KzQ2x timed out", "request req-<id> timed out"),
    ("token NffrFeUfNVxHibQwErTy expired", "token <id> expired"),
    ("id AbC123xYz789 unknown", "id <id> unknown"),
    ("uuid 3f2b8c9e-1a2b-4c3d-9e8f-0a1b2c3d4e5f missing", "uuid <uuid> missing"),
    ("UUID 3F2B8C9E-1A2B-4C3D-9E8F-0A1B2C3D4E5F missing", "UUID <uuid> missing"),
    ("object 0xdeadbeef freed", "object <hex> freed"),
    ("sha 9f86d081884c7d65 mismatch", "sha <hex> mismatch"),
    ("user bob.smith+tag@example.co.uk locked", "user <email> locked"),
    ("connect to 10.0.0.12:5432 refused", "connect to <ip> refused"),
    ("connect to 192.168.1.1 refused", "connect to <ip> refused"),
    ("connect to 2001:db8:85a3:0:0:8a2e:370:7334 refused", "connect to <ip> refused"),
    ("connect to [2001:db8::1]:443 refused", "connect to [<ip>]:<n> refused"),
    ("peer fe80::1 gone", "peer <ip> gone"),
    ("at 2024-05-01T10:00:00.123Z timeout", "at <ts> timeout"),
    ("at 2024-05-01 10:00:00+02:00 timeout", "at <ts> timeout"),
    ("due 2024-05-01 passed", "due <ts> passed"),
    ("at 12:30:01 late", "at <ts> late"),
    ('File "/srv/app/handlers.py", line 12 broke', 'File "<path>", line <n> broke'),
    ("error at /srv/app/handlers.py:123", "error at <path>"),
    ("error at app/jobs.py:7:3", "error at <path>"),
    ("cannot open /tmp/tmpa1b2/data.json", "cannot open <path>"),
    ("GET https://api.example.com/v1/customers/cus_9 returned 404", "GET <url> returned <n>"),
    ("amount 12.50 exceeds 10.00", "amount <n> exceeds <n>"),
    ("multiple   spaces\nand lines", "multiple spaces and lines"),
    # Words stay words.
    ("KeyError: 'amount'", "KeyError: 'amount'"),
    ("UnknownCustomerError raised", "UnknownCustomerError raised"),
    ("is_valid returned not_found", "is_valid returned not_found"),
    ("read/write error", "read/write error"),
    ("POST /v1/refunds failed", "POST /v<n>/refunds failed"),
    (
        "sha256 mismatch in utf8 over ipv6 with OAuth2",
        "sha<n> mismatch in utf<n> over ipv<n> with OAuth<n>",
    ),
    ("HTTPConnectionPool full", "HTTPConnectionPool full"),
    ("expected a:b:c", "expected a:b:c"),
    ("deadbeef", "deadbeef"),
]


@pytest.mark.parametrize(("message", "expected"), NORMALISED)
def test_normalise_replaces_varying_parts_and_keeps_words(message: str, expected: str) -> None:
    """Ids, numbers, addresses, times and paths become placeholders; words stay."""
    assert normalise(message) == expected


# Pairs that are different failures and must stay in different groups.
MUST_NOT_MERGE = [
    ("customer cus_NffrFeUfNV2Hib not found", "customer cus_NffrFeUfNV2Hib suspended"),
    ("customer cus_NffrFeUfNV2Hib not found", "order ord_NffrFeUfNV2Hib not found"),
    ("card declined", "card expired"),
    ("POST /v1/charges failed", "POST /v1/refunds failed"),
    ("KeyError: 'amount'", "KeyError: 'currency'"),
    ("connect to 10.0.0.1 refused", "connect to 10.0.0.1 timed out"),
    ("UnknownCustomer", "UnknownMerchant"),
    ("read/write error", "read-only error"),
]


@pytest.mark.parametrize(("one", "other"), MUST_NOT_MERGE)
def test_normalise_keeps_different_failures_apart(one: str, other: str) -> None:
    """Different wording (or id kind) gives different patterns, hence different groups."""
    assert normalise(one) != normalise(other)


def test_stats_groups_one_failure_kind_with_distinct_ids_as_one_group() -> None:
    """2,000 customer ids of one failure kind are one group, not 2,000."""
    stats = Stats()
    for i in range(2000):
        random_id = f"{i:04d}NffrFeUfNV{i * 7919 % 10007:05d}Hib"
        stats.add(failed(f"customer cus_{random_id} not found", message_id=f"m{i}"))
        stats.add(failed(f"order pi_3Mtw{i:06d}BwLkdIwHu7ix28 for {i}@x.org from 10.0.{i % 255}.1"))
    assert sorted(g.count for g in stats.groups.values()) == [2000, 2000]


def test_stats_keeps_at_most_max_groups_and_counts_the_rest_as_other() -> None:
    """A producer making every failure unique cannot grow memory past the group cap."""
    stats = Stats(max_groups=50)
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
    for i in range(400):
        # Unique wording, so no normalisation can merge them.
        text = " ".join(words[(i >> s) % 8] for s in (0, 3, 6)) + f" {words[i % 7]}x"
        stats.add(failed(text, error_type=f"app.Err{words[i % 8]}{words[(i >> 3) % 8]}"))
    assert len(stats.groups) == 51 and OTHER_KEY in stats.groups
    assert sum(g.count for g in stats.groups.values()) == stats.total == 400
    assert len(stats.error_types) <= 51
    assert sum(stats.error_types.values()) == 400


# The delivery-limit guard


@pytest.mark.parametrize(
    ("info", "major", "limit"),
    [
        ({"type": "quorum", "arguments": {"x-delivery-limit": 1_000_000_000}}, 3, 1_000_000_000),
        (
            {
                "type": "quorum",
                "arguments": {"x-delivery-limit": 1_000_000_000},
                "effective_policy_definition": {"delivery-limit": 2},
            },
            3,
            2,
        ),
        (
            {
                "type": "quorum",
                "arguments": {"x-delivery-limit": 5},
                "effective_policy_definition": {"delivery-limit": 50},
            },
            3,
            5,
        ),
        ({"type": "quorum", "arguments": {}}, 3, None),
        ({"type": "quorum", "arguments": {}}, 4, 20),
        ({"type": "classic", "effective_policy_definition": {"delivery-limit": 2}}, 3, None),
        ({"type": "quorum", "effective_policy_definition": {"delivery-limit": "x"}}, 3, None),
    ],
)
def test_effective_delivery_limit_is_the_lower_of_policy_and_argument(
    info: dict[str, Any], major: int, limit: int | None
) -> None:
    """Policy and argument: the lower wins; no limit on 4.x means 20; classic counts nothing."""
    assert management.effective_delivery_limit(info, major) == limit


def test_delivery_guard_refuses_when_the_limit_is_within_reach() -> None:
    """A known limit within reach of repeated reads refuses at open; counts near a high
    limit refuse while reading; an unknown limit refuses at FALLBACK_COUNT deliveries."""
    with pytest.raises(BrowseRefused, match="effective delivery limit is 2 "):
        DeliveryGuard("q.dlq", 2, "policy").check_open()
    with pytest.raises(BrowseRefused):
        DeliveryGuard("q.dlq", MIN_LIMIT - 1, "policy").check_open()
    guard = DeliveryGuard("q.dlq", 5000, "policy")
    guard.check_open()
    guard.check(5000 - RESERVE - 1)
    with pytest.raises(BrowseRefused, match=f"delivered {5000 - RESERVE} times"):
        guard.check(5000 - RESERVE)
    unknown = DeliveryGuard("q.dlq", None, "unreachable")
    unknown.check_open()
    unknown.check(FALLBACK_COUNT - 1)
    with pytest.raises(BrowseRefused, match="--management-url"):
        unknown.check(FALLBACK_COUNT)
    free = DeliveryGuard("q.dlq", UNLIMITED, "classic")
    free.check_open()
    free.check(10**9)
    assert not free.counted and unknown.counted and guard.counted


def test_management_url_for_derives_host_and_credentials() -> None:
    """Same host and user, port 15672, https for amqps."""
    assert (
        management.management_url_for("amqp://u:p%40ss@rabbit:5672/vh")
        == "http://u:p%40ss@rabbit:15672/"
    )
    assert management.management_url_for("amqps://h/") == "https://h:15672/"


# Replay: per-message failures are contained


class FakeChannel:
    is_closed = False


class FakePublisher:
    """Confirms every publish except those named in ``fail`` (by message id)."""

    def __init__(self, fail: dict[str, BaseException], close_on: str | None = None) -> None:
        self.channel = FakeChannel()
        self.fail = fail
        self.close_on = close_on
        self.published: list[str] = []

    async def publish(self, message: aio_pika.Message, routing_key: str) -> None:
        await asyncio.sleep(0)
        mid = str(message.message_id)
        if mid == self.close_on:
            self.channel.is_closed = True
        if mid in self.fail:
            raise self.fail[mid]
        self.published.append(mid)


async def test_replay_failure_of_one_message_is_contained_to_it() -> None:
    """The 7th of 10 copies is refused, another raises an encoder error: both are reported
    and not acked; the 8 others are published and acked."""
    publisher = FakePublisher(
        {
            "m6": PublishFailed("broker refused the message (exchange '' routing key 'q'): nack"),
            "m8": OverflowError("float too large to pack"),
        }
    )
    result = ReplayResult()
    events: list[Any] = []
    acked: list[str] = []
    sender = Sender(publisher, result, events.append, window=3)  # type: ignore[arg-type]
    for i in range(10):

        async def ack(mid: str = f"m{i}") -> None:
            acked.append(mid)

        await sender.send(failed("x", message_id=f"m{i}"), "q", ack)
    await sender.drain()
    assert result.error is None and not sender.stopped
    assert (result.replayed, result.failed) == (8, 2)
    assert sorted(acked) == sorted(f"m{i}" for i in range(10) if i not in (6, 8))
    problems = {
        e.dead_letter.message_id: e.detail for e in events if e.outcome is ReplayOutcome.FAILED
    }
    assert set(problems) == {"m6", "m8"}
    assert "refused" in problems["m6"] and "OverflowError" in problems["m8"]
    assert all("\n" not in (d or "") for d in problems.values())


async def test_replay_reopens_a_channel_the_broker_closed_over_one_message() -> None:
    """A copy that makes the broker close the channel fails alone; the rest go on a new one."""
    first = FakePublisher({"m2": PublishFailed("channel lost while publishing")}, close_on="m2")
    second = FakePublisher({})
    opened: list[FakePublisher] = []

    async def reopen() -> Any:
        opened.append(second)
        return second

    result = ReplayResult()
    sender = Sender(first, result, None, window=1, reopen=reopen)  # type: ignore[arg-type]
    for i in range(5):
        await sender.send(failed("x", message_id=f"m{i}"), "q", _nothing)
    await sender.drain()
    assert result.error is None and opened == [second]
    assert (first.published, second.published) == (["m0", "m1"], ["m3", "m4"])
    assert (result.replayed, result.failed) == (4, 1)


async def test_replay_stops_when_no_confirm_came() -> None:
    """A missing confirm says nothing about one message (the copy may be queued): stop."""
    publisher = FakePublisher({"m1": PublishFailed("no confirm within 10s for exchange ''")})
    result = ReplayResult()
    sender = Sender(publisher, result, None, window=1)  # type: ignore[arg-type]
    for i in range(4):
        await sender.send(failed("x", message_id=f"m{i}"), "q", _nothing)
    await sender.drain()
    assert result.error is not None and "no confirm" in result.error
    assert publisher.published == ["m0"]


async def _nothing() -> None:
    pass


async def test_unencodable_copy_is_skipped_before_publishing() -> None:
    """A copy pamqp cannot encode is skipped with its reason and never published."""
    publisher = FakePublisher({})
    result = ReplayResult()
    events: list[Any] = []
    sender = Sender(publisher, result, events.append)  # type: ignore[arg-type]
    bad = dead_letter("orders.dlq", b"{}", {"message_id": "bad", "type": "t" * 300}, {})
    assert sender.stopped is False
    await sender.send(bad, "q", _nothing)
    await sender.send(failed("x", message_id="good"), "q", _nothing)
    await sender.drain()
    assert publisher.published == ["good"]
    assert (result.replayed, result.skipped) == (1, 1)
    assert "cannot be encoded" in (events[0].detail or "")


def test_encoding_problem_names_the_problem_in_one_line() -> None:
    """Out-of-range property values are found without publishing."""
    assert encoding_problem(aio_pika.Message(b"x", priority=300)) is not None
    assert encoding_problem(aio_pika.Message(b"x", headers={"a": 1, "b": "c"})) is None
    assert unpublishable(failed("x")) is None


def test_replay_file_record_that_cannot_be_encoded_is_a_bad_record(tmp_path: Path) -> None:
    """``read_records(check=...)``: an unencodable record is ``file:line: problem``."""
    good = {"queue": "orders.dlq", "properties": {"message_id": "a"}, "headers": {}, "body": "{}"}
    bad = {**good, "properties": {"message_id": "b", "type": "t" * 300}}
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
    with (
        path.open() as lines,
        pytest.raises(BadRecord, match=r"records.jsonl:3: cannot be encoded"),
    ):
        list(read_records(lines, str(path), check=unpublishable))
