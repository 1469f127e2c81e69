"""The backlog: events durable in Redis and not yet in ClickHouse. Ingest reads its cached
figure for backpressure; the ``backlog`` actor refreshes it every second, with the lag, the
cached buffer size readers outside the service use, and the channel depths.

Nothing here expires state: every key the service writes carries its own TTL, and the
session actors sweep idle sessions (docs/architecture.md, Redis keys)."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import trio

from evactors.ops import metrics
from evactors.store.keys import Keys
from evactors.store.redis_io import RedisIO, transient

log = logging.getLogger("evactors.backlog")


class Backlog:
    """Events durable in Redis and not yet in ClickHouse: the ingest stream plus the
    buffers. ``exact()`` reads the counters (kept by the same transactions that move the
    events); ``cached`` is the last value, what the hot path (ingest) reads."""

    def __init__(self, redis: RedisIO, keys: Keys, shards: int) -> None:
        self.redis = redis
        self.keys = keys
        self.shards = shards
        self.cached = 0
        self.lag_seconds = 0.0

    async def exact(self) -> int:
        (values,) = await self.redis.execute([["MGET", *self.keys.backlog_counters(self.shards)]], check=True)
        total = sum(int(v or 0) for v in values)
        self.cached = total
        metrics.BACKLOG.set(total)
        return total

    async def lag(self) -> float:
        """Age of the oldest event still waiting in Redis (0 when nothing waits)."""
        heads = await self.redis.execute([["XRANGE", stream, "-", "+", "COUNT", 1]
                                          for stream in self.keys.backlog_streams(self.shards)], check=True)
        oldest = min((int(entries[0][0].split(b"-")[0]) for entries in heads if entries), default=None)
        self.lag_seconds = max(0.0, time.time() - oldest / 1000) if oldest is not None else 0.0
        metrics.LAG.set(self.lag_seconds)
        return self.lag_seconds


def backlog_sizes(client: Any, keys: Keys, shards: int) -> dict[str, Any]:
    """For readers outside the service (sync): the exact backlog from the counters, and the
    cached figure with the seconds it has left (None once expired: the service is not
    refreshing it). One moment for every counter on one server; on a cluster, per master."""
    names = keys.backlog_counters(shards)
    if keys.clustered:
        values = client.mget_nonatomic(names)
        cached, ttl = client.get(keys.buffer_size_cached), client.ttl(keys.buffer_size_cached)
    else:
        pipe = client.pipeline(transaction=True)
        pipe.mget(names)
        pipe.get(keys.buffer_size_cached)
        pipe.ttl(keys.buffer_size_cached)
        values, cached, ttl = pipe.execute()
    counts = [int(v or 0) for v in values]
    lanes = len(keys.lanes)
    return {"exact": sum(counts), "ingest": sum(counts[:lanes]), "buffers": counts[lanes:],
            "cached": int(cached) if cached is not None else None,
            "cached_ttl_seconds": ttl if cached is not None else None}


async def backlog_gauges(backlog: Backlog, depths: Callable[[], dict[str, int]] | None = None,
                         every: float = 1.0) -> None:
    """Refresh the backlog, the lag and the channel depths (gauges, and the cached
    buffer size in Redis)."""
    while True:
        try:
            total = await backlog.exact()
            await backlog.lag()
            await backlog.redis.run(functools.partial(
                backlog.redis.client.set, backlog.keys.buffer_size_cached, total, ex=15))
        except Exception as e:  # Redis away, or full (OOM refuses the cached size's SET)
            if not transient(e):
                raise
            log.warning("backlog refresh failed: %s", e)
        for channel, depth in (depths() if depths else {}).items():
            metrics.CHANNEL_DEPTH.labels(channel).set(depth)
        await trio.sleep(every)
