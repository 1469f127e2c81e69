"""Redis's memory, watched: ``watch`` reads used_memory, the backlog's bytes and
evicted_keys each second (``store.redis_memory.Memory``: metrics, an error on evictions, the
high-water mark in bytes ingest checks); ``rewrite_aof`` rewrites the embedded Valkey's
append-only file now and then, so the raw client IPs of processed requests leave the disk."""

from __future__ import annotations

import logging

import trio

from evactors.store.keys import Keys
from evactors.store.redis_io import TRANSIENT, RedisIO
from evactors.store.redis_memory import Memory, read

log = logging.getLogger("evactors.redis_memory")


async def watch(memory: Memory, redis: RedisIO, keys: Keys, shards: int, every: float = 1.0) -> None:
    """The watcher actor."""
    failures = 0
    while True:
        try:
            memory.update(*await read(redis, keys, shards))
            failures = 0
        except Exception as e:  # away, or a Redis without MEMORY/INFO (a managed one): go on
            failures += 1
            level = logging.DEBUG if isinstance(e, TRANSIENT) or failures > 1 else logging.WARNING
            log.log(level, "redis memory reading failed: %s", e)
        await trio.sleep(every)


async def rewrite_aof(redis: RedisIO, every: float) -> None:
    """The embedded Valkey's AOF rewriter: every ``every`` seconds, if the file has grown
    since its last rewrite, rewrite it. A rewrite keeps only what is still in Redis, so
    the raw client IPs of processed requests (deleted from the ingest stream once their
    events are stored) leave the disk within about ``every`` seconds."""
    while True:
        await trio.sleep(every)
        try:
            info = await redis.run(redis.client.info, "persistence")
            if (int(info.get("aof_enabled", 0)) and not int(info.get("aof_rewrite_in_progress", 0))
                    and int(info.get("aof_current_size", 0)) > int(info.get("aof_base_size", 0))):
                await redis.run(redis.client.bgrewriteaof)
                log.debug("AOF rewrite started (%s bytes)", info.get("aof_current_size"))
        except TRANSIENT as e:
            log.warning("AOF rewrite not started: %s", e)
        except Exception as e:  # e.g. "Background append only file rewriting already in progress"
            log.info("AOF rewrite not started: %s", e)
