"""The compact dedup window against a real Valkey: across buckets, across an actor's restart,
its end, its cost in Redis, and no false drop over many ids."""

from __future__ import annotations

import os
import uuid
from typing import Any

import pytest
from test_sessions import T0, Clock, _enricher, buffered, incoming, rows

from evactors.core.messages import Enriched
from evactors.pipeline.sessions import SessionShard
from evactors.store.dedup import ShardDedup, fingerprint
from evactors.store.keys import Keys
from evactors.store.redis_io import RedisIO

HOUR = 3600


@pytest.fixture
def redis(valkey: Any) -> RedisIO:
    return RedisIO(f"unix://{valkey.unix_socket_path}", 5)


def new_shard(redis: RedisIO, clock: Clock, window: int = 4 * HOUR, bucket: int = HOUR) -> SessionShard:
    shard = SessionShard(0, redis, Keys("t"), timeout_s=1800, dedup_s=window, clock=clock, dedup_bucket_s=bucket)
    shard.enricher = _enricher()  # type: ignore[attr-defined]
    return shard


async def send(shard: SessionShard, ids: list[str], at: int = T0) -> int:
    """How many of ``ids`` the shard kept (committed rows of this call)."""
    before = len(rows(buffered(shard)))
    events = [incoming("track", at + i, device=f"d{i % 5}", message_id=m) for i, m in enumerate(ids)]
    await shard.process([Enriched(shard.enricher.enrich(e), e, 0) for e in events])  # type: ignore[attr-defined]
    return len(rows(buffered(shard))) - before


async def test_duplicates_are_dropped_across_buckets_and_restarts_until_the_window_ends(redis: RedisIO) -> None:
    clock = Clock()
    shard = new_shard(redis, clock)
    first = [f"a{i}" for i in range(50)]
    assert await send(shard, first) == 50
    clock.now += 1.5 * HOUR  # a later bucket
    second = [f"b{i}" for i in range(50)]
    assert await send(shard, first[:10] + second) == 50  # the old ids: seen in an older bucket
    restarted = new_shard(redis, clock)  # a new actor: the window comes back from Redis
    assert await send(restarted, first + second + ["c"]) == 1
    assert restarted.dedup.memory_bytes() >= 100 * 8
    clock.now += 2.4 * HOUR  # 3.9 h after the first ids: within the window
    assert await send(restarted, first[:5]) == 0
    clock.now += 1 * HOUR  # past window + bucket for the first ids; the second's still held
    assert await send(restarted, first[:5] + second[:5]) == 5
    again = new_shard(redis, clock)  # a restarted actor agrees
    assert await send(again, first[5:10] + second[5:10]) == 5


async def test_a_failed_commit_reads_its_bucket_again(redis: RedisIO) -> None:
    """What memory holds of the current bucket is reloaded after a failure: whatever Redis
    has (here: a fingerprint written by an attempt whose reply was lost)."""
    clock = Clock()
    shard = new_shard(redis, clock)
    assert await send(shard, ["x1"]) == 1
    key = shard.keys.dedup(0, shard.dedup.current)
    redis.client.append(key, fingerprint("p", "lost"))  # as if a commit had applied unseen
    assert await send(shard, ["lost"]) == 1  # memory does not know it: nothing failed
    redis.client.append(key, fingerprint("p", "lost2"))
    shard.forget()  # a failure: memory is read again
    assert await send(shard, ["lost2", "x1", "new"]) == 1


async def test_redis_holds_at_most_24_bytes_per_event_in_the_window(redis: RedisIO) -> None:
    """The real commit's dedup writes, on a real Valkey: used_memory and MEMORY USAGE."""
    clock = Clock()
    shard = new_shard(redis, clock, window=24 * HOUR, bucket=HOUR)
    await send(shard, ["warm"])  # the shard's other keys exist: what follows is the window's
    await shard.dedup.prepare(redis, shard._now_ms())
    client = redis.client
    n, unit = 200_000, 2000
    before = int(client.info("memory")["used_memory"])
    for _hour in range(4):  # four buckets
        for _start in range(0, n // 4, unit):
            prints = [fingerprint("p", str(uuid.uuid4())) for _ in range(unit)]
            await redis.execute([["MULTI"], *shard.dedup.commands(prints, shard._now_ms()), ["EXEC"]], check=True)
            shard.dedup.committed(prints)
        clock.now += HOUR
        await shard.dedup.prepare(redis, shard._now_ms())
    after = int(client.info("memory")["used_memory"])
    keys = list(client.scan_iter(match="t:*:dd:*"))
    usage = sum(int(client.memory_usage(k, samples=0)) for k in keys)
    assert len(keys) == 4  # four buckets (the warm-up shares the first)
    assert (after - before) / n <= 24
    assert usage / n <= 24
    assert all(client.ttl(k) > 19 * HOUR for k in keys)  # expiring with the window (fake clock: relative)


def test_no_false_drop_over_a_million_ids() -> None:
    dedup = ShardDedup(0, Keys("t"), 4 * HOUR, HOUR)
    dedup.loaded = True
    dedup.current = 0
    total = 0
    for bucket in range(4):
        dedup.current = bucket
        dedup._seal()
        for _ in range(50):  # units of 5,000 unique ids
            prints = [fingerprint("p", os.urandom(12).hex()) for _ in range(5000)]
            assert not any(dedup.seen(prints))
            dedup.committed(prints)
            total += len(prints)
            assert all(dedup.seen(prints[:100]))  # and each is found once committed
    assert total == 1_000_000
    runs = [len(r) for rs in dedup.runs.values() for r in rs]
    assert sum(runs) + len(dedup.fresh) == total
    assert max(len(rs) for rs in dedup.runs.values()) <= 5  # merged as they grow


async def test_markers_of_the_layout_before_still_deduplicate(redis: RedisIO) -> None:
    """An upgrade: the per-messageId markers written before become fingerprints, once."""
    client = redis.client
    for i in range(30):
        client.set(f"t:{{s0}}:d:p:old{i}", "1", ex=HOUR)
    client.set("t:{s1}:d:p:other", "1", ex=HOUR)  # another shard's: left to it
    shard = new_shard(redis, Clock())
    assert await send(shard, [f"old{i}" for i in range(30)] + ["new"]) == 1
    assert not list(client.scan_iter(match="t:{s0}:d:*")) and client.exists("t:{s1}:d:p:other")
    client.set("t:{s0}:d:p:later", "1")  # not looked for again
    assert await send(new_shard(redis, Clock()), ["old3", "later"]) == 1


async def test_a_big_bucket_is_read_in_pieces(redis: RedisIO, monkeypatch: pytest.MonkeyPatch) -> None:
    import evactors.store.dedup as dedup_module

    monkeypatch.setattr(dedup_module, "READ_CHUNK", 100_003)  # pieces that split fingerprints
    clock = Clock()
    dedup = ShardDedup(0, Keys("t"), 4 * HOUR, HOUR)
    prints = [fingerprint("p", f"id{i}") for i in range(140_000)]  # 1.1 MB: sorted off the event loop
    key = dedup.keys.dedup(0, dedup.bucket(int(clock.now * 1000)) - 1)
    redis.client.append(key, b"".join(prints))
    await dedup.prepare(redis, int(clock.now * 1000))
    assert all(dedup.seen(prints[::7]))
    assert not any(dedup.seen([fingerprint("p", f"other{i}") for i in range(1000)]))
