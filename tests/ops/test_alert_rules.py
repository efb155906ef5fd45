"""Alert rules, the outcome relay and the crash-loop accounting, without a broker."""

from __future__ import annotations

import asyncio
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from qworker import App
from qworker.alerts import Alert, DlqDepthRule, DlqSample, FingerprintRule, RateRule
from qworker.errors import ConfigurationError
from qworker.events import Outcome, OutcomeKind, Severity
from qworker.supervised import (
    ENV_DIR,
    ENV_OUTCOMES,
    OutcomeRelay,
    child_relay,
    decode_outcomes,
    encode_outcome,
)
from qworker.supervisor import Limits, Supervisor


def dead(queue: str = "q", fingerprint: str | None = "abc123abc123", **extra: object) -> Outcome:
    return Outcome(
        OutcomeKind.DEAD_LETTERED,
        queue,
        "mod:handle",
        "m1",
        1,
        0.01,
        severity=Severity.HIGH,
        error_type="ValueError",
        error_message="x" * 1000,
        reason="permanent_error",
        fingerprint=fingerprint,
        **extra,  # type: ignore[arg-type]
    )


class Sink:
    def __init__(self, fail: bool = False) -> None:
        self.alerts: list[Alert] = []
        self.audits: list[tuple[str | None, list[str], str, str]] = []
        self.fail = fail

    async def notify(self, alert: Alert) -> None:
        self.alerts.append(alert)

    async def audit(self, dlq: str | None, fingerprints: list[str], rule: str, at: str) -> None:
        if self.fail:
            raise ConnectionError("broker gone")
        self.audits.append((dlq, fingerprints, rule, at))


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_failing_audit_never_breaks_the_notification() -> None:
    sink = Sink(fail=True)
    rule = RateRule(sink.notify, count=2, within=60)
    rule.audit = sink.audit
    rule.outcome(dead())
    rule.outcome(dead())
    await rule.wait(1)
    assert len(sink.alerts) == 1 and sink.audits == []


async def test_rate_rule_audits_one_record_per_dlq_with_fingerprints() -> None:
    sink = Sink()
    rule = RateRule(sink.notify, count=3, within=60)
    rule.audit = sink.audit
    for queue, fp in (("a", "f1"), ("b", "f2"), ("a", "f3")):
        rule.outcome(dead(queue, fp))
    await rule.wait(1)
    assert sorted((d, f) for d, f, _, _ in sink.audits) == [
        ("a.dlq", ["f1", "f3"]),
        ("b.dlq", ["f2"]),
    ]
    assert sink.alerts[0].queue is None and sink.alerts[0].fingerprints == ("f1", "f2", "f3")


async def test_fingerprint_rule_fires_once_per_new_kind_and_waits_for_its_seed() -> None:
    sink = Sink()
    rule = FingerprintRule(sink.notify)
    rule.audit = sink.audit
    rule.seeding()
    rule.outcome(dead(fingerprint="known"))
    rule.outcome(dead(fingerprint="fresh"))
    await settle()
    assert sink.alerts == []  # held until the seed arrives
    rule.seed({("q", "known")})
    rule.outcome(dead(fingerprint="fresh"))
    rule.outcome(dead(fingerprint=None))
    rule.outcome(dead(queue="other", fingerprint="fresh"))  # per queue
    await rule.wait(1)
    assert [a.fingerprints for a in sink.alerts] == [("fresh",), ("fresh",)]
    assert [(d, f) for d, f, _, _ in sink.audits] == [
        ("q.dlq", ["fresh"]),
        ("other.dlq", ["fresh"]),
    ]


async def test_a_suspended_rule_ignores_outcomes() -> None:
    sink = Sink()
    rule = RateRule(sink.notify, count=1, within=60)
    rule.suspended = True
    rule.outcome(dead())
    await settle()
    assert sink.alerts == []


async def test_dlq_depth_rule_fires_on_crossing_then_rearms_below() -> None:
    sink = Sink()
    now = [0.0]
    rule = DlqDepthRule(sink.notify, above=10, cooldown=100, clock=lambda: now[0])

    def poll(depth: int) -> None:
        rule.dlq(DlqSample("q", "q.dlq", depth, None, 0.0))

    for depth in (5, 11, 50, 12):  # one crossing
        poll(depth)
    await settle()
    assert [a.value for a in sink.alerts] == [11.0]
    poll(3)
    now[0] = 50.0
    poll(20)  # crossed again, but within the cooldown
    await settle()
    assert len(sink.alerts) == 1
    poll(3)
    now[0] = 150.0
    poll(20)
    await settle()
    assert [a.value for a in sink.alerts] == [11.0, 20.0]


