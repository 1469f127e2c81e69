"""Dead letters: what could not be processed, kept with why, never silently dropped.

One Redis stream (``evx:dead``). Entries come from the replayer (an ingest entry that
cannot be decoded) and from the enricher pool (an event whose enrichment raised). Each
move is atomic with the removal from where it was. ``bin/evactors dead-letter list`` shows
them; ``replay`` puts them back into the ingest stream (after a fix), where the replayer
picks them up like any entry a previous run left.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import msgspec

from . import metrics
from .model import Incoming
from .redis_io import Keys, RedisIO, retrying

log = logging.getLogger("evactors.deadletter")

_encode = msgspec.msgpack.Encoder().encode

# KEYS: a stream, its counter, the dead-letter stream. ARGV: id, count, error, data, source.
# The entry moves to the dead letters, atomically with its removal and the count.
BURY_ENTRY = """
redis.call('XADD', KEYS[3], '*', 'source', ARGV[5], 'id', ARGV[1], 'n', ARGV[2], 'error', ARGV[3],
           'data', ARGV[4])
if redis.call('XDEL', KEYS[1], ARGV[1]) == 1 then
  redis.call('DECRBY', KEYS[2], tonumber(ARGV[2]))
end
return 1
"""

# KEYS: dead-letter stream, ingest stream, its counter. ARGV: dead-letter ids.
# An entry goes back as an ingest entry (its events as a msgpack array), and leaves.
REPLAY = """
local moved = 0
for i = 1, #ARGV do
  local found = redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i])
  if #found == 1 then
    local fields = found[1][2]
    local entry = {}
    for j = 1, #fields, 2 do entry[fields[j]] = fields[j + 1] end
    local n = tonumber(entry['n'] or '1')
    redis.call('XADD', KEYS[2], '*', 'n', n, 'e', entry['data'])
    redis.call('INCRBY', KEYS[3], n)
    redis.call('XDEL', KEYS[1], ARGV[i])
    moved = moved + 1
  end
end
return moved
"""


class DeadLetters:
    def __init__(self, redis: RedisIO, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self.bury_entry_script = redis.client.register_script(BURY_ENTRY)
        self.replay_script = redis.client.register_script(REPLAY)

    async def bury_entry(self, source: str, stream: str, counter: str, entry_id: str,
                         fields: dict[bytes, bytes], error: Exception, data_field: bytes) -> None:
        log.error("%s entry %s cannot be decoded; moved to the dead-letter stream: %s",
                  source, entry_id, error)
        metrics.DEAD_LETTERS.inc()
        args: list[Any] = [entry_id, int(fields.get(b"n", b"0")), str(error)[:500],
                           fields.get(data_field, b""), source]
        await retrying("dead-letter", self.redis.run, functools.partial(
            self.bury_entry_script, keys=[stream, counter, self.keys.dead_letter], args=args))

    async def bury_ingest_entry(self, entry_id: str, fields: dict[bytes, bytes], error: Exception) -> None:
        await self.bury_entry("ingest", self.keys.ingest, self.keys.ingest_count, entry_id, fields,
                              error, b"e")

    async def bury_events(self, poison: list[tuple[Incoming, str]]) -> None:
        """Events whose processing raised: kept with the error, one entry each."""
        for event, error in poison:
            log.error("event %s of project %s failed in enrichment; moved to the dead-letter "
                      "stream: %s", event.message_id, event.project_id, error)
        metrics.DEAD_LETTERS.inc(len(poison))

        def build(pipe: Any) -> None:
            for event, error in poison:
                pipe.xadd(self.keys.dead_letter, {
                    b"source": b"enrich", b"project": event.project_id,
                    b"message_id": event.message_id, b"error": error[:500], b"n": 1,
                    b"data": _encode([event]), b"at": int(time.time() * 1000)})

        await retrying("dead-letter", self.redis.pipeline, build)


def list_entries(client: Any, keys: Keys, limit: int) -> list[dict[str, Any]]:
    out = []
    for entry_id, fields in client.xrange(keys.dead_letter, "-", "+", count=limit):
        text = {k.decode(): v.decode(errors="replace") for k, v in fields.items() if k != b"data"}
        out.append({"id": entry_id.decode(), **text, "bytes": len(fields.get(b"data", b""))})
    return out


def replay(client: Any, keys: Keys, ids: list[str] | None) -> int:
    """Move dead letters (all, or the given ids) back into the ingest stream. Buffer
    entries (rows, not events) are left for inspection."""
    if ids is None:
        ids = [entry_id.decode() for entry_id, fields in client.xrange(keys.dead_letter, "-", "+")
               if fields.get(b"source") != b"buffer"]
    if not ids:
        return 0
    script = client.register_script(REPLAY)
    return int(script(keys=[keys.dead_letter, keys.ingest, keys.ingest_count], args=ids))
