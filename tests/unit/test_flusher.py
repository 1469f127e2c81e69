"""The flusher against real Valkey and real chDB (in this process: one engine path for the
session, a database per test): one plan over all shards, inserted once per table; two
flushers, and a flusher that dies between its insert and its delete, never double a row."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from evactors.core.blocks import Block, decode_block, encode_block
from evactors.core.config import PipelineConfig
from evactors.core.model import Context, EventRow, Incoming, SessionRow
from evactors.enrichment.bots import BotDetector
from evactors.enrichment.enrich import Enricher
from evactors.enrichment.geoip import GeoIP
from evactors.enrichment.useragent import UserAgentParser
from evactors.ops import metrics
from evactors.pipeline.flusher import Flusher, Plan
from evactors.store.clickhouse import ClickHouse
from evactors.store.keys import Keys
from evactors.store.redis_io import RedisIO
from evactors.store.scripts import PLAN_INSERTED


@pytest.fixture(scope="session")
def chdb_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chdb")


@pytest.fixture
def clickhouse(chdb_path: Path) -> Iterator[ClickHouse]:
    ch = ClickHouse(f"chdb://{chdb_path}", f"t_{uuid.uuid4().hex[:10]}", 60)
    ch.open()
    yield ch
    ch.client.command(f"DROP DATABASE IF EXISTS {ch.database}")


_ENRICHER = Enricher(PipelineConfig(), GeoIP(None, 100), UserAgentParser(100), BotDetector(100))


async def fill_buffer(redis: RedisIO, keys: Keys, batches: int, per_batch: int, tag: str = "m",
                      shards: int = 1) -> int:
    """Buffer entries as the session actors commit them (a block of rows, its count), spread
    over ``shards``; each event row with a profile and a session row every 10 events."""
    for b in range(batches):
        events = []
        for i in range(per_batch):
            incoming = Incoming("p", "track", f"{tag}-{b}-{i}", f"d{i % 7}", f"u{i % 3}", "E", {"i": i}, {},
                                Context(), 1_760_000_000_000 + b * 1000 + i, 1_760_000_000_000, "", "", "", "")
            row = _ENRICHER.enrich(incoming)
            assert isinstance(row, EventRow)
            events.append(row)
        sessions = [SessionRow(f"s-{tag}-{b}-{i}", "p", f"d{i}", "", 1_760_000_000_000, 1_760_000_001_000, 1, 1, 1,
                               1, "/", "/", "", "", "", "", "", "", "", "", "", "", "", "", 1)
                    for i in range(0, per_batch, 10)]
        shard = b % shards
        await redis.execute([["XADD", keys.buffer(shard), "*", "n", len(events) + len(sessions),
                              "d", encode_block(Block(events, sessions, []))],
                             ["INCRBY", keys.buffer_count(shard), len(events) + len(sessions)]], check=True)
    return batches * per_batch


def count(ch: ClickHouse) -> tuple[int, int]:
    rows = ch.client.query(f"SELECT count(), uniqExact(id) FROM {ch.database}.events").result_rows
    return int(rows[0][0]), int(rows[0][1])


def sessions_count(ch: ClickHouse) -> int:
    return int(ch.client.query(f"SELECT count() FROM {ch.database}.sessions").result_rows[0][0])


def buffers_empty(redis: RedisIO, keys: Keys, shards: int) -> bool:
    return all(redis.client.xlen(keys.buffer(s)) == 0 and int(redis.client.get(keys.buffer_count(s)) or 0) == 0
               for s in range(shards)) and redis.client.get(keys.flush_plan_all) is None


def inserted_rows(table: str) -> float:
    return metrics.ROWS_INSERTED.labels(table)._value.get()  # type: ignore[no-any-return]


async def rows_of(flusher: Flusher, plan: Plan) -> dict[str, list[Any]]:
    per_shard = await flusher._read(plan)
    return {"events": [r for es in per_shard.values() for _i, f in es for r in decode_block(f[b"d"]).events],
            "sessions": [r for es in per_shard.values() for _i, f in es for r in decode_block(f[b"d"]).sessions]}


async def test_two_flushers_over_three_shards_never_double(valkey: Any, clickhouse: ClickHouse) -> None:
    redis = RedisIO(f"unix://{valkey.unix_socket_path}", 5)
    keys = Keys("ff")
    total = await fill_buffer(redis, keys, batches=30, per_batch=50, shards=3)
    first = Flusher(redis, keys, clickhouse, shards=3, chunk_rows=120)
    second = Flusher(redis, keys, clickhouse, shards=3, chunk_rows=120)
    async with trio.open_nursery() as nursery:
        for flusher in (first, second, first, second):
            nursery.start_soon(flusher.flush_all, None)
    assert count(clickhouse) == (total, total)
    assert sessions_count(clickhouse) == 30 * 5
    assert buffers_empty(redis, keys, 3)


async def test_one_insert_per_table_holds_every_shard(valkey: Any, clickhouse: ClickHouse) -> None:
    """The oldest entries of all shards in one plan, up to chunk_rows rows: one insert per table."""
    redis = RedisIO(f"unix://{valkey.unix_socket_path}", 5)
    keys = Keys("fo")
    total = await fill_buffer(redis, keys, batches=8, per_batch=50, shards=4)
    flusher = Flusher(redis, keys, clickhouse, shards=4, chunk_rows=100_000)
    plan = await flusher._plan()
    assert plan is not None and sorted(s for s, _f, _l in plan.ranges) == [0, 1, 2, 3]
    before = inserted_rows("events")
    assert await flusher.flush_once(None) == total + 8 * 5
    assert inserted_rows("events") - before == total
    parts = clickhouse.client.query(f"SELECT count() FROM system.parts WHERE database = '{clickhouse.database}' "
                                    "AND table = 'events' AND active").result_rows[0][0]
    assert parts == 1 and count(clickhouse) == (total, total) and buffers_empty(redis, keys, 4)


async def test_a_flusher_dying_after_its_insert_is_finished_by_another(valkey: Any,
                                                                      clickhouse: ClickHouse) -> None:
    redis = RedisIO(f"unix://{valkey.unix_socket_path}", 5)
    keys = Keys("fd")
    total = await fill_buffer(redis, keys, batches=10, per_batch=40, shards=2)
    dying = Flusher(redis, keys, clickhouse, shards=2, chunk_rows=100)
    plan = await dying._plan()  # it records its plan …
    assert plan is not None
    rows = await rows_of(dying, plan)
    await dying._insert("events", rows["events"], plan.token(keys.prefix, "events"))
    inserted = count(clickhouse)[0]  # … inserts, and dies before deleting the range
    assert 0 < inserted < total
    # more arrives meanwhile; the next flusher must carry out the recorded plan, not a new one
    total += await fill_buffer(redis, keys, batches=2, per_batch=40, tag="late", shards=2)
    successor = Flusher(redis, keys, clickhouse, shards=2, chunk_rows=100)
    await successor.flush_all(None)
    assert count(clickhouse) == (total, total)
    # the pre-aggregates were fed by the repeated insert too, and deduplicated with it
    daily = clickhouse.client.query(f"SELECT sum(events) FROM {clickhouse.database}.daily_events")
    assert int(daily.result_rows[0][0]) == total
    assert buffers_empty(redis, keys, 2)


async def test_a_crash_between_insert_and_delete_reinserts_nothing(valkey: Any, clickhouse: ClickHouse) -> None:
    """A flusher inserts every table, marks its plan inserted, deletes one shard's entries
    and dies: its successor only deletes the rest (nothing inserted again), then goes on."""
    redis = RedisIO(f"unix://{valkey.unix_socket_path}", 5)
    keys = Keys("fc")
    total = await fill_buffer(redis, keys, batches=9, per_batch=30, shards=3)
    dying = Flusher(redis, keys, clickhouse, shards=3, chunk_rows=100_000)
    plan = await dying._plan()
    assert plan is not None and len(plan.ranges) == 3
    per_shard = await dying._read(plan)
    rows = await rows_of(dying, plan)
    for table in ("events", "sessions"):
        await dying._insert(table, rows[table], plan.token(keys.prefix, table))
    assert await redis.script(PLAN_INSERTED, [keys.flush_plan_all], [plan.text]) == 1
    await dying._remove({0: per_shard[0]})  # … dies here
    assert count(clickhouse) == (total, total)
    late = await fill_buffer(redis, keys, batches=3, per_batch=30, tag="late", shards=3)
    before = inserted_rows("events"), inserted_rows("sessions")
    successor = Flusher(redis, keys, clickhouse, shards=3, chunk_rows=100_000)
    adopted = await successor._plan()
    assert adopted == Plan(plan.text, plan.ranges, inserted=True)
    await successor.flush_all(None)
    assert (inserted_rows("events") - before[0], inserted_rows("sessions") - before[1]) == (late, 3 * 3)
    assert count(clickhouse) == (total + late, total + late) and sessions_count(clickhouse) == 12 * 3
    assert buffers_empty(redis, keys, 3)


async def test_a_plan_left_by_an_earlier_version_is_finished_under_its_token(valkey: Any,
                                                                             clickhouse: ClickHouse) -> None:
    """Before the plan over all shards, each shard had its own (``first last``) and token
    ``prefix:shard:first:last:table``: a plan left by a crash is carried out first, as it was."""
    redis = RedisIO(f"unix://{valkey.unix_socket_path}", 5)
    keys = Keys("fl")
    total = await fill_buffer(redis, keys, batches=4, per_batch=20)
    first, last = [e[0].decode() for e in redis.client.xrange(keys.buffer(0), count=2)]
    redis.client.set(keys.flush_plan(0), f"{first} {last}")
    flusher = Flusher(redis, keys, clickhouse, shards=1, chunk_rows=1000)
    legacy = Plan.parse(f"0:{first}:{last}")
    rows = await rows_of(flusher, legacy)
    assert len(rows["events"]) == 40
    await flusher._insert("events", rows["events"], f"fl:0:{first}:{last}:events")  # the old flusher died here
    await flusher.flush_all(None)
    assert count(clickhouse) == (total, total) and sessions_count(clickhouse) == 4 * 2
    assert buffers_empty(redis, keys, 1) and redis.client.get(keys.flush_plan(0)) is None


async def test_a_late_flusher_never_drops_the_next_plan(valkey: Any, clickhouse: ClickHouse) -> None:
    """B adopts plan P and reads its rows; A carries P out, records P2 over newer rows and
    inserts them; B then finishes P. B must not drop P2 (it is not the plan B carried out),
    or a third plan would cover P2's rows again under another token."""
    keys = Keys("fr")
    url = f"unix://{valkey.unix_socket_path}"
    b_read, a_ahead = trio.Event(), trio.Event()

    class PausingRedis(RedisIO):
        paused = False

        async def execute(self, commands: Any, check: bool = False) -> list[Any]:
            result = await super().execute(commands, check)
            if not self.paused and any(c[0] == "XRANGE" for c in commands):
                self.paused = True  # B holds P's rows: let A get ahead
                b_read.set()
                await a_ahead.wait()
            return result

    redis_a, redis_b = RedisIO(url, 5), PausingRedis(url, 5)
    total = await fill_buffer(redis_a, keys, batches=2, per_batch=30, tag="first", shards=2)
    a = Flusher(redis_a, keys, clickhouse, shards=2, chunk_rows=1000)
    b = Flusher(redis_b, keys, clickhouse, shards=2, chunk_rows=1000)

    async def run_a() -> None:
        nonlocal total
        await b_read.wait()
        assert await a.flush_once(None) == total + 2 * 3  # A carries out P
        total += await fill_buffer(redis_a, keys, batches=2, per_batch=30, tag="second", shards=2)
        plan2 = await a._plan()  # P2 …
        assert plan2 is not None
        rows = await rows_of(a, plan2)
        await a._insert("events", rows["events"], plan2.token(keys.prefix, "events"))
        a_ahead.set()  # … inserted, not yet finished

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_a)
        nursery.start_soon(b.flush_once, None)  # B finishes P late
    assert redis_a.client.get(keys.flush_plan_all) is not None  # P2 survived B's finish
    await a.flush_all(None)  # A (or anyone) carries out P2: same token, no double
    assert count(clickhouse) == (total, total)
    assert buffers_empty(redis_a, keys, 2)


