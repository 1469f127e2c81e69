"""A shard's inbox: the stream where a shard's events wait for its owner when they reached
an instance (or a session worker) that does not hold the shard. Any instance takes any
request; the events of each visitor reach the one owner of its shard through here, and its
commit deletes them in the same transaction that takes them in (one slot: the shard's hash
tag), so an inbox entry is taken in exactly once whoever owns the shard, before or after a
move. A unit forwarded twice (a crash before its ingest entry went) is dropped by the
shard's dedup, as a replay is.
"""

from __future__ import annotations

from collections.abc import Sequence

from evactors.core.messages import Enriched, ShardBatch
from evactors.core.units import decode_unit, encode_unit
from evactors.store.keys import Keys
from evactors.store.redis_io import RedisIO, stream_entries

# Units read from an inbox at a time (each up to ``pipeline.unit_events`` events).
READ_UNITS = 8


def stream_id(entry_id: bytes) -> tuple[int, int]:
    """A stream entry id (``b"ms-seq"``) as it orders."""
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq)


class Inbox:
    def __init__(self, redis: RedisIO, keys: Keys) -> None:
        self.redis, self.keys = redis, keys

    async def forward(self, shard: int, batches: Sequence[ShardBatch]) -> None:
        """Leave ``batches`` in the shard's inbox, as one entry (their receipts stay here)."""
        events = [e for b in batches for e in b.events]
        if events:
            await self.redis.execute([["XADD", self.keys.inbox(shard), "*", "u",
                                       encode_unit(0, shard, ShardBatch(events))]], check=True)

    async def newest(self, shard: int) -> tuple[int, int] | None:
        """The id of the newest entry (``stream_id``), or None when the inbox is empty."""
        (entries,) = await self.redis.execute([["XREVRANGE", self.keys.inbox(shard), "+", "-", "COUNT", 1]],
                                              check=True)
        newest = stream_entries(entries)
        return stream_id(newest[0][0]) if newest else None

    async def read(self, shard: int, after: bytes) -> list[tuple[bytes, list[Enriched]]]:
        """The units after entry id ``after`` (``b"-"``: from the first), oldest first."""
        start = after if after == b"-" else b"(" + after
        (entries,) = await self.redis.execute(
            [["XRANGE", self.keys.inbox(shard), start, "+", "COUNT", READ_UNITS]], check=True)
        return [(entry_id, decode_unit(fields[b"u"])[2]) for entry_id, fields in stream_entries(entries)]
