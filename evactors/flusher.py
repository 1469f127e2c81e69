"""Flusher: moves rows from the Redis buffer into ClickHouse, exactly once.

Per shard: read the oldest entries of the buffer stream, record the planned range in
Redis, insert each table's rows with an ``insert_deduplication_token`` derived from that
range, and only then delete the entries. A crash anywhere re-reads the *same* recorded
range and re-inserts it under the *same* token, which ClickHouse discards at insert time:
rows are never lost (deleted only after the insert) and never doubled (same token).
A ClickHouse failure keeps the rows in Redis and retries that shard with backoff, while
the other shards go on.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Any

import msgspec
import trio

from . import metrics
from .acker import REMOVE_ENTRIES
from .clickhouse import ClickHouse
from .messages import Notice
from .redis_io import Keys, RedisIO, retrying
from .sessions import decode_block

log = logging.getLogger("evactors.flusher")

READ_ENTRIES = 256


class InsertFailed(Exception):
    """ClickHouse refused a chunk; its rows are still in Redis."""


@dataclass
class Backoff:
    failures: int = 0
    delay: float = 0.0
    until: float = 0.0


class Plan(msgspec.Struct, array_like=True):
    first: str
    last: str


class Flusher:
    def __init__(self, redis: RedisIO, keys: Keys, clickhouse: ClickHouse, shards: int,
                 chunk_rows: int) -> None:
        self.redis = redis
        self.keys = keys
        self.clickhouse = clickhouse
        self.shards = shards
        self.chunk_rows = chunk_rows
        self.remove = redis.client.register_script(REMOVE_ENTRIES)
        self.backoff = {shard: Backoff() for shard in range(shards)}
        self.waiting_for_clickhouse = False

    async def _entries(self, shard: int) -> tuple[Plan | None, list[Any]]:
        """The recorded plan's entries, or a new plan over the oldest entries."""
        plan_key, stream = self.keys.flush_plan(shard), self.keys.buffer(shard)
        entries: Any
        raw: Any = await self.redis.run(self.redis.client.get, plan_key)
        if raw is not None:
            plan = msgspec.msgpack.decode(raw, type=Plan)
            entries = await self.redis.run(self.redis.client.xrange, stream, plan.first, plan.last)
            return plan, entries
        entries = await self.redis.run(
            functools.partial(self.redis.client.xrange, stream, "-", "+", count=READ_ENTRIES))
        if not entries:
            return None, []
        rows, cut = 0, len(entries)
        for index, (_id, fields) in enumerate(entries, 1):
            rows += int(fields[b"n"])
            if rows >= self.chunk_rows:
                cut = index
                break
        entries = entries[:cut]
        plan = Plan(entries[0][0].decode(), entries[-1][0].decode())
        # NX: if another flusher (another instance, or one whose lock lapsed) recorded a plan
        # first, that plan is the one to carry out — never two plans over the same entries.
        created = await self.redis.run(functools.partial(
            self.redis.client.set, plan_key, msgspec.msgpack.encode(plan), nx=True))
        if not created:
            return await self._entries(shard)
        return plan, entries

    async def flush_shard(self, shard: int, notices: trio.MemorySendChannel[Notice] | None) -> int:
        """Move one chunk of a shard; returns the rows moved (0: nothing to do)."""
        plan, entries = await retrying(f"flush-{shard} read", self._entries, shard)
        if plan is None:
            return 0
        if not entries:  # the plan's entries are gone: a previous run finished the delete
            await retrying(f"flush-{shard} plan", self.redis.run, self.redis.client.delete,
                           self.keys.flush_plan(shard))
            return 0
        blocks = [decode_block(fields[b"d"]) for _id, fields in entries]
        tables: dict[str, list[Any]] = {
            "events": [r for b in blocks for r in b.events],
            "sessions": [r for b in blocks for r in b.sessions],
            "profiles": [r for b in blocks for r in b.profiles],
            "events_bots": [r for b in blocks for r in b.bots],
        }
        token = f"{self.keys.prefix}:{shard}:{plan.first}:{plan.last}"
        for table, rows in tables.items():
            if rows:
                await self._insert(table, rows, f"{token}:{table}")
        args: list[str | int] = []
        for entry_id, fields in entries:
            args += [entry_id.decode(), int(fields[b"n"])]
        keys = [self.keys.buffer(shard), self.keys.buffer_count(shard), self.keys.flush_plan(shard)]
        await retrying(f"flush-{shard} delete", self.redis.run,
                       functools.partial(self.remove, keys=keys, args=args))
        if notices is not None and tables["events"]:
            try:
                notices.send_nowait(Notice("event:saved", tables["events"]))
            except trio.WouldBlock:
                metrics.PUBLISH_DROPPED.inc()
        return sum(len(rows) for rows in tables.values())

    async def _insert(self, table: str, rows: list[msgspec.Struct], token: str) -> None:
        started = time.perf_counter()
        try:
            await self.clickhouse.insert(table, rows, token)
        except Exception as e:  # any ClickHouse failure: the rows stay in Redis
            metrics.CLICKHOUSE_ERRORS.labels("insert").inc()
            raise InsertFailed(f"insert of {len(rows)} rows into {table} failed: "
                               f"{str(e).splitlines()[0][:300] if str(e) else type(e).__name__}") from e
        metrics.FLUSH_SECONDS.observe(time.perf_counter() - started)
        metrics.FLUSH_ROWS.observe(len(rows))
        metrics.ROWS_INSERTED.labels(table).inc(len(rows))

    async def flush_all(self, notices: trio.MemorySendChannel[Notice] | None) -> int:
        """Flush every shard that is not backing off, until each is empty (or holds only
        what arrived meanwhile). A failing shard backs off alone."""
        moved = 0
        if not await self.clickhouse.ensure_open():
            self.waiting_for_clickhouse = True
            return 0
        self.waiting_for_clickhouse = False
        for shard in range(self.shards):
            backoff = self.backoff[shard]
            if backoff.until > trio.current_time():
                continue
            try:
                while True:
                    n = await self.flush_shard(shard, notices)
                    moved += n
                    if n < self.chunk_rows:
                        break
            except InsertFailed as e:
                backoff.failures += 1
                backoff.delay = min(backoff.delay * 2, 30.0) if backoff.failures > 1 else 0.1
                backoff.until = trio.current_time() + backoff.delay
                log.warning("shard %d: %s (attempt %d); retrying in %.1fs", shard, e,
                            backoff.failures, backoff.delay)
                continue
            if backoff.failures:
                log.info("shard %d: insert succeeded after %d failures", shard, backoff.failures)
                self.backoff[shard] = Backoff()
        return moved

    @property
    def failing(self) -> bool:
        return self.waiting_for_clickhouse or any(b.failures for b in self.backoff.values())


async def flusher(flush: Flusher, interval: float, drained: trio.Event,
                  notices: trio.MemorySendChannel[Notice]) -> None:
    """Flush periodically; when the pipeline has drained, flush the rest and stop (a
    failing ClickHouse is retried until the drain deadline cancels this)."""
    while not drained.is_set():
        await flush.flush_all(notices)
        with trio.move_on_after(interval):
            await drained.wait()
    moved = await flush.flush_all(notices)
    while flush.failing:
        await trio.sleep(0.1)
        moved += await flush.flush_all(notices)
    log.info("final flush: %d rows", moved)
