"""The orders example: one handler that succeeds, fails transiently, or dead-letters.

Run it with ``qworker run examples.orders.app:app`` and feed it with
``python -m examples.orders.produce``.
"""

from __future__ import annotations

import os
import random

from pydantic import BaseModel, Field

from qworker import App, Context, RetryPolicy

app = App(
    os.environ.get("QWORKER_URL", "amqp://guest:guest@localhost:5672/"), name="orders-example"
)


class OrderPlaced(BaseModel):
    order_id: str
    amount_cents: int = Field(gt=0)
    customer: str


class PaymentGatewayDown(ConnectionError):
    """The (simulated) payment gateway did not answer."""


@app.handler(
    "orders.placed",
    retry=RetryPolicy(max_attempts=4, initial_delay=0.5, multiplier=2.0, max_delay=5.0),
    transient=(PaymentGatewayDown,),
    permanent=(LookupError,),
    timeout=10.0,
)
async def charge(order: OrderPlaced, ctx: Context) -> None:
    """Charge an order; a third of the calls hit a flaky gateway, unknown customers are fatal."""
    if order.customer == "nobody":
        raise LookupError(f"customer {order.customer!r} does not exist")
    if random.random() < float(os.environ.get("ORDERS_FAILURE_RATE", "0.33")):
        raise PaymentGatewayDown(f"gateway timeout while charging {order.order_id}")
    ctx.log.info("order.charged", order_id=order.order_id, amount_cents=order.amount_cents)
