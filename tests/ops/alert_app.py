"""The app of the alert and DLQ-poller tests: the ledger app's modes plus alert rules.

Run as ``qworker run tests.ops.alert_app:app``; settings are environment variables read at
import (in the supervisor and in each child):

- QWORKER_APP_URL, QWORKER_APP_QUEUE: the broker and the queue.
- QWORKER_ALERTS: the rules, comma separated: ``dlq_depth:N`` (above N),
  ``new_fingerprint``, ``dead_lettered:COUNT:WITHIN``.
- QWORKER_ALERT_FILE: every notification appends one JSON line there (rule, queue,
  fingerprints, value, the notifying pid).
- QWORKER_APP_PIDS: the pid of the process that handled a message is appended there.

Payload: ``{"id": str, "mode": "ok" | "permanent" | "die", "error": str}``; ``permanent``
raises ``Permanent(error)``, so two errors of different words are two fingerprints.
"""

from __future__ import annotations

import json
import os
from typing import Any

from qworker import Alert, App, Permanent, RetryPolicy

QUEUE = os.environ.get("QWORKER_APP_QUEUE", "alerts.default")
RETRY = RetryPolicy(max_attempts=2, initial_delay=0.2, jitter=0)

app = App(os.environ.get("QWORKER_APP_URL", "amqp://guest:guest@127.0.0.1:5672/"), name=QUEUE)


def _append(variable: str, line: str) -> None:
    if path := os.environ.get(variable):
        with open(path, "a") as fh:
            fh.write(line + "\n")


async def notify(alert: Alert) -> None:
    _append(
        "QWORKER_ALERT_FILE",
        json.dumps(
            {
                "rule": alert.rule,
                "queue": alert.queue,
                "fingerprints": list(alert.fingerprints),
                "value": alert.value,
                "outcomes": len(alert.outcomes),
                "pid": os.getpid(),
            }
        ),
    )


for spec in filter(None, os.environ.get("QWORKER_ALERTS", "").split(",")):
    kind, *numbers = spec.split(":")
    if kind == "dlq_depth":
        app.alert(when="dlq_depth", above=int(numbers[0]), notify=notify)
    elif kind == "new_fingerprint":
        app.alert(when="new_fingerprint", notify=notify)
    elif kind == "dead_lettered":
        app.alert(
            when="dead_lettered", count=int(numbers[0]), within=float(numbers[1]), notify=notify
        )


@app.handler(QUEUE, retry=RETRY)
async def handle(payload: dict[str, Any]) -> None:
    _append("QWORKER_APP_PIDS", str(os.getpid()))
    mode = payload.get("mode", "ok")
    if mode == "permanent":
        raise Permanent(str(payload.get("error", "bad message")))
    if mode == "die":
        os._exit(1)
