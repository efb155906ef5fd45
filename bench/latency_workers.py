"""Child processes of ``bench/latency.py``: paced publishers and recording workers.

    python bench/latency_workers.py publish '<json config>'   # prints one JSON line
    python bench/latency_workers.py worker '<json config>'    # consumes until SIGTERM

Every contender mirrors the configuration of the shared peer harness (``../shared/bench``):
prefetch 100 (celery: solo pool, ``worker_prefetch_multiplier=100``, acks late; dramatiq:
``worker_threads=8``, ``queue_prefetch=100``; qworker: ``concurrency=prefetch=100``, JSON
logs), persistent messages, a ~200-byte JSON body, each framework's own publisher. The body
carries the publisher's ``time.monotonic_ns()`` taken right before the publish call
(``CLOCK_MONOTONIC`` is system-wide on Linux); the handler's first statement writes that
stamp and its own into a shared mmap file (:class:`Recorder`), indexed by the message id.

Stdlib only at import time: the frameworks are imported by the contender that needs them.
"""

import asyncio
import json
import logging
import mmap
import os
import signal
import struct
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

URL = "amqp://guest:guest@127.0.0.1:5672/"
PREFETCH = 100
THREADS = 8
BODY_SIZE = 200
WINDOW = 100  # outstanding confirms of the async publishers

CONTENDERS = {
    # name: (label, queue type)
    "raw_aiopika": ("raw aio-pika", "classic"),
    "raw_aiopika_quorum": ("raw aio-pika (quorum)", "quorum"),
    "qworker_quorum": ("qworker (quorum)", "quorum"),
    "qworker_classic": ("qworker (classic)", "classic"),
    "faststream": ("FastStream", "classic"),
    "dramatiq": ("dramatiq", "classic"),
    "celery": ("celery", "classic"),
}


# --------------------------------------------------------------------------- recorder

_HEAD = struct.Struct("<QQ")  # started, finished
_SLOT = struct.Struct("<qq")  # two int64 values per message id
_HEAD_SIZE = 64


class Recorder:
    """A shared mmap file: two counters and two int64 per message id (thread-safe)."""

    def __init__(self, path: str, slots: int, create: bool = False) -> None:
        size = _HEAD_SIZE + _SLOT.size * slots
        if create:
            with open(path, "wb") as f:
                f.write(b"\0" * size)
        self._f = open(path, "r+b")  # noqa: SIM115 -- lives as long as the process
        self._mm = mmap.mmap(self._f.fileno(), size)
        self._lock = threading.Lock()
        self.slots = slots

    def put(self, i: int, a: int | None = None, b: int | None = None) -> None:
        off = _HEAD_SIZE + _SLOT.size * i
        old_a, old_b = _SLOT.unpack_from(self._mm, off)
        _SLOT.pack_into(self._mm, off, old_a if a is None else a, old_b if b is None else b)

    def count(self, started: int = 0, finished: int = 0) -> None:
        with self._lock:
            s, f = _HEAD.unpack_from(self._mm, 0)
            _HEAD.pack_into(self._mm, 0, s + started, f + finished)

    def counters(self) -> tuple[int, int]:
        s, f = _HEAD.unpack_from(self._mm, 0)
        return int(s), int(f)

    def slot(self, i: int) -> tuple[int, int]:
        a, b = _SLOT.unpack_from(self._mm, _HEAD_SIZE + _SLOT.size * i)
        return int(a), int(b)

    def close(self) -> None:
        self._mm.close()
        self._f.close()


def hit(rec: Recorder, body: dict[str, Any], now: int) -> None:
    """The handler's first act: (publish stamp, handler-start stamp) for this id."""
    rec.put(int(body["id"]), int(body["t"]), now)
    rec.count(started=1)


