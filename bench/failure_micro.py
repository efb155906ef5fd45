"""The worker's failure path without a broker: CPU per failed delivery, in-process.

Runs qworker's real ``Consumer._guarded`` (decode, handler, classification, verdict, failure
headers, the one log line, the copy's properties marshalled by pamqp as aiormq would, the
ack) on fake deliveries whose handler raises like the peer benchmark's S2 (``Transient`` on
attempt 1) or S3 (``Permanent``). The broker side and aiormq's frame I/O are left out, so
this isolates the Python work qworker adds on a failure; use it to iterate, and
``bench/run.py --cpu`` for the figures that count.

    python3 bench/failure_micro.py [--n 20000] [--scenario S3] [--profile out.pstats]

``PYTHONPATH=<tree>`` measures another tree (e.g. a ``git archive`` of the commit before).
The log line goes to a temporary file, written like the worker's (JSON, one write per line).
"""

import argparse
import asyncio
import cProfile
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pydantic
from pamqp.commands import Basic
from pamqp.header import ContentHeader


class BenchPayload(pydantic.BaseModel):
    id: int
    kind: str
    pad: str


@dataclass
class _Raw:
    body: bytes
    header: Any
    delivery_tag: int
    exchange: str
    routing_key: str
    delivery: Any
    channel: Any


class _Header:
    def __init__(self, properties: Basic.Properties) -> None:
        self.properties = properties


class _Channel:
    is_closed = False

    async def basic_ack(self, tag: int, wait: bool = False) -> None:
        return None


class _Publisher:
    """Stands in for ConfirmedPublisher: the copy's content header is marshalled (pamqp and
    qworker's wire codec, as aiormq does), the confirm is immediate."""

    encoded = 0

    async def publish_body(self, body: bytes, properties: Any, routing_key: str, **_: Any) -> None:
        _Publisher.encoded += len(ContentHeader(0, len(body), properties).marshal())


class _Gate:
    publisher = _Publisher()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--scenario", choices=("S2", "S3"), default="S3")
    p.add_argument("--profile", help="write cProfile stats here")
    args = p.parse_args()

    import qworker
    from qworker import App, Context, Permanent, RetryPolicy, Transient
    from qworker.consumer import Consumer
    from qworker.delivery import Delivery
    from qworker.logging import configure_logging
    from qworker.serving import Policy

    log = tempfile.NamedTemporaryFile("w", suffix=".log", delete=False)  # noqa: SIM115
    sys.stdout = log  # configure_logging writes to sys.stdout
    configure_logging("json")
    sys.stdout = sys.__stdout__
    app = App("amqp://guest:guest@127.0.0.1/", name="micro")
    scenario = args.scenario

    @app.handler("bench.micro", retry=RetryPolicy(max_attempts=2, initial_delay=0.001, jitter=0))
    async def handle(payload: BenchPayload, context: Context) -> None:
        _ = payload.id
        if scenario == "S2" and context.attempt == 1:
            raise Transient("first attempt fails")
        raise Permanent("always fails")

    handler = app.handlers["bench.micro"]
    policy = Policy(app.classifier, app.default, app.worker_id, app.observers)
    consumer = Consumer(handler, policy=policy, publish=app.publish, concurrency=100, prefetch=100)
    body = BenchPayload(id=1, kind="bench", pad="x" * 100).model_dump_json().encode()
    channel = _Channel()
    gate = _Gate()

    def delivery(i: int) -> Delivery:
        props = Basic.Properties(
            content_type="application/json",
            delivery_mode=2,
            message_id=uuid.uuid4().hex,
            headers={},
        )
        raw = _Raw(body, _Header(props), i + 1, "", "bench.micro", Basic.Deliver(), channel)
        return Delivery(raw)  # type: ignore[arg-type]

    async def run(n: int) -> float:
        messages = [delivery(i) for i in range(n)]
        t0 = time.process_time()
        for m in messages:
            await consumer._guarded(m, gate)  # type: ignore[arg-type]
        return time.process_time() - t0

    asyncio.run(run(500))  # warm-up: imports, caches, the validator
    prof = cProfile.Profile() if args.profile else None
    if prof:
        prof.enable()
    cpu = asyncio.run(run(args.n))
    if prof:
        prof.disable()
        prof.dump_stats(args.profile)
    log.close()
    size = os.path.getsize(log.name)
    os.unlink(log.name)
    print(
        f"{scenario} qworker from {os.path.dirname(qworker.__file__)}: "
        f"{cpu * 1e6 / args.n:.1f} us/failure (n={args.n}, log {size / (args.n + 500):.0f} B/line)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
