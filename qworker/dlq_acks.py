"""Which ack frames to send: consecutive delivery tags go as one ``multiple`` ack. Pure logic.

A replay removes thousands of messages; one ack frame per message costs a write
on the client and, on a quorum queue, a Raft command on the broker. A
``basic.ack(multiple=True)`` for tag T removes every unacked message up to T,
so it may only be sent when every tag up to T is meant to be acked: messages
held but not selected (a gap) stop the run, and the tags above a gap are acked
one by one. T itself must still be unacked, or the broker closes the channel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Single acks remembered above a gap; past this, coalescing stops for the cursor.
SENT_LIMIT = 10_000


@dataclass(slots=True)
class AckBook:
    """The acks requested on one channel (delivery tags start at 1) and those already sent."""

    floor: int = 0  #: every tag up to here is acked on the wire
    pending: set[int] = field(default_factory=set)  #: requested, not yet sent
    sent: set[int] = field(default_factory=set)  #: sent as single acks, above ``floor``
    coalescing: bool = True

    def add(self, tag: int) -> None:
        """Request the ack of ``tag``."""
        self.pending.add(tag)

    def plan(self) -> tuple[int | None, list[int]]:
        """The frames for every pending ack: a multiple ack up to a tag (or None), then singles.

        The multiple ack covers the run of requested or already acked tags just
        above ``floor``; its tag is the highest one in the run that is still unacked.
        """
        multiple: int | None = None
        if self.coalescing:
            while True:
                above = self.floor + 1
                if above in self.pending:
                    self.pending.discard(above)
                    multiple = above
                elif above in self.sent:
                    self.sent.discard(above)
                else:
                    break
                self.floor = above
        singles = sorted(self.pending)
        self.pending.clear()
        if self.coalescing:
            self.sent.update(singles)
            if len(self.sent) > SENT_LIMIT:
                # A permanent gap (a message kept) below them: stop tracking, ack singly.
                self.sent.clear()
                self.coalescing = False
        return multiple, singles
