"""Dead letters: what could not be processed, kept with why, never silently dropped.

One Redis stream (``evx:dead``). Entries come from the replayer (an ingest entry that
cannot be decoded) and from the enricher pool (an event whose enrichment raised). Each
move is atomic with the removal from where it was. ``bin/evactors dead-letter list`` shows
them; ``replay`` puts them back into the ingest stream (after a fix), where the replayer
picks them up like any entry a previous run left.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import msgspec

from evactors.core.model import Incoming
from evactors.ops import metrics
from evactors.store.keys import Keys, Lane
from evactors.store.redis_io import RedisIO, retrying
from evactors.store.scripts import BURY_ENTRY, REPLAY, run_sync

log = logging.getLogger("evactors.deadletter")


_encode = msgspec.msgpack.Encoder().encode


class DeadLetters:
    def __init__(self, redis: RedisIO, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    async def bury_entry(self, source: str, where: Lane, entry_id: str,
                         fields: dict[bytes, bytes], error: Exception, data_field: bytes) -> None:
        """Move an entry of ``where.stream`` to ``where.dead`` (one slot: one script)."""
        log.error("%s entry %s cannot be decoded; moved to the dead-letter stream: %s",
                  source, entry_id, error)
        metrics.DEAD_LETTERS.inc()
        args: list[Any] = [entry_id, int(fields.get(b"n", b"0")), str(error)[:500],
                           fields.get(data_field, b""), source]
        await retrying("dead-letter", self.redis.script, BURY_ENTRY, list(where), args)

    async def bury_ingest_entry(self, lane: Lane, entry_id: str, fields: dict[bytes, bytes],
                                error: Exception) -> None:
        await self.bury_entry("ingest", lane, entry_id, fields, error, b"e")

    async def bury_buffer_entry(self, shard: int, entry_id: str, fields: dict[bytes, bytes],
                                error: Exception) -> None:
        keys = self.keys
        await self.bury_entry("buffer", Lane(keys.buffer(shard), keys.buffer_count(shard), keys.buffer_dead(shard)),
                              entry_id, fields, error, b"d")

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


def list_entries(client: Any, keys: Keys, shards: int, limit: int) -> list[dict[str, Any]]:
    """The dead letters of every stream (in id order within each), up to ``limit``."""
    out: list[dict[str, Any]] = []
    for dead in keys.dead_letters(shards):
        for entry_id, fields in client.xrange(dead, "-", "+", count=limit - len(out)):
            text = {k.decode(): v.decode(errors="replace") for k, v in fields.items() if k != b"data"}
            out.append({"id": entry_id.decode(), **text, "bytes": len(fields.get(b"data", b""))})
        if len(out) >= limit:
            break
    return out


def replay(client: Any, keys: Keys, ids: list[str] | None) -> int:
    """Move dead letters of events (all, or the given ids) back into their lane's ingest
    stream. Buffer entries (rows, not events) are left for inspection."""
    moved = 0
    for lane in keys.lanes:
        found = [entry_id.decode() for entry_id, fields in client.xrange(lane.dead, "-", "+")
                 if fields.get(b"source") != b"buffer"]
        chosen = found if ids is None else [i for i in found if i in ids]
        if chosen:
            moved += int(run_sync(client, REPLAY, [lane.dead, lane.stream, lane.counter], chosen))
    return moved
