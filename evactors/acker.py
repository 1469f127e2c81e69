"""Acker: deletes ingest entries once every shard committed its part of them.

Deletion and the counter update are one Lua script, and the counter only moves for
entries that really were deleted, so a replayed entry acknowledged twice counts once.
"""

from __future__ import annotations

import trio

from .messages import Receipt
from .redis_io import Keys, RedisIO, retrying
from .replay import InFlight
from .resp import Script

# KEYS: stream, counter[, flush plan]. ARGV: the plan carried out (or ""), id1, n1, id2, n2, …
# Used by the acker (no plan) and the flusher, which drops its plan only if it is still the
# one it carried out (another flusher may already have recorded the next).
REMOVE_ENTRIES = """
local removed = 0
for i = 2, #ARGV, 2 do
  if redis.call('XDEL', KEYS[1], ARGV[i]) == 1 then
    removed = removed + tonumber(ARGV[i + 1])
  end
end
if removed > 0 then redis.call('DECRBY', KEYS[2], removed) end
if KEYS[3] and redis.call('GET', KEYS[3]) == ARGV[1] then redis.call('DEL', KEYS[3]) end
return removed
"""


async def acker(redis: RedisIO, keys: Keys, in_flight: InFlight,
                inbox: trio.MemoryReceiveChannel[list[Receipt]]) -> None:
    remove = Script(REMOVE_ENTRIES)
    async for receipts in inbox:
        while True:  # take whatever else is queued: one script call for all of it
            try:
                receipts = receipts + inbox.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        args: list[str | int] = [""]
        for r in receipts:
            args += [r.entry_id, r.events]

        await retrying("ack", redis.script, remove, [keys.ingest, keys.ingest_count], args)
        in_flight.done([r.entry_id for r in receipts])
