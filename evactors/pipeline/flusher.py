"""Flusher: moves rows from the Redis buffer into ClickHouse, exactly once.

Per shard: record the planned range of the oldest buffer entries in Redis (one script
reads and records, so there is only ever one plan), insert each table's rows with an
``insert_deduplication_token`` derived from that range, and only then delete the entries
and the plan. A crash anywhere, or a second flusher, carries out the *same* recorded range
under the *same* token, which ClickHouse discards at insert time: rows are never lost
(deleted only after the insert) and never doubled (same token). An entry that cannot be
decoded goes to the dead-letter stream instead of stopping the shard.
A ClickHouse failure keeps the rows in Redis and retries that shard with backoff, while
the other shards go on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import msgspec
import trio

from evactors.core.blocks import decode_block
from evactors.core.messages import Notice
from evactors.ops import metrics
from evactors.pipeline.deadletters import DeadLetters
from evactors.store.clickhouse import ClickHouse
from evactors.store.keys import Keys
from evactors.store.redis_io import RedisIO, retrying
from evactors.store.scripts import PLAN, REMOVE_ENTRIES

log = logging.getLogger("evactors.flusher")


READ_ENTRIES = 256


class InsertFailed(Exception):
    """ClickHouse refused a chunk; its rows are still in Redis."""


@dataclass
class Backoff:
    failures: int = 0
    delay: float = 0.0
    until: float = 0.0


def _decode_chunk(entries: list[Any]) -> tuple[dict[str, list[Any]], list[tuple[Any, Any, Exception]]]:
    """The rows of a chunk's buffer entries, per table; and the entries that cannot be
    decoded (for the dead-letter stream), with why."""
    blocks: list[Any] = []
    bad: list[tuple[Any, Any, Exception]] = []
    for entry_id, fields in entries:
        try:
            blocks.append(decode_block(fields[b"d"]))
        except (msgspec.DecodeError, msgspec.ValidationError, KeyError) as e:
            bad.append((entry_id, fields, e))
    tables: dict[str, list[Any]] = {
        "events": [r for b in blocks for r in b.events],
        "sessions": [r for b in blocks for r in b.sessions],
        "profiles": [r for b in blocks for r in b.profiles],
        "events_bots": [r for b in blocks for r in b.bots],
    }
    return tables, bad


class Flusher:
    def __init__(self, redis: RedisIO, keys: Keys, clickhouse: ClickHouse, shards: int,
                 chunk_rows: int) -> None:
        self.redis = redis
        self.keys = keys
        self.clickhouse = clickhouse
        self.shards = shards
        self.chunk_rows = chunk_rows
        self.dead_letters = DeadLetters(redis, keys)
        self.backoff = {shard: Backoff() for shard in range(shards)}
        self.waiting_for_clickhouse = False

    async def _entries(self, shard: int) -> tuple[str | None, list[Any]]:
        """The recorded plan and its entries; a new plan over the oldest entries if none.
        One script reads and records, so two flushers can never plan differently."""
        plan_key, stream = self.keys.flush_plan(shard), self.keys.buffer(shard)
        raw: Any = await self.redis.script(PLAN, [plan_key, stream], [READ_ENTRIES, self.chunk_rows])
        if raw is None:
            return None, []
        plan = raw.decode()
        first, last = plan.split(" ")
        entries: Any = await self.redis.run(self.redis.client.xrange, stream, first, last)
        return plan, entries

    async def flush_shard(self, shard: int, notices: trio.MemorySendChannel[Notice] | None) -> int:
        """Move one chunk of a shard; returns the rows moved (0: nothing to do)."""
        plan, entries = await retrying(f"flush-{shard} read", self._entries, shard)
        if plan is None:
            return 0
        # Decoding a chunk (tens of ms of msgspec for a large one, which never lets go of the
        # GIL inside one call) runs in a worker thread: between its calls the event loop gets
        # the GIL back, so HTTP answers are not held up behind a flush.
        tables, bad = await trio.to_thread.run_sync(_decode_chunk, entries)
        for entry_id, fields, e in bad:
            await self.dead_letters.bury_entry("buffer", self.keys.buffer(shard),
                                               self.keys.buffer_count(shard),
                                               entry_id.decode(), fields, e, b"d")
            entries = [x for x in entries if x[0] != entry_id]
        token = f"{self.keys.prefix}:{shard}:{plan.replace(' ', ':')}"
        for table, rows in tables.items():
            if rows:
                await self._insert(table, rows, f"{token}:{table}")
        args: list[str | int] = [plan]
        for entry_id, fields in entries:
            args += [entry_id.decode(), int(fields[b"n"])]
        keys = [self.keys.buffer(shard), self.keys.buffer_count(shard), self.keys.flush_plan(shard)]
        await retrying(f"flush-{shard} delete", self.redis.script, REMOVE_ENTRIES, keys, args)
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
