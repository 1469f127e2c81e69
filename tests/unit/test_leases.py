"""Shard leases with fencing, against a real Valkey: one owner at a time, another instance
only after the lease expired, the same instance at once, and a stale owner's commit refused
with nothing of it written — through both Redis clients."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from unit.test_sessions import T0, Clock, _enricher, buffered, feed, incoming, rows

from evactors.core.messages import Enriched
from evactors.pipeline.sessions import SessionShard
from evactors.store import leases
from evactors.store.keys import Keys
from evactors.store.leases import LeaseLost, ShardLeases
from evactors.store.redis_io import RedisIO, retrying
from evactors.store.resp import FenceMoved

KEYS = Keys("t")


def redis_of(valkey: Any, native: bool = True) -> RedisIO:
    redis = RedisIO(f"unix://{valkey.unix_socket_path}", 5)
    if not native:
        redis.native = None  # redis-py in a worker thread, as for rediss://
    return redis


def shard_under(redis: RedisIO, held: ShardLeases) -> SessionShard:
    s = SessionShard(0, redis, KEYS, timeout_s=1800, dedup_s=3600, clock=Clock(), lease=held.leases[0])
    s.enricher = _enricher()  # type: ignore[attr-defined]
    return s


async def test_another_instance_waits_for_the_lease_and_then_fences_the_old_owner(valkey: Any) -> None:
    redis = redis_of(valkey)
    first = ShardLeases(redis, KEYS, [0], "host-a", lease_seconds=2)
    await first.acquire_all()
    acquired = trio.current_time()
    old = shard_under(redis, first)
    await feed(old, incoming("track", T0, name="Before"))
    second = ShardLeases(redis, KEYS, [0], "host-b", lease_seconds=2)
    await second.acquire_all()  # waits: host-a's lease runs until it expires (not renewed)
    assert 1.95 < trio.current_time() - acquired < 4
    assert second.leases[0].token == first.leases[0].token + 1  # type: ignore[operator]
    new = shard_under(redis, second)
    # the old owner does not know yet (a paused process): its commit is refused, nothing lands
    with pytest.raises(FenceMoved):
        await feed(old, incoming("track", T0 + 1000, name="Stale"))
    blocks = await feed(new, incoming("track", T0 + 2000, name="After"))
    assert [e.name for e in rows(blocks)] == ["Before", "After"]
    # its next renewal tells it: it stops for good, and says why
    await first.renew()
    assert first.leases[0].lost
    with pytest.raises(LeaseLost):
        await old.process([])
    assert [e.name for e in rows(buffered(new))] == ["Before", "After"]


async def test_the_same_instance_takes_its_own_lease_at_once(valkey: Any) -> None:
    redis = redis_of(valkey)
    before = ShardLeases(redis, KEYS, [0], "host-a", lease_seconds=30)
    await before.acquire_all()
    orphan = shard_under(redis, before)
    await feed(orphan, incoming("track", T0, name="One"))
    restarted = ShardLeases(redis, KEYS, [0], "host-a", lease_seconds=30)
    with trio.fail_after(1):  # not the 30 s of the lease: the data dir's lock proves the earlier gone
        await restarted.acquire_all()
    with pytest.raises(FenceMoved):  # the orphaned worker of the earlier run writes nothing
        await feed(orphan, incoming("track", T0 + 1, name="Orphan"))
    await feed(shard_under(redis, restarted), incoming("track", T0 + 2, name="Two"))
    assert [e.name for e in rows(buffered(orphan))] == ["One", "Two"]
    # and renewing does not steal back: the orphan's keeper finds it lost
    await before.renew()
    assert before.leases[0].lost and not restarted.leases[0].lost


async def test_a_lapsed_lease_is_taken_again_and_memory_read_again(valkey: Any) -> None:
    redis = redis_of(valkey)
    held = ShardLeases(redis, KEYS, [0], "host-a", lease_seconds=30)
    await held.acquire_all()
    shard = shard_under(redis, held)
    await feed(shard, incoming("page", T0, properties={"path": "/a"}))
    token = held.leases[0].token
    redis.client.delete(KEYS.lease(0))  # lapsed (a pause longer than the lease), no one took it
    await held.renew()
    assert held.leases[0].token == token + 1 and not held.leases[0].lost  # type: ignore[operator]
    blocks = await feed(shard, incoming("track", T0 + 1000, name="Next"))
    assert shard.token == held.leases[0].token
    later = [e for e in rows(blocks) if e.name == "Next"]
    assert later and later[0].path == "/a"  # the session continued from Redis's state


@pytest.mark.parametrize("native", [True, False], ids=["trio-native", "redis-py"])
async def test_a_moved_fence_refuses_the_whole_transaction(valkey: Any, native: bool) -> None:
    redis = redis_of(valkey, native)
    fence = KEYS.fence(0)
    redis.client.set(fence, 7)
    transaction = [["MULTI"], ["SET", "t:x", "1"], ["INCR", "t:n"], ["EXEC"]]
    replies = await redis.execute(transaction, fence=(fence, b"7"))
    assert replies[-1][0] in (b"OK", True) and replies[-1][1] == 1  # (redis-py: SET → True)
    redis.client.set(fence, 8)
    with pytest.raises(FenceMoved):
        await redis.execute([["MULTI"], ["SET", "t:x", "2"], ["INCR", "t:n"], ["EXEC"]], fence=(fence, b"7"))
    assert redis.client.get("t:x") == b"1" and redis.client.get("t:n") == b"1"
    # the connection is left clean: a plain pipeline after it runs
    assert await redis.execute([["GET", "t:x"]]) == [b"1"]


async def test_a_fence_moved_under_a_retry_is_waited_out_by_its_owner(valkey: Any) -> None:
    """FenceMoved is transient: the owner's retry runs once its keeper took the lease again."""
    redis = redis_of(valkey)
    async with leases.hold(redis, KEYS, [0], "host-a", lease_seconds=0.9) as held:
        shard = shard_under(redis, held)
        await feed(shard, incoming("track", T0, name="A"))
        redis.client.delete(KEYS.lease(0))
        redis.client.incr(KEYS.fence(0))  # as if Redis lost it, then someone came and went
        event = incoming("track", T0 + 1, name="B")
        unit = [Enriched(shard.enricher.enrich(event), event, 0)]  # type: ignore[attr-defined]
        with trio.fail_after(5):
            await retrying("test", shard.process, unit)
    assert [e.name for e in rows(buffered(shard))] == ["A", "B"]
    assert redis.client.get(KEYS.lease(0)) is None  # let go at the end
