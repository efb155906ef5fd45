"""Publish a handful of orders: good ones, one for an unknown customer, one that is not JSON."""

from __future__ import annotations

import asyncio
import sys

from examples.orders.app import app


async def main(count: int) -> None:
    async with app:
        await app.declare()
        for i in range(count):
            order = {"order_id": f"o-{i}", "amount_cents": 100 + i, "customer": "alice"}
            await app.publish("orders.placed", order)
        await app.publish(
            "orders.placed", {"order_id": "o-bad", "amount_cents": 5, "customer": "nobody"}
        )
        await app.publish("orders.placed", "this is not an order")
        await app.publish(
            "orders.placed", {"order_id": "o-neg", "amount_cents": -1, "customer": "x"}
        )
    print(f"published {count} good orders and 3 bad ones to orders.placed")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 10))
