"""Cleanup and bookkeeping: the backlog figure ingest uses for backpressure, the cached
buffer size, and expiry of state nothing else expires."""

from __future__ import annotations

import functools
import logging

import trio

from . import metrics
from .redis_io import TRANSIENT, Keys, RedisIO

log = logging.getLogger("evactors.cleanup")


class Backlog:
    """Events durable in Redis and not yet in ClickHouse: the ingest stream plus the
    buffers. ``exact()`` reads the counters (kept by the same transactions that move the
    events); ``cached`` is the last value, what the hot path (ingest) reads."""

    def __init__(self, redis: RedisIO, keys: Keys, shards: int) -> None:
        self.redis = redis
        self.keys = keys
        self.shards = shards
        self.cached = 0

    async def exact(self) -> int:
        names = [self.keys.ingest_count] + [self.keys.buffer_count(s) for s in range(self.shards)]
        values = await self.redis.run(self.redis.client.mget, names)
        total = sum(int(v or 0) for v in values)
        self.cached = total
        metrics.BACKLOG.set(total)
        return total


async def cleanup(backlog: Backlog, every: float = 1.0) -> None:
    """Refresh the backlog figure (and its shared cached copy in Redis)."""
    while True:
        try:
            total = await backlog.exact()
            await backlog.redis.run(functools.partial(
                backlog.redis.client.set, backlog.keys.buffer_size_cached, total, ex=15))
        except TRANSIENT as e:
            log.warning("backlog refresh failed: %s", e)
        await trio.sleep(every)
