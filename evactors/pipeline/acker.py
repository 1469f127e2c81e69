"""Acker: deletes ingest entries once every shard committed its part of them.

Deletion and the counter update are one Lua script, and the counter only moves for
entries that really were deleted, so a replayed entry acknowledged twice counts once.
"""

from __future__ import annotations

import trio

from evactors.core.channels import take_queued
from evactors.core.messages import Receipt
from evactors.pipeline.inflight import InFlight
from evactors.store.keys import Keys
from evactors.store.redis_io import RedisIO, retrying
from evactors.store.scripts import REMOVE_ENTRIES


async def acker(redis: RedisIO, keys: Keys, in_flight: InFlight,
                receipts: trio.MemoryReceiveChannel[list[Receipt]]) -> None:
    """Delete the ingest entries of complete receipts: what is queued, in one script call."""
    async for first in receipts:
        done = [r for taken in take_queued(receipts, first) for r in taken]
        args: list[str | int] = [""]
        for r in done:
            args += [r.entry_id, r.events]
        await retrying("ack", redis.script, REMOVE_ENTRIES, [keys.ingest, keys.ingest_count], args)
        in_flight.done([r.entry_id for r in done])