async def test_a_flush_is_due_when_big_or_old(valkey: Any, clickhouse: ClickHouse) -> None:
    redis = RedisIO(f"unix://{valkey.unix_socket_path}", 5)
    keys = Keys("fw")
    flusher = Flusher(redis, keys, clickhouse, shards=2, chunk_rows=1000, min_rows=100)
    assert not await flusher.due(1.0)  # nothing waits
    await fill_buffer(redis, keys, batches=1, per_batch=20)
    assert await flusher.due(1.0)  # rows, and no flush for longer than the interval
    flusher.last_flush = trio.current_time()
    assert not await flusher.due(1.0)  # a few rows, just flushed: they wait
    await fill_buffer(redis, keys, batches=2, per_batch=50, tag="more", shards=2)
    assert await flusher.due(1.0)  # 100 rows and more: at once


def _dirty_decay_ms(client: Any) -> int:
    stats = client.query("SELECT * FROM system.jemalloc_stats").result_rows[0][0]
    return int(stats.split("opt.dirty_decay_ms: ", 1)[1].split()[0])


def test_the_embedded_engine_returns_freed_memory_within_a_second(clickhouse: ClickHouse,
                                                                  tmp_path: Path) -> None:
    """chDB's jemalloc keeps freed pages 5 s by default (100-300 MB after an insert or a merge);
    the embedded engine starts with 1 s, without leaving the setting to child processes, and
    JE_MALLOC_CONF in the environment wins."""
    assert _dirty_decay_ms(clickhouse.client) == 1000
    assert "JE_MALLOC_CONF" not in os.environ
    script = ("import sys; from evactors.store.clickhouse import connect; "
              "stats = connect(sys.argv[1]).query('SELECT * FROM system.jemalloc_stats').result_rows[0][0]; "
              "print(stats.split('opt.dirty_decay_ms: ', 1)[1].split()[0])")
    out = subprocess.run([sys.executable, "-c", script, f"chdb://{tmp_path / 'ch'}"], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "JE_MALLOC_CONF": "dirty_decay_ms:2500"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "2500"
