"""How big a run is: CI size by default, full size with ``QWORKER_FAULTS_SIZE=full``."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Size:
    """How big a run is: CI size by default, full size with ``QWORKER_FAULTS_SIZE=full``."""

    name: str
    messages: int  # per single-kind scenario
    faults: int  # per single-kind scenario
    mixed_messages: int
    mixed_faults: int
    rate: float  # messages published per second
    hostile_examples: int
    timeout: float  # per test, seconds

    @classmethod
    def from_env(cls) -> Size:
        name = os.environ.get("QWORKER_FAULTS_SIZE", "ci").lower()
        if name == "full":
            return cls("full", 20_000, 8, 100_000, 24, 700.0, 1000, 3600)
        if name != "ci":
            raise ValueError(f"QWORKER_FAULTS_SIZE must be 'ci' or 'full', got {name!r}")
        return cls("ci", 1200, 3, 2000, 6, 150.0, 100, 240)


SIZE = Size.from_env()


def seed() -> int:
    """The run's random seed: ``QWORKER_FAULTS_SEED`` or a fresh one (printed in the summary)."""
    return int(os.environ.get("QWORKER_FAULTS_SEED") or random.randrange(1, 2**31))