def make_body(i: int, t_ns: int, run: str, size: int = BODY_SIZE) -> dict[str, Any]:
    """A JSON object whose compact encoding is exactly ``size`` bytes."""
    body: dict[str, Any] = {"id": i, "t": t_ns, "run": run, "kind": "lat", "pad": ""}
    overhead = len(json.dumps(body, separators=(",", ":")))
    body["pad"] = "x" * max(0, size - overhead)
    return body


def encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def watchdog(deadline: float, parent: int) -> None:
    """Hard-exit at the deadline (time.time()) or when the runner is gone."""

    def watch() -> None:
        while True:
            if time.time() > deadline or os.getppid() != parent:
                sys.stderr.write("latency child: watchdog exit\n")
                sys.stderr.flush()
                os._exit(97)
            time.sleep(0.5)

    threading.Thread(target=watch, name="latency-watchdog", daemon=True).start()


# --------------------------------------------------------------------------- pacing


async def pace_async(
    send: Callable[[dict[str, Any]], Awaitable[None]], cfg: dict[str, Any]
) -> dict[str, Any]:
    """Publish cfg["n"] bodies at cfg["rate"] msg/s (0: as fast as the window allows)."""
    n, rate, first, run = cfg["n"], cfg["rate"], cfg["first_id"], cfg["run_id"]
    window = asyncio.Semaphore(WINDOW)
    tasks: set[asyncio.Task[None]] = set()
    late = 0.0

    async def one(body: dict[str, Any]) -> None:
        try:
            await send(body)
        finally:
            window.release()

    t0 = time.monotonic()
    for k in range(n):
        if rate:
            due = t0 + k / rate
            now = time.monotonic()
            if due > now:
                await asyncio.sleep(due - now)
            else:
                late = max(late, now - due)
        await window.acquire()
        task = asyncio.create_task(one(make_body(first + k, time.monotonic_ns(), run)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    sent = time.monotonic() - t0
    await asyncio.gather(*list(tasks))
    return {"send_s": sent, "confirmed_s": time.monotonic() - t0, "max_late_s": late}


def pace_sync(send: Callable[[dict[str, Any]], None], cfg: dict[str, Any]) -> dict[str, Any]:
    n, rate, first, run = cfg["n"], cfg["rate"], cfg["first_id"], cfg["run_id"]
    late = 0.0
    t0 = time.monotonic()
    for k in range(n):
        if rate:
            due = t0 + k / rate
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            else:
                late = max(late, now - due)
        send(make_body(first + k, time.monotonic_ns(), run))
    sent = time.monotonic() - t0
    return {"send_s": sent, "confirmed_s": sent, "max_late_s": late}


# --------------------------------------------------------------------------- queues


def queues(name: str, queue: str) -> tuple[list[str], list[str]]:
    """(queues, exchanges) a contender's run creates, for deletion."""
    if name.startswith("qworker"):
        return [queue, f"{queue}.dlq", f"{queue}.retry.1ms", f"{queue}.quarantine"], []
    if name == "dramatiq":
        return [queue, f"{queue}.DQ", f"{queue}.XQ"], []
    if name == "celery":
        return [queue], [queue]
    return [queue], []


# --------------------------------------------------------------------------- raw aio-pika


def _raw_args(name: str) -> dict[str, Any] | None:
    return {"x-queue-type": "quorum"} if name == "raw_aiopika_quorum" else None


async def raw_publish(cfg: dict[str, Any]) -> dict[str, Any]:
    import aio_pika

    async with await aio_pika.connect(URL) as conn:
        ch = await conn.channel()  # publisher confirms (aio-pika default)
        await ch.declare_queue(cfg["queue"], durable=True, arguments=_raw_args(cfg["contender"]))
        ex = ch.default_exchange

        async def send(body: dict[str, Any]) -> None:
            msg = aio_pika.Message(
                encode(body),
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                content_type="application/json",
            )
            await ex.publish(msg, routing_key=cfg["queue"])

        return await pace_async(send, cfg)


async def raw_worker(cfg: dict[str, Any], rec: Recorder) -> None:
    import aio_pika

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with await aio_pika.connect(URL) as conn:
        ch = await conn.channel()
        await ch.set_qos(prefetch_count=PREFETCH)
        queue = await ch.declare_queue(
            cfg["queue"], durable=True, arguments=_raw_args(cfg["contender"])
        )

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            now = time.monotonic_ns()
            hit(rec, json.loads(message.body), now)
            await message.ack()

        tag = await queue.consume(on_message)
        await stop.wait()
        await queue.cancel(tag)


# --------------------------------------------------------------------------- qworker


def _qworker_app(cfg: dict[str, Any], rec: Recorder | None) -> Any:
    from pydantic import BaseModel

    from qworker import App, Context, RetryPolicy

    class LatPayload(BaseModel):
        id: int
        t: int
        run: str
        kind: str
        pad: str

    qtype = "quorum" if cfg["contender"] == "qworker_quorum" else "classic"
    app = App(URL, name="bench-latency")
    # The qworker contenders' policy (bench/contenders/_qworker_common.py): same topology.
    retry = RetryPolicy(max_attempts=2, initial_delay=0.001, jitter=0)

    @app.handler(cfg["queue"], retry=retry, queue_type=qtype)
    async def handle(payload: LatPayload, context: Context) -> None:
        now = time.monotonic_ns()
        assert rec is not None
        rec.put(payload.id, payload.t, now)
        rec.count(started=1)

    return app


async def qworker_publish(cfg: dict[str, Any]) -> dict[str, Any]:
    app = _qworker_app(cfg, None)
    async with app:
        await app.declare()

        async def send(body: dict[str, Any]) -> None:
            await app.publish(cfg["queue"], body)

        return await pace_async(send, cfg)


async def qworker_worker(cfg: dict[str, Any], rec: Recorder) -> None:
    from qworker import Worker
    from qworker.logging import configure_logging

    configure_logging("json")  # as `qworker run --log-format json`
    worker = Worker(_qworker_app(cfg, rec), concurrency=PREFETCH, prefetch=PREFETCH)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    await worker.run()


# --------------------------------------------------------------------------- FastStream


async def faststream_publish(cfg: dict[str, Any]) -> dict[str, Any]:
    from faststream.rabbit import RabbitBroker, RabbitQueue

    broker = RabbitBroker(URL, logger=None)
    async with broker:
        await broker.declare_queue(RabbitQueue(cfg["queue"], durable=True))

        async def send(body: dict[str, Any]) -> None:
            await broker.publish(body, queue=cfg["queue"], persist=True)

        return await pace_async(send, cfg)


def faststream_worker(cfg: dict[str, Any], rec: Recorder) -> None:
    from faststream import FastStream
    from faststream.rabbit import Channel, RabbitBroker, RabbitQueue

    broker = RabbitBroker(URL, log_level=logging.DEBUG)  # access logs off, as the harness

    @broker.subscriber(
        RabbitQueue(cfg["queue"], durable=True), channel=Channel(prefetch_count=PREFETCH)
    )
    async def handle(body: dict[str, Any]) -> None:
        hit(rec, body, time.monotonic_ns())

    asyncio.run(FastStream(broker).run())


# --------------------------------------------------------------------------- dramatiq

_DRAMATIQ_REC: list[Recorder] = []


def _dramatiq_setup(cfg: dict[str, Any]) -> tuple[Any, Any]:
    import dramatiq
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    broker = RabbitmqBroker(url=URL)
    dramatiq.set_broker(broker)

    def lat_handle(payload: dict[str, Any]) -> None:
        hit(_DRAMATIQ_REC[0], payload, time.monotonic_ns())

    actor = dramatiq.actor(
        lat_handle, actor_name="lat_handle", queue_name=cfg["queue"], broker=broker
    )
    return broker, actor


def dramatiq_publish(cfg: dict[str, Any]) -> dict[str, Any]:
    broker, actor = _dramatiq_setup(cfg)
    try:
        return pace_sync(actor.send, cfg)
    finally:
        broker.close()


def dramatiq_worker(cfg: dict[str, Any], rec: Recorder) -> None:
    import dramatiq

    _DRAMATIQ_REC.append(rec)
    logging.basicConfig(level=logging.WARNING)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    broker, _ = _dramatiq_setup(cfg)
    broker.emit_after("process_boot")
    worker = dramatiq.Worker(broker, worker_threads=THREADS)
    worker.queue_prefetch = PREFETCH
    worker.start()
    while not stop.wait(0.2) and time.time() < cfg["deadline"]:
        pass
    worker.stop(timeout=10_000)
    broker.close()


# --------------------------------------------------------------------------- celery


def _celery_app(cfg: dict[str, Any], rec: Recorder | None) -> Any:
    from celery import Celery
    from kombu import Exchange, Queue

    q = cfg["queue"]
    app = Celery("latency", broker=URL, set_as_current=True)
    queue = Queue(q, Exchange(q, type="direct"), routing_key=q, durable=True)
    app.conf.update(
        broker_connection_retry_on_startup=True,
        task_queues=(queue,),
        task_default_queue=q,
        task_default_exchange=q,
        task_default_routing_key=q,
        task_acks_late=True,
        worker_prefetch_multiplier=PREFETCH,
        task_ignore_result=True,
        worker_enable_remote_control=False,
        task_serializer="json",
        accept_content=["json"],
    )

    @app.task(name="latency.handle")
    def handle(payload: dict[str, Any]) -> None:
        now = time.monotonic_ns()
        assert rec is not None
        hit(rec, payload, now)

    return app


def celery_publish(cfg: dict[str, Any]) -> dict[str, Any]:
    app = _celery_app(cfg, None)
    with app.connection_for_write() as conn:
        app.conf.task_queues[0](conn.default_channel).declare()
    task = app.tasks["latency.handle"]
    try:
        return pace_sync(task.delay, cfg)
    finally:
        app.close()


def celery_worker(cfg: dict[str, Any], rec: Recorder) -> None:
    app = _celery_app(cfg, rec)
    argv = [
        "worker",
        "--pool=solo",
        "--concurrency=1",
        "--loglevel=WARNING",
        "--without-gossip",
        "--without-mingle",
        f"--queues={cfg['queue']}",
        f"--hostname=latency-{cfg['run_id']}@%h",
    ]
    try:
        app.worker_main(argv=argv)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise


# --------------------------------------------------------------------------- entry


def publish(cfg: dict[str, Any]) -> dict[str, Any]:
    name = cfg["contender"]
    if name.startswith("raw_aiopika"):
        return asyncio.run(raw_publish(cfg))
    if name.startswith("qworker"):
        return asyncio.run(qworker_publish(cfg))
    if name == "faststream":
        return asyncio.run(faststream_publish(cfg))
    if name == "dramatiq":
        return dramatiq_publish(cfg)
    if name == "celery":
        return celery_publish(cfg)
    raise SystemExit(f"unknown contender {name!r}")


def worker(cfg: dict[str, Any]) -> None:
    name = cfg["contender"]
    rec = Recorder(cfg["recorder"], cfg["slots"])
    if name.startswith("raw_aiopika"):
        asyncio.run(raw_worker(cfg, rec))
    elif name.startswith("qworker"):
        asyncio.run(qworker_worker(cfg, rec))
    elif name == "faststream":
        faststream_worker(cfg, rec)
    elif name == "dramatiq":
        dramatiq_worker(cfg, rec)
    elif name == "celery":
        celery_worker(cfg, rec)
    else:
        raise SystemExit(f"unknown contender {name!r}")


def main() -> int:
    if len(sys.argv) != 3 or sys.argv[1] not in ("publish", "worker"):
        print(__doc__, file=sys.stderr)
        return 2
    cfg = json.loads(sys.argv[2])
    watchdog(cfg["deadline"], os.getppid())
    if sys.argv[1] == "publish":
        print(json.dumps(publish(cfg)), flush=True)
    else:
        worker(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
