"""Which ack frames to send on one channel: consecutive delivery tags go as one ``multiple``
ack. Pure logic, used by the worker (:mod:`qworker.acking`) and the DLQ tool
(:mod:`qworker.dlq.acks`).

One ack frame per message costs a frame and a socket write on the client and, on a quorum
queue, a Raft command on the broker. A ``basic.ack(multiple=True)`` for tag T removes every
unacked message up to T, so it may only be sent when every tag up to T is acked now or was
settled before (acked, rejected or nacked, by frames already written). A tag this book was
not told about (a message still being handled, or kept) is a gap: the multiple ack stops
below it, and the acks above it go one by one until it is settled. T itself must still be
unacked, or the broker closes the channel (``collect_acks`` must find T).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

#: Runs of settled tags remembered above a gap; past this, coalescing stops for the channel
#: (a worker has at most its prefetch in flight, so its gaps stay far below this; a DLQ
#: cursor that keeps every other message would not).
RUNS_LIMIT = 10_000


@dataclass(slots=True)
class TagRuns:
    """Delivery tags as ascending runs ``[first, last]``: one entry per gap, never one per tag
    (tags are settled mostly in delivery order)."""

    runs: list[list[int]] = field(default_factory=list)

    def add(self, tag: int) -> None:
        """Note ``tag``."""
        runs = self.runs
        if runs and runs[-1][0] <= tag <= runs[-1][1] + 1:
            runs[-1][1] = max(runs[-1][1], tag)
            return
        if not runs or tag > runs[-1][1] + 1:
            runs.append([tag, tag])
            return
        # Out of order: insert, then merge with the neighbours it touches.
        index = bisect.bisect_left(runs, [tag, tag])
        runs.insert(index, [tag, tag])
        merged: list[list[int]] = []
        for run in runs:
            if merged and run[0] <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], run[1])
            else:
                merged.append(run)
        self.runs = merged

    def take_run_from(self, tag: int) -> int | None:
        """If a run starts at ``tag``, forget it and return its last tag."""
        runs = self.runs
        if runs and runs[0][0] == tag:
            return runs.pop(0)[1]
        return None


@dataclass(slots=True)
class AckBook:
    """The acks requested on one channel (delivery tags start at 1) and the tags settled above
    the floor."""

    floor: int = 0  #: every tag up to here is settled on the wire
    pending: set[int] = field(default_factory=set)  #: acks requested, not yet sent
    above: TagRuns = field(default_factory=TagRuns)  #: settled tags above ``floor``
    coalescing: bool = True

    def add(self, tag: int) -> None:
        """Request the ack of ``tag``."""
        self.pending.add(tag)

    def settled(self, tag: int) -> None:
        """``tag`` was settled by a frame already written (a reject or a nack): a multiple
        ack may cover it."""
        if self.coalescing and tag > self.floor:
            self._remember([tag])

    def plan(self) -> tuple[int | None, list[int]]:
        """The frames for every pending ack: a multiple ack up to a tag (or None), then singles.

        The multiple ack covers the run of requested or settled tags just above ``floor``;
        its tag is the highest requested one in the run (still unacked on the broker).
        """
        if not self.pending:
            return None, []
        multiple: int | None = None
        pending = sorted(self.pending)
        self.pending.clear()
        first = 0
        if self.coalescing:
            while True:
                above = self.floor + 1
                if first < len(pending) and pending[first] == above:
                    multiple = above
                    self.floor = above
                    first += 1
                elif (last := self.above.take_run_from(above)) is not None:
                    self.floor = last
                else:
                    break
        singles = pending[first:]
        if self.coalescing:
            self._remember(singles)
        return multiple, singles

    def _remember(self, tags: list[int]) -> None:
        for tag in tags:
            self.above.add(tag)
        if len(self.above.runs) > RUNS_LIMIT:
            # Many gaps (kept messages) below them: stop tracking, ack singly from now on.
            self.above.runs.clear()
            self.coalescing = False
