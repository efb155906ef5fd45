"""Small helpers shared by the contract cases (not a test module)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from qworker import CircuitState, Observer, Outcome, OutcomeKind, RetryPolicy


class Order(BaseModel):
    order_id: str
    amount_cents: int


def fast(max_attempts: int = 3, initial: float = 0.05, **options: Any) -> RetryPolicy:
    """A retry policy with short real delays and no jitter (tiers are exact)."""
    return RetryPolicy(max_attempts=max_attempts, initial_delay=initial, jitter=0, **options)


def kinds(outcomes: list[Outcome], message_id: str) -> list[tuple[str, int, str | None]]:
    """(kind, attempt, tier or reason) of every outcome of one message, in order."""
    return [
        (o.kind.value, o.attempt, o.tier if o.kind is OutcomeKind.RETRIED else o.reason)
        for o in outcomes
        if o.message_id == message_id
    ]


class Circuits(Observer):
    """Every circuit breaker state change, in order."""

    def __init__(self) -> None:
        self.states: list[CircuitState] = []

    def circuit(self, queue: str, handler: str, state: CircuitState) -> None:
        self.states.append(state)
