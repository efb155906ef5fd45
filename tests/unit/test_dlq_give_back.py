"""Which ``basic.nack(multiple, requeue)`` frames give back what a DLQ pass still holds.

Every unacked tag of ``1..delivered`` must be returned exactly once, in ascending order,
at most :data:`GIVE_BACK_BATCH` per frame, and every frame must end on a tag the channel
still holds (the broker closes the channel for an unknown delivery tag).
"""

from __future__ import annotations

import random

import pytest

from qworker.dlq.acks import GIVE_BACK_BATCH, Settled


def returned_by(plan: list[int], delivered: int, acked: set[int]) -> list[list[int]]:
    """What each frame of ``plan`` returns, as the broker applies a multiple nack."""
    held = [tag for tag in range(1, delivered + 1) if tag not in acked]
    frames = []
    for tag in plan:
        assert tag in held, f"frame ends on {tag}, which the channel no longer holds"
        frames.append([t for t in held if t <= tag])
        held = [t for t in held if t > tag]
    assert held == [], f"never returned: {held}"
    return frames


@pytest.mark.parametrize(
    ("delivered", "acked", "batch", "plan"),
    [
        (0, [], 32, []),
        (1, [], 32, [1]),
        (5, [], 32, [5]),
        (32, [], 32, [32]),
        (33, [], 32, [32, 33]),
        (70, [], 32, [32, 64, 70]),
        (5, [1, 2, 3, 4, 5], 32, []),  # a replay that took everything
        (5, [5], 32, [4]),  # the frame ends on the last tag still held
        (5, [1], 32, [5]),
        (70, [1, 2, 3, 5, 6, 40], 32, [37, 70]),
        (10, [2, 4, 6, 8, 10], 2, [3, 7, 9]),
        (4, [], 1, [1, 2, 3, 4]),
    ],
)
def test_give_back_plan(delivered: int, acked: list[int], batch: int, plan: list[int]) -> None:
    settled = Settled()
    for tag in acked:
        settled.add(tag)
    assert settled.give_back(delivered, batch) == plan
    frames = returned_by(plan, delivered, set(acked))
    assert all(1 <= len(frame) <= batch for frame in frames)


@pytest.mark.parametrize(
    ("acked", "runs"),
    [
        ([1, 2, 3], [[1, 3]]),
        ([1, 2, 4, 5], [[1, 2], [4, 5]]),
        ([4, 5, 1, 2, 3], [[1, 5]]),  # out of order: merged with both neighbours
        ([10, 2, 6], [[2, 2], [6, 6], [10, 10]]),
        ([3, 3, 3], [[3, 3]]),  # the same tag twice is one tag
    ],
)
def test_settled_keeps_runs(acked: list[int], runs: list[list[int]]) -> None:
    settled = Settled()
    for tag in acked:
        settled.add(tag)
    assert settled.runs == runs


def test_give_back_returns_each_held_tag_once_in_order_whatever_was_acked() -> None:
    """Random selections (as a filtered replay acks them), mostly in delivery order."""
    chooser = random.Random(7)
    for _ in range(300):
        delivered = chooser.randint(0, 400)
        acked = {t for t in range(1, delivered + 1) if chooser.random() < chooser.random()}
        order = sorted(acked)
        if order and chooser.random() < 0.3:
            chooser.shuffle(order)
        settled = Settled()
        for tag in order:
            settled.add(tag)
        plan = settled.give_back(delivered)
        frames = returned_by(plan, delivered, acked)
        flat = [tag for frame in frames for tag in frame]
        assert flat == sorted(set(range(1, delivered + 1)) - acked)
        assert all(len(frame) <= GIVE_BACK_BATCH for frame in frames)