def test_app_alert_validates_the_kind_of_rule() -> None:
    app = App()

    async def notify(alert: Alert) -> None: ...

    with pytest.raises(ConfigurationError):
        app.alert(when="dlq_depth", notify=notify)  # no above=
    with pytest.raises(ConfigurationError):
        app.alert(when="dead_lettered", above=3, notify=notify)
    with pytest.raises(ConfigurationError):
        app.alert(when="nope", notify=notify)  # type: ignore[arg-type]
    assert isinstance(app.alert(when="new_fingerprint", notify=notify), FingerprintRule)
    assert isinstance(app.alert(when="dlq_depth", above=0, notify=notify), DlqDepthRule)


def test_dlq_sample_age() -> None:
    failed = datetime.now(UTC) - timedelta(seconds=30)
    assert DlqSample("q", "q.dlq", 0, None, 0.0).oldest_age() == 0.0
    assert DlqSample("q", "q.dlq", 2, None, 0.0).oldest_age() is None
    age = DlqSample("q", "q.dlq", 2, failed, 0.0).oldest_age()
    assert age is not None and 29 < age < 32


# The relay


def test_outcomes_survive_the_datagram_round_trip_capped() -> None:
    event = dead(tier=None, error_code="E1", runbook="https://r")
    [back] = decode_outcomes(b"[" + __import__("json").dumps(encode_outcome(event)).encode() + b"]")
    assert back.kind is OutcomeKind.DEAD_LETTERED and back.severity is Severity.HIGH
    assert (back.queue, back.fingerprint, back.error_code, back.runbook) == (
        "q",
        event.fingerprint,
        "E1",
        "https://r",
    )
    assert back.error_message == "x" * 300
    assert decode_outcomes(b"garbage") == []
    assert decode_outcomes(b'[{"k": "nope", "q": "q", "h": "h"}, {"k": "retried"}, 7]') == []


async def test_the_relay_sends_batches_and_drops_when_the_supervisor_is_gone(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "outcomes.sock")
    inbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    inbox.bind(path)
    inbox.setblocking(False)
    relay = OutcomeRelay(path, frozenset({OutcomeKind.DEAD_LETTERED}))
    for _ in range(70):
        relay.outcome(dead())
    relay.outcome(Outcome(OutcomeKind.SUCCEEDED, "q", "h", None, 1, 0.0))  # not forwarded
    await settle()
    received = []
    while True:
        try:
            received += decode_outcomes(inbox.recv(65536))
        except BlockingIOError:
            break
    assert len(received) == 70 and relay.sent == 70
    inbox.close()
    Path(path).unlink()
    for _ in range(5):
        relay.outcome(dead())  # never raises
    await settle()
    assert relay.dropped == 5
    relay.close()


def test_child_relay_suspends_the_rules_only_under_an_evaluating_supervisor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = App()

    async def notify(alert: Alert) -> None: ...

    rule = app.alert(when="dead_lettered", notify=notify)
    assert child_relay(app) is None and not rule.suspended
    monkeypatch.setenv(ENV_DIR, str(tmp_path))
    monkeypatch.setenv(ENV_OUTCOMES, str(tmp_path / "outcomes.sock"))
    relay = child_relay(app)
    assert relay is not None and rule.suspended and relay.kinds == {OutcomeKind.DEAD_LETTERED}
    assert child_relay(app) is relay and app.observers.count(relay) == 1
    relay.close()


# Crash-loop accounting


async def test_the_crash_limit_counts_ready_exits_beyond_max_deliveries() -> None:
    boss = Supervisor(["true"], 2, 1.0)
    assert (boss.limits.crash_limit, boss.limits.crash_window) == (10, 120.0)
    assert not any(boss._crash_loop(True, 1) for _ in range(9))  # a poison message's 5 and more
    assert boss._crash_loop(True, 1)
    assert boss._fatal is not None and "exited 10 times within 120s" in (boss._fatal.error or "")
    assert boss._killer is not None
    boss._killer.cancel()


async def test_children_never_ready_stop_sooner() -> None:
    boss = Supervisor(["true"], 2, 1.0, limits=Limits(crash_limit=10, start_limit=5))
    assert not any(boss._crash_loop(False, 1) for _ in range(4))
    assert boss._crash_loop(False, 1)
    assert boss._fatal is not None and "exited 5 times within 60s" in (boss._fatal.error or "")
    assert boss._killer is not None
    boss._killer.cancel()
