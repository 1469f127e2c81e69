"""Flusher: moves rows from the Redis buffers into ClickHouse, exactly once, in big inserts.

ClickHouse pays per insert (a part per partition, each materialized view fired, merges
after): 149 µs/row at 350-row inserts, 20 at 20,000 (docs/benchmarks.md). So one flush is
one insert per table holding the rows of *every* shard, started once ``min_rows`` rows wait
or ``interval`` seconds after the last one (at low load a row waits about that long).

One plan over all shards, not a plan per shard inserted together: the token of an insert
must name exactly the rows it holds, whoever carries it out. Plans per shard are recorded
one by one (a shard's keys live in its own Redis Cluster slot), so a flusher that died
between two of them would leave a successor to combine the recorded ones with a *new* plan
for the rest: another set of rows, another token, and the rows inserted once already would
land twice. One plan is one key, recorded whole or not at all:

1. The oldest entries of each shard are looked at (ids and row counts only, ``HEADS``),
   and the plan — per shard the range ``first..last`` of entry ids, oldest first across
   shards up to ``chunk_rows`` rows — is recorded with ``PLAN``, which returns the plan
   already recorded if there is one: there is only ever one plan, however many flushers.
2. The entries are read *from the recorded plan's ranges*, after it was recorded. Entry ids
   only grow, so a range never gains an entry; a flusher that planned from a stale look
   reads only what is still there.
3. Each table's rows are inserted with ``insert_deduplication_token`` derived from the
   plan (a hash of its ranges): whoever repeats the plan repeats the token, and ClickHouse
   discards the repeated insert (a repeat can only hold fewer rows: entries are deleted,
   never added; the tables keep a deduplication window, and so do their views).
4. The plan is marked inserted (``PLAN_INSERTED``), its entries are deleted with their
   counts (``REMOVE_ENTRIES`` per shard), then the plan is dropped (``PLAN_DONE``) if it is
   still the recorded one. A crash anywhere leaves the plan recorded: a successor inserts
   again under the same token (discarded), or, once it is marked, only deletes. A plan is
   dropped only after its entries are gone, so no later plan can cover them.

An entry that cannot be decoded goes to the dead-letter stream instead of stopping the
flush. A ClickHouse failure keeps the plan and its rows in Redis and backs off (0.1 s
doubling to 30 s); the same plan is retried. All shards wait together then: a refused
insert is an outage (the same for every shard) far more often than a poison row, and a
poison row blocked its shard for good before too. The flusher's scripts run on a full
Redis (``allow-oom`` / read-only): flushing is what frees it.

Plans recorded per shard by earlier versions (``Keys.flush_plan``) are carried out first,
under their own tokens. Run one version at a time: an earlier version's flusher beside
this one would plan the same entries under another token.
"""

from __future__ import annotations

import heapq
import logging
import time
from dataclasses import dataclass, field
from hashlib import blake2b
from typing import Any

import msgspec
import trio

from evactors.core.blocks import decode_block
from evactors.core.messages import Notice
from evactors.ops import metrics
from evactors.pipeline.deadletters import DeadLetters
from evactors.store.clickhouse import ClickHouse
from evactors.store.keys import Keys
from evactors.store.redis_io import RedisIO, retrying, stream_entries
from evactors.store.scripts import HEADS, PLAN, PLAN_DONE, PLAN_INSERTED, REMOVE_ENTRIES

log = logging.getLogger("evactors.flusher")


READ_ENTRIES = 1024  # most entries of one shard in a plan
POLL_SECONDS = 0.1  # how often the buffers' row counts are read (is a flush due?)
INSERTED = "inserted "

Entry = tuple[bytes, dict[bytes, bytes]]


class InsertFailed(Exception):
    """ClickHouse refused an insert; its rows are still in Redis."""


@dataclass
class Backoff:
    failures: int = 0
    delay: float = 0.0
    until: float = 0.0


@dataclass(frozen=True)
class Plan:
    """What one flush inserts: per shard, a range of buffer entry ids (as recorded)."""

    text: str  # "shard:first:last …", the recorded value
    ranges: list[tuple[int, str, str]]
    inserted: bool = False  # its inserts are done; what is left is deleting its entries

    @classmethod
    def parse(cls, recorded: str) -> Plan:
        inserted = recorded.startswith(INSERTED)
        text = recorded.removeprefix(INSERTED)
        ranges = []
        for part in text.split(" "):
            shard, first, last = part.split(":")
            ranges.append((int(shard), first, last))
        return cls(text, ranges, inserted)

    def token(self, prefix: str, table: str) -> str:
        return f"{prefix}:{blake2b(self.text.encode(), digest_size=16).hexdigest()}:{table}"


