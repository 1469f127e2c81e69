"""The flusher against real Valkey and real chDB (in this process: one engine path for the
session, a database per test): two flushers on one shard, and a flusher that dies between
its insert and its delete, never double a row."""

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

from evactors.core.config import PipelineConfig
from evactors.core.messages import Enriched
from evactors.core.model import Context, Incoming
from evactors.enrichment.bots import BotDetector
from evactors.enrichment.enrich import Enricher
from evactors.enrichment.geoip import GeoIP
from evactors.pipeline.flusher import Flusher
from evactors.pipeline.sessions import SessionShard
from evactors.store.clickhouse import ClickHouse
from evactors.store.keys import Keys
from evactors.store.redis_io import RedisIO


@pytest.fixture(scope="session")
def chdb_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chdb")


@pytest.fixture
def clickhouse(chdb_path: Path) -> Iterator[ClickHouse]:
    ch = ClickHouse(f"chdb://{chdb_path}", f"t_{uuid.uuid4().hex[:10]}", 60)
    ch.open()
    yield ch
    ch.client.command(f"DROP DATABASE IF EXISTS {ch.database}")


async def fill_buffer(redis: RedisIO, keys: Keys, batches: int, per_batch: int, tag: str = "m") -> int:
    from evactors.enrichment.useragent import UserAgentParser

    enricher = Enricher(PipelineConfig(), GeoIP(None, 100), UserAgentParser(100), BotDetector(100))
    shard = SessionShard(0, redis, keys, 1800, 3600)
    for b in range(batches):
        items = []
        for i in range(per_batch):
            event = Incoming("p", "track", f"{tag}-{b}-{i}", f"d{i % 7}", "", "E", {}, {}, Context(),
                             1_760_000_000_000 + b * 1000 + i, 1_760_000_000_000, "", "", "", "")
            items.append(Enriched(enricher.enrich(event), event, 0))
        await shard.process(items)
    return batches * per_batch


def count(ch: ClickHouse) -> tuple[int, int]:
    rows = ch.client.query(f"SELECT count(), uniqExact(id) FROM {ch.database}.events").result_rows
    return int(rows[0][0]), int(rows[0][1])


async def test_two_flushers_on_one_shard_never_double(valkey: Any, clickhouse: ClickHouse) -> None:
    redis = RedisIO(f"unix://{valkey.unix_socket_path}", 5)
    keys = Keys("ff")
    total = await fill_buffer(redis, keys, batches=30, per_batch=50)
    first = Flusher(redis, keys, clickhouse, shards=1, chunk_rows=120)
    second = Flusher(redis, keys, clickhouse, shards=1, chunk_rows=120)
    async with trio.open_nursery() as nursery:
        for flusher in (first, second, first, second):
            nursery.start_soon(flusher.flush_all, None)
    assert count(clickhouse) == (total, total)
    assert redis.client.xlen(keys.buffer(0)) == 0 and int(redis.client.get(keys.buffer_count(0))) == 0


async def test_a_flusher_dying_after_its_insert_is_finished_by_another(valkey: Any,
                                                                      clickhouse: ClickHouse) -> None:
    redis = RedisIO(f"unix://{valkey.unix_socket_path}", 5)
    keys = Keys("fd")
    total = await fill_buffer(redis, keys, batches=10, per_batch=40)
    dying = Flusher(redis, keys, clickhouse, shards=1, chunk_rows=100)
    plan, entries = await dying._entries(0)  # it records its plan …
    assert plan is not None
    from evactors.core.blocks import decode_block

    rows = [r for _id, fields in entries for r in decode_block(fields[b"d"]).events]
    await dying._insert("events", rows, f"{keys.prefix}:0:{plan.replace(' ', ':')}:events")
    inserted = count(clickhouse)[0]  # … inserts, and dies before deleting the range
    assert 0 < inserted < total
    # more arrives meanwhile; the next flusher must carry out the recorded plan, not a new one
    total += await fill_buffer(redis, keys, batches=2, per_batch=40, tag="late")
    successor = Flusher(redis, keys, clickhouse, shards=1, chunk_rows=100)
    await successor.flush_all(None)
    assert count(clickhouse) == (total, total)
    # the pre-aggregates were fed by the repeated insert too, and deduplicated with it
    daily = clickhouse.client.query(f"SELECT sum(events) FROM {clickhouse.database}.daily_events")
    assert int(daily.result_rows[0][0]) == total


async def test_a_late_flusher_never_drops_the_next_plan(valkey: Any, clickhouse: ClickHouse) -> None:
    """B adopts plan P and reads its rows; A carries P out, records P2 over newer rows and
    inserts them; B then finishes P. B must not drop P2 (it is not the plan B carried out),
    or a third plan would cover P2's rows again under another token."""
    keys = Keys("fr")
    url = f"unix://{valkey.unix_socket_path}"
    b_read, a_ahead = trio.Event(), trio.Event()

    class PausingRedis(RedisIO):
        paused = False

        async def run(self, fn: Any, *args: Any) -> Any:
            result = await super().run(fn, *args)
            if not self.paused and getattr(fn, "__name__", "") == "xrange":
                self.paused = True  # B holds P's rows: let A get ahead
                b_read.set()
                await a_ahead.wait()
            return result

    redis_a, redis_b = RedisIO(url, 5), PausingRedis(url, 5)
    total = await fill_buffer(redis_a, keys, batches=2, per_batch=30, tag="first")
    a = Flusher(redis_a, keys, clickhouse, shards=1, chunk_rows=1000)
    b = Flusher(redis_b, keys, clickhouse, shards=1, chunk_rows=1000)
    from evactors.core.blocks import decode_block

    async def run_a() -> None:
        nonlocal total
        await b_read.wait()
        assert await a.flush_shard(0, None) == total  # A carries out P
        total += await fill_buffer(redis_a, keys, batches=2, per_batch=30, tag="second")
        plan2, entries2 = await a._entries(0)  # P2 …
        assert plan2 is not None
        rows = [r for _i, f in entries2 for r in decode_block(f[b"d"]).events]
        await a._insert("events", rows, f"{keys.prefix}:0:{plan2.replace(' ', ':')}:events")
        a_ahead.set()  # … inserted, not yet finished

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_a)
        nursery.start_soon(b.flush_shard, 0, None)  # B finishes P late
    assert redis_a.client.get(keys.flush_plan(0)) is not None  # P2 survived B's finish
    await a.flush_all(None)  # A (or anyone) carries out P2: same token, no double
    assert count(clickhouse) == (total, total)
    assert redis_a.client.get(keys.flush_plan(0)) is None and redis_a.client.xlen(keys.buffer(0)) == 0


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
