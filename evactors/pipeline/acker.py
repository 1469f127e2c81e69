"""Acker: deletes ingest entries once every shard committed its part of them (one script
call per ingest lane).

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
        by_lane: dict[int, list[str | int]] = {}
        for r in done:
            by_lane.setdefault(r.lane, [""]).extend((r.entry_id, r.events))
        calls = [([keys.lanes[lane].stream, keys.lanes[lane].counter], args) for lane, args in by_lane.items()]
        await retrying("ack", _remove, redis, calls)
        in_flight.done([r.key for r in done])


async def _remove(redis: RedisIO, calls: list[tuple[list[str], list[str | int]]]) -> None:
    """One script call per lane, in one pipeline (one round trip per master)."""
    for reply in await redis.scripts(REMOVE_ENTRIES, calls):
        if isinstance(reply, Exception):
            raise reply