def choose(heads: dict[int, list[tuple[str, int]]], chunk_rows: int) -> str | None:
    """A plan over the oldest entries of all shards (by entry id: the time each was
    committed), up to ``chunk_rows`` rows; None if every buffer is empty."""
    def at(entry_id: str) -> tuple[int, int]:
        ms, _, seq = entry_id.partition("-")
        return int(ms), int(seq or 0)

    queue = [(at(entries[0][0]), shard, 0) for shard, entries in heads.items() if entries]
    heapq.heapify(queue)
    taken: dict[int, int] = {}
    rows = 0
    while queue and rows < chunk_rows:
        _at, shard, i = heapq.heappop(queue)
        taken[shard] = i + 1
        rows += heads[shard][i][1]
        if i + 1 < len(heads[shard]):
            heapq.heappush(queue, (at(heads[shard][i + 1][0]), shard, i + 1))
    if not taken:
        return None
    return " ".join(f"{shard}:{heads[shard][0][0]}:{heads[shard][n - 1][0]}" for shard, n in sorted(taken.items()))


def _decode_chunk(entries: list[Entry]) -> tuple[dict[str, list[Any]], list[tuple[Entry, Exception]]]:
    """The rows of buffer entries, per table; and the entries that cannot be decoded (for the
    dead-letter stream), with why."""
    blocks: list[Any] = []
    bad: list[tuple[Entry, Exception]] = []
    for entry in entries:
        try:
            blocks.append(decode_block(entry[1][b"d"]))
        except (msgspec.DecodeError, msgspec.ValidationError, KeyError) as e:
            bad.append((entry, e))
    tables: dict[str, list[Any]] = {
        "events": [r for b in blocks for r in b.events],
        "sessions": [r for b in blocks for r in b.sessions],
        "profiles": [r for b in blocks for r in b.profiles],
        "events_bots": [r for b in blocks for r in b.bots],
    }
    return tables, bad


def _checked(replies: list[Any]) -> list[Any]:
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


