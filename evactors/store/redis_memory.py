"""Redis bounded by bytes: what keeps a full Redis from losing or doubling events.

- The embedded Valkey runs with ``maxmemory`` (``redis.maxmemory``, else a quarter of the
  machine's memory) and ``noeviction``: past it, writes are refused with ``OOM``, ingest
  answers 503 and the actors retry with backoff; nothing already stored goes away.
- An external Redis whose ``maxmemory-policy`` evicts is refused at start (exit 2) unless
  ``redis.allow_eviction``: an evicted dedup bucket lets SDK retries of its events through
  once the shard reads its window again, an evicted stream loses acknowledged ones.
- The watcher (``pipeline.memory_watch``) reads Redis's memory each second: ``used_memory``,
  the bytes of the backlog (the ingest stream and the buffers, as ``MEMORY USAGE`` samples
  them) and ``evicted_keys``, which must never grow (an error in the log and a metric).
  Past ``server.high_water_bytes`` of backlog, ingest answers 503 before Redis is full.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from evactors.core.config import ConfigError
from evactors.ops import metrics
from evactors.store.keys import Keys
from evactors.store.redis_io import RedisIO

log = logging.getLogger("evactors.redis_memory")

MIN_MAXMEMORY, MAX_DEFAULT_MAXMEMORY = 64 << 20, 8 << 30


def machine_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 4 << 30


def embedded_maxmemory(configured: int) -> int:
    """``redis.maxmemory``, or a quarter of the machine's memory within [64 MB, 8 GB]."""
    if configured:
        return configured
    return max(MIN_MAXMEMORY, min(MAX_DEFAULT_MAXMEMORY, machine_memory() // 4))


async def check_eviction(redis: RedisIO, allow: bool) -> None:
    """Refuse (ConfigError: exit 2) a Redis that evicts keys, unless allowed."""
    try:  # every master of a cluster: one that evicts is enough to lose events
        policies = [config_value(replies[0], "maxmemory-policy")
                    for replies in await redis.on_each_master([["CONFIG", "GET", "maxmemory-policy"]])]
    except Exception as e:  # CONFIG disabled (a managed Redis): say what we could not check
        log.warning("cannot read the Redis's maxmemory-policy (%s); make sure it is noeviction", e)
        return
    policy = next((p for p in policies if p and p != "noeviction"), "")
    if policy:
        if allow:
            log.error("the Redis evicts keys (maxmemory-policy %s): events may be lost or doubled "
                      "when it is full (redis.allow_eviction = true)", policy)
            return
        raise ConfigError("redis.allow_eviction", (
            f"the Redis at {redis.url} has maxmemory-policy {policy}: when full it evicts keys "
            "(dedup buckets: doubled events; streams: lost events). Set maxmemory-policy "
            "noeviction on it (CONFIG SET maxmemory-policy noeviction), or redis.allow_eviction "
            "= true to run anyway"))


def config_value(reply: Any, name: str) -> str:
    """A ``CONFIG GET name`` reply's value ("" if unset): flat [name, value] or a dict."""
    if isinstance(reply, Exception):
        raise reply
    pairs = reply if isinstance(reply, dict) else dict(zip(reply[::2], reply[1::2], strict=False))
    value = pairs.get(name, pairs.get(name.encode(), ""))
    return value.decode() if isinstance(value, bytes) else str(value)


class Memory:
    """The last reading of Redis's memory; ``full`` is what ingest checks."""

    def __init__(self, high_water_bytes: int) -> None:
        self.configured = high_water_bytes
        self.used = self.maxmemory = self.backlog_bytes = 0
        self.evicted: int | None = None
        self.full = False

    @property
    def high_water(self) -> int:
        """Backlog bytes past which ingest refuses: configured, else a third of maxmemory."""
        return self.configured or self.maxmemory // 3

    def update(self, used: int, maxmemory: int, backlog_bytes: int, evicted: int) -> None:
        self.used, self.maxmemory, self.backlog_bytes = used, maxmemory, backlog_bytes
        metrics.REDIS_USED_MEMORY.set(used)
        metrics.REDIS_MAXMEMORY.set(maxmemory)
        metrics.BACKLOG_BYTES.set(backlog_bytes)
        if self.evicted is not None and evicted > self.evicted:
            grown = evicted - self.evicted
            metrics.REDIS_EVICTED.inc(grown)
            log.error("Redis evicted %d key(s) (evicted_keys %d): dedup buckets, states or "
                      "events may be gone; set maxmemory-policy noeviction", grown, evicted)
        self.evicted = evicted
        was = self.full
        self.full = bool(self.high_water) and backlog_bytes > self.high_water
        if self.full != was:
            log.log(logging.WARNING if self.full else logging.INFO,
                    "backlog %s its high-water mark in bytes (%d of %d): ingest %s",
                    "over" if self.full else "back under", backlog_bytes, self.high_water,
                    "answers 503" if self.full else "accepts again")


async def read(redis: RedisIO, keys: Keys, shards: int) -> tuple[int, int, int, int]:
    """(used_memory, maxmemory, backlog bytes, evicted_keys): on a cluster, summed over the
    masters."""
    infos = await redis.on_each_master([["INFO", "memory"], ["INFO", "stats"]])
    usages = await redis.execute([["MEMORY", "USAGE", s] for s in keys.backlog_streams(shards)], check=True)
    fields = [_info(memory) | _info(stats) for memory, stats in infos]
    return (sum(int(f.get("used_memory", 0)) for f in fields), sum(int(f.get("maxmemory", 0)) for f in fields),
            sum(int(u or 0) for u in usages), sum(int(f.get("evicted_keys", 0)) for f in fields))


def _info(reply: Any) -> dict[str, str]:
    """An INFO reply as fields (the trio-native client gives the text)."""
    if isinstance(reply, Exception):
        raise reply
    if isinstance(reply, dict):
        return {k: str(v) for k, v in reply.items()}
    text = reply.decode() if isinstance(reply, bytes) else str(reply)
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line and not line.startswith("#"))
