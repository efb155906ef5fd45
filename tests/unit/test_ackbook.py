"""Which ack frames to send (``qworker.ackbook``): the worker's and the DLQ tool's decision.

The property tests replay a book's plans against the broker's rules (a multiple ack
removes every unacked tag up to its own, which must itself be unacked) and check that
exactly the requested messages are removed, whatever the order of requests, rejects and
writes; and that a message still held (a gap) is never covered.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qworker.ackbook import RUNS_LIMIT, AckBook, TagRuns


def test_consecutive_acks_become_one_multiple_ack_and_gaps_single_acks() -> None:
    """1,2 then 4,5 (3 still in flight): multiple up to 2, singles 4 and 5; then 3 alone."""
    book = AckBook()
    for tag in (2, 1, 4, 5):
        book.add(tag)
    assert book.plan() == (2, [4, 5])
    book.add(3)
    assert book.plan() == (3, [])
    assert book.floor == 5 and not book.above.runs


def test_a_rejected_tag_does_not_stop_the_run() -> None:
    """1 acked, 2 rejected (written before), 3 acked: one multiple ack up to 3."""
    book = AckBook()
    book.add(1)
    book.settled(2)
    book.add(3)
    assert book.plan() == (3, [])
    assert book.floor == 3


def test_a_run_ending_on_settled_tags_names_the_last_requested_tag() -> None:
    """2 and 3 rejected before, 1 acked now: the multiple ack names 1 (2 and 3 are no longer
    unacked, the broker would refuse them), and the floor moves past them."""
    book = AckBook()
    book.settled(2)
    book.settled(3)
    book.add(1)
    assert book.plan() == (1, [])
    assert book.floor == 3


def test_nothing_requested_writes_nothing() -> None:
    book = AckBook()
    book.settled(1)
    assert book.plan() == (None, [])


def test_many_gaps_turn_coalescing_off_and_memory_stays_bounded() -> None:
    """Every other tag kept (a DLQ cursor skipping messages): past RUNS_LIMIT runs, singles."""
    book = AckBook()
    tags = list(range(2, 2 * RUNS_LIMIT + 5, 2))
    for tag in tags:
        book.add(tag)
    assert book.plan() == (None, tags)
    assert not book.coalescing and not book.above.runs
    book.add(1)
    assert book.plan() == (None, [1])


def test_one_long_gap_costs_one_run_not_one_entry_per_tag() -> None:
    """A worker with one delivery hanging at tag 1: 50,000 later acks are one run."""
    book = AckBook()
    for tag in range(2, 50_002):
        book.add(tag)
        if tag % 100 == 0:
            book.plan()
    book.plan()
    assert book.coalescing and book.above.runs == [[2, 50_001]]
    book.add(1)
    assert book.plan() == (1, [])
    assert book.floor == 50_001


@pytest.mark.parametrize(
    ("tags", "runs"),
    [
        ([1, 2, 3], [[1, 3]]),
        ([3, 1, 2], [[1, 3]]),
        ([1, 3, 5, 4], [[1, 1], [3, 5]]),
        ([5, 1, 3, 2, 4], [[1, 5]]),
        ([10, 1], [[1, 1], [10, 10]]),
    ],
)
def test_tag_runs(tags: list[int], runs: list[list[int]]) -> None:
    tag_runs = TagRuns()
    for tag in tags:
        tag_runs.add(tag)
    assert tag_runs.runs == runs


@given(
    st.lists(
        st.tuples(st.integers(1, 60), st.sampled_from(["ack", "reject", "write"])), max_size=120
    ),
    st.sets(st.integers(1, 60)),
)
def test_frames_remove_exactly_the_settled_messages_and_never_a_held_one(
    steps: list[tuple[int, str]], held: set[int]
) -> None:
    """Against the broker's rules, whatever the order of acks, rejects (written at once, as
    the worker does) and writes: every frame is valid, a held tag is never removed, and in
    the end exactly the acked and rejected tags are gone."""
    unacked = set(range(1, 61))
    settled: set[int] = set()
    book = AckBook()

    def write() -> None:
        multiple, singles = book.plan()
        if multiple is not None:
            assert multiple in unacked  # else the broker closes the channel
            removed = {t for t in unacked if t <= multiple}
            assert not removed & held
            unacked.difference_update(removed)
        for tag in singles:
            assert tag in unacked
            unacked.discard(tag)

    for tag, step in steps:
        if step == "write":
            write()
        elif tag not in held and tag not in settled:
            settled.add(tag)
            if step == "ack":
                book.add(tag)
            else:
                unacked.discard(tag)  # the reject frame is written before it is noted
                book.settled(tag)
    write()
    assert unacked == set(range(1, 61)) - settled