@dataclass
class Flusher:
    redis: RedisIO
    keys: Keys
    clickhouse: ClickHouse
    shards: int
    chunk_rows: int
    min_rows: int = 10_000
    dead_letters: DeadLetters = field(init=False)
    backoff: Backoff = field(default_factory=Backoff)
    waiting_for_clickhouse: bool = False
    last_flush: float = float("-inf")
    adopted: bool = False  # the last plan was recorded by another flusher (or a crashed one)
    _legacy_done: bool = False

    def __post_init__(self) -> None:
        self.dead_letters = DeadLetters(self.redis, self.keys)

    async def waiting_rows(self) -> int:
        """Rows in the buffers of all shards (their counters), in one round trip."""
        replies = await self.redis.execute([["GET", self.keys.buffer_count(s)] for s in range(self.shards)],
                                           check=True)
        return sum(int(r) for r in replies if r is not None)

    async def due(self, interval: float) -> bool:
        """A flush is due: ``min_rows`` rows wait, or any row and ``interval`` has passed."""
        rows = await retrying("flush count", self.waiting_rows)
        return rows >= self.min_rows or (rows > 0 and trio.current_time() - self.last_flush >= interval)

    async def _plan(self) -> Plan | None:
        """The recorded plan, or a new one over the oldest entries of all shards."""
        calls = [([self.keys.buffer(s)], [READ_ENTRIES, self.chunk_rows]) for s in range(self.shards)]
        replies = _checked(await self.redis.scripts(HEADS, calls))
        heads = {s: [(flat[i].decode(), int(flat[i + 1])) for i in range(0, len(flat), 2)]
                 for s, flat in enumerate(replies)}
        text = choose(heads, self.chunk_rows)
        if text is None:  # nothing waits, but a plan may be left to finish
            recorded = await self.redis.execute([["GET", self.keys.flush_plan_all]], check=True)
            self.adopted = recorded[0] is not None
            return None if recorded[0] is None else Plan.parse(recorded[0].decode())
        recorded = (await self.redis.script(PLAN, [self.keys.flush_plan_all], [text])).decode()
        self.adopted = recorded != text  # another flusher's (or a crashed one's)
        return Plan.parse(recorded)

    async def _read(self, plan: Plan) -> dict[int, list[Entry]]:
        """The entries still in the plan's ranges, per shard, in one round trip."""
        replies = await self.redis.execute(
            [["XRANGE", self.keys.buffer(shard), first, last] for shard, first, last in plan.ranges], check=True)
        return {shard: stream_entries(reply) for (shard, _f, _l), reply in zip(plan.ranges, replies, strict=True)}

    async def flush_once(self, notices: trio.MemorySendChannel[Notice] | None) -> int:
        """Carry out one plan (the recorded one, or a new one); returns its rows (0: nothing
        waited). Raises ``InsertFailed`` with the plan left for a retry."""
        plan = await retrying("flush plan", self._plan)
        if plan is None:
            return 0
        per_shard = await retrying("flush read", self._read, plan)
        entries = [entry for shard_entries in per_shard.values() for entry in shard_entries]
        # Decoding (tens of ms of msgspec for a big plan, the GIL held within one call) runs
        # in a worker thread: between its calls the event loop gets the GIL back.
        tables, bad = await trio.to_thread.run_sync(_decode_chunk, entries)
        for (entry_id, fields), e in bad:
            shard = next(s for s, es in per_shard.items() if any(x[0] == entry_id for x in es))
            await self.dead_letters.bury_buffer_entry(shard, entry_id.decode(), fields, e)
            per_shard[shard] = [x for x in per_shard[shard] if x[0] != entry_id]
        if not plan.inserted:
            for table, rows in tables.items():
                if rows:
                    await self._insert(table, rows, plan.token(self.keys.prefix, table))
            await retrying("flush mark", self.redis.script, PLAN_INSERTED, [self.keys.flush_plan_all], [plan.text])
        await self._remove(per_shard)
        await retrying("flush done", self.redis.script, PLAN_DONE, [self.keys.flush_plan_all], [plan.text])
        if notices is not None and tables["events"] and not plan.inserted:
            try:
                notices.send_nowait(Notice("event:saved", tables["events"]))
            except trio.WouldBlock:
                metrics.PUBLISH_DROPPED.inc()
        return sum(len(rows) for rows in tables.values())

    async def _remove(self, per_shard: dict[int, list[Entry]], legacy_plan: str | None = None) -> None:
        """Delete entries and their counts, per shard (one script call each, one round trip)."""
        calls = []
        for shard, entries in per_shard.items():
            keys = [self.keys.buffer(shard), self.keys.buffer_count(shard)]
            if legacy_plan is not None:
                keys.append(self.keys.flush_plan(shard))
            args: list[str | int] = [legacy_plan or ""]
            for entry_id, fields in entries:
                args += [entry_id.decode(), int(fields[b"n"])]
            calls.append((keys, args))

        async def remove() -> None:
            _checked(await self.redis.scripts(REMOVE_ENTRIES, calls))

        if calls:
            await retrying("flush delete", remove)

    async def _finish_legacy_plans(self) -> None:
        """Plans an earlier version recorded per shard: carried out as it would have, under its
        token (``prefix:shard:first:last:table``), so a repeat of its insert is discarded."""
        recorded = await retrying("flush legacy", self.redis.execute,
                                  [["GET", self.keys.flush_plan(s)] for s in range(self.shards)], True)
        for shard, plan in enumerate(recorded):
            if plan is None:
                continue
            first, last = plan.decode().split(" ")
            (reply,) = await retrying("flush legacy", self.redis.execute,
                                      [["XRANGE", self.keys.buffer(shard), first, last]], True)
            entries = stream_entries(reply)
            tables, bad = await trio.to_thread.run_sync(_decode_chunk, entries)
            for (entry_id, fields), e in bad:
                await self.dead_letters.bury_buffer_entry(shard, entry_id.decode(), fields, e)
                entries = [x for x in entries if x[0] != entry_id]
            for table, rows in tables.items():
                if rows:
                    await self._insert(table, rows, f"{self.keys.prefix}:{shard}:{first}:{last}:{table}")
            await self._remove({shard: entries}, legacy_plan=plan.decode())
            log.info("shard %d: finished a flush plan left by an earlier version (%s)", shard, plan.decode())

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
        """Flush until the buffers are empty (or hold only what arrived meanwhile), unless
        backing off after a failure."""
        moved = 0
        if not await self.clickhouse.ensure_open():
            self.waiting_for_clickhouse = True
            return 0
        self.waiting_for_clickhouse = False
        if self.backoff.until > trio.current_time():
            return 0
        self.last_flush = trio.current_time()
        try:
            if not self._legacy_done:
                await self._finish_legacy_plans()
                self._legacy_done = True
            while True:
                n = await self.flush_once(notices)
                moved += n
                if n < self.chunk_rows and not self.adopted:
                    break
        except InsertFailed as e:
            b = self.backoff
            b.failures += 1
            b.delay = min(b.delay * 2, 30.0) if b.failures > 1 else 0.1
            b.until = trio.current_time() + b.delay
            log.warning("%s (attempt %d); retrying in %.1fs", e, b.failures, b.delay)
            return moved
        if self.backoff.failures:
            log.info("insert succeeded after %d failures", self.backoff.failures)
            self.backoff = Backoff()
        return moved

    @property
    def failing(self) -> bool:
        return self.waiting_for_clickhouse or self.backoff.failures > 0


async def flusher(flush: Flusher, interval: float, drained: trio.Event,
                  notices: trio.MemorySendChannel[Notice]) -> None:
    """Flush when it is due (enough rows, or ``interval`` since the last flush); when the
    pipeline has drained, flush the rest and stop (a failing ClickHouse is retried until the
    drain deadline cancels this)."""
    while not drained.is_set():
        if await flush.due(interval):
            await flush.flush_all(notices)
        with trio.move_on_after(min(POLL_SECONDS, interval)):
            await drained.wait()
    moved = await flush.flush_all(notices)
    while flush.failing:
        await trio.sleep(0.1)
        moved += await flush.flush_all(notices)
    log.info("final flush: %d rows", moved)
