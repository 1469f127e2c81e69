"""What actors send each other over their bounded channels: always batches, never single events."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec
import trio

from evactors.core.model import BotRow, EventRow, Incoming


@dataclass
class Receipt:
    """One durable ingest entry, split over session shards. When every part is committed
    (``remaining`` hits 0) the entry may be deleted from the ingest stream."""

    entry_id: str
    events: int
    remaining: int = 0
    lane: int = 0  # the ingest stream that holds it (``Keys.lanes``)
    # set once every part is committed or left in its owner's inbox (``settle``): what answers
    # that wait for their commit wait on (``pipeline.answer``); None when nobody waits
    settled: trio.Event | None = None

    @property
    def key(self) -> str:
        """The entry among all lanes' (``InFlight``'s key)."""
        return f"{self.lane}/{self.entry_id}"


def count_down(receipts: list[Receipt]) -> list[Receipt]:
    """A shard committed its part of each of ``receipts``: those now complete (every shard
    holding part of them has committed), whose ingest entries may go."""
    finished = []
    for receipt in receipts:
        receipt.remaining -= 1
        if receipt.remaining == 0:
            finished.append(receipt)
    return settle(finished)


def settle(finished: list[Receipt]) -> list[Receipt]:
    """Complete receipts: the requests waiting for their commit may be answered now."""
    for receipt in finished:
        if receipt.settled is not None:
            receipt.settled.set()
    return finished


@dataclass
class IngestBatch:
    """Events of one or more accepted requests, already durable in the ingest stream."""

    receipts: list[Receipt]
    events: list[Incoming]


class Enriched(msgspec.Struct, gc=False):
    """One enriched event. Not tracked by the garbage collector (one per event; it holds
    rows and events, never itself), like the rows in ``model``."""

    row: EventRow | BotRow  # a BotRow: a filtered bot, bound for events_bots
    incoming: Incoming
    shard: int


@dataclass
class ShardBatch:
    """A shard's part of one or more ingest batches."""

    events: list[Enriched] = field(default_factory=list)
    receipts: list[Receipt] = field(default_factory=list)


@dataclass
class Notice:
    """For the publisher: rows just received (committed to the buffer) or saved (in ClickHouse)."""

    channel: str  # "event:received" | "event:saved"
    rows: list[EventRow]
    # screen views received but held for their duration (not in the buffer, not published):
    # they make their visitor live and are the visitor's last screen view
    held: list[EventRow] = field(default_factory=list)
