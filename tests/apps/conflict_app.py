"""An app whose queue a test has declared beforehand with other arguments."""

import os

from qworker import App

app = App(os.environ.get("QWORKER_URL", "amqp://guest:guest@127.0.0.1:5672/"))


@app.handler("orders.placed.conflict-test")
async def handle(payload: bytes) -> None:
    """Never runs: the topology conflict stops the worker first."""
