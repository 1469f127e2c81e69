"""Shard leases with fencing, against a real Valkey: one owner at a time, another instance
only after the lease expired, the same instance at once, and a stale owner's commit refused
with nothing of it written — through both Redis clients. And the session actor over them:
events reaching an instance that does not hold their shard go through the shard's inbox to
its owner, and a killed owner's shard is taken over, its sessions continued."""

from __future__ import annotations

import time
from typing import Any

import pytest
import trio
from unit.test_sessions import T0, Clock, _enricher, buffered, feed, incoming, rows

from evactors.core.blocks import decode_block
from evactors.core.messages import Enriched, Receipt, ShardBatch
from evactors.core.units import decode_unit
from evactors.pipeline.sessions import SessionShard, _fenced, session_actor
from evactors.store import leases
from evactors.store.inbox import Inbox
from evactors.store.keys import Keys
from evactors.store.leases import LeaseLost, ShardLeases
from evactors.store.redis_io import RedisIO
from evactors.store.resp import FenceMoved

KEYS = Keys("t")


def redis_of(valkey: Any, native: bool = True) -> RedisIO:
    redis = RedisIO(f"unix://{valkey.unix_socket_path}", 5)
    if not native:
        redis.native = None  # redis-py in a worker thread, as for rediss://
    return redis


async def take(held: ShardLeases) -> None:
    """Take shard 0 as its actor does: now, or once it is free."""
    while not await held.try_acquire(0):
        await trio.sleep(0.05)


def shard_under(redis: RedisIO, held: ShardLeases) -> SessionShard:
    s = SessionShard(0, redis, KEYS, timeout_s=1800, dedup_s=3600, clock=Clock(), lease=held.leases[0])
    s.enricher = _enricher()  # type: ignore[attr-defined]
    return s


async def test_another_instance_waits_for_the_lease_and_then_fences_the_old_owner(valkey: Any) -> None:
    redis = redis_of(valkey)
    first = ShardLeases(redis, KEYS, [0], "host-a", lease_seconds=2)
    await take(first)
    acquired = trio.current_time()
    old = shard_under(redis, first)
    await feed(old, incoming("track", T0, name="Before"))
    second = ShardLeases(redis, KEYS, [0], "host-b", lease_seconds=2)
    await take(second)  # waits: host-a's lease runs until it expires (not renewed)
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
    await take(before)
    orphan = shard_under(redis, before)
    await feed(orphan, incoming("track", T0, name="One"))
    restarted = ShardLeases(redis, KEYS, [0], "host-a", lease_seconds=30)
    with trio.fail_after(1):  # not the 30 s of the lease: the data dir's lock proves the earlier gone
        await take(restarted)
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
    await take(held)
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
    """A refused fence makes the keeper look at once: the lease lapsed and is taken again,
    and the retry runs under the new token."""
    redis = redis_of(valkey)
    async with leases.hold(redis, KEYS, [0], "host-a", lease_seconds=0.9) as held:
        await take(held)
        shard = shard_under(redis, held)
        await feed(shard, incoming("track", T0, name="A"))
        redis.client.delete(KEYS.lease(0))
        redis.client.incr(KEYS.fence(0))  # as if Redis lost it, then someone came and went
        event = incoming("track", T0 + 1, name="B")
        unit = [Enriched(shard.enricher.enrich(event), event, 0)]  # type: ignore[attr-defined]
        with trio.fail_after(5):
            await _fenced(held, "test", shard.process, unit)
    assert [e.name for e in rows(buffered(shard))] == ["A", "B"]
    assert redis.client.get(KEYS.lease(0)) is None  # let go at the end


class Instance:
    """A shard's session actor as one instance runs it: its own channel in, its receipts out,
    its leases (``host``), on the shared Valkey."""

    def __init__(self, host: str, redis: RedisIO, lease_seconds: float) -> None:
        self.host, self.redis, self.lease_seconds = host, redis, lease_seconds
        self.to_shard_tx, self.to_shard_rx = trio.open_memory_channel[ShardBatch](8)
        self.receipts_tx, self.receipts_rx = trio.open_memory_channel[list[Receipt]](100)
        self.scope = trio.CancelScope()
        self.held: ShardLeases | None = None

    async def run(self) -> None:
        notices_tx, _notices_rx = trio.open_memory_channel[Any](100)
        replayed = trio.Event()
        replayed.set()
        with self.scope:
            async with leases.hold(self.redis, KEYS, [0], self.host, self.lease_seconds) as self.held:
                shard = SessionShard(0, self.redis, KEYS, timeout_s=1800, dedup_s=3600, lease=self.held.leases[0])
                await session_actor(shard, self.to_shard_rx, self.receipts_tx, notices_tx, 10.0, replayed,
                                    leases=self.held, inbox=Inbox(self.redis, KEYS))

    async def holding(self) -> None:
        """Until this instance holds the shard."""
        with trio.fail_after(5):
            while self.held is None or not self.held.leases[0].held:
                await trio.sleep(0.01)

    async def send(self, entry: str, *events: Any) -> Receipt:
        enricher = _enricher()
        receipt = Receipt(entry, len(events), 1)
        await self.to_shard_tx.send(ShardBatch([Enriched(enricher.enrich(e), e, 0) for e in events], [receipt]))
        return receipt

    async def done(self, entry: str) -> None:
        with trio.fail_after(10):
            while True:
                finished = await self.receipts_rx.receive()
                if entry in [r.entry_id for r in finished]:
                    return


def committed(redis: RedisIO) -> list[Any]:
    return [e for b in (decode_block(f[b"d"]) for _i, f in redis.client.xrange(KEYS.buffer(0))) for e in b.events]


async def test_any_instance_takes_the_events_of_a_shard_another_holds_and_a_killed_owner_is_taken_over(
        valkey: Any) -> None:
    redis = redis_of(valkey)
    a, b = Instance("host-a", redis, 1.0), Instance("host-b", redis, 1.0)
    now = int(time.time() * 1000)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.run)
        await a.holding()
        nursery.start_soon(b.run)
        # b does not hold the shard: what reaches it goes to the inbox, and a takes it in
        await b.send("b-1", incoming("page", now, device="v1", properties={"path": "/one"}))
        await b.done("b-1")  # b's part is done once it is in the inbox
        await a.send("a-1", incoming("track", now + 1000, device="v1", name="Click"))
        await a.done("a-1")
        with trio.fail_after(5):
            while redis.client.xlen(KEYS.inbox(0)) or "Click" not in [e.name for e in committed(redis)]:
                await trio.sleep(0.05)
        first = {e.name: e.session_id for e in committed(redis)}
        # a dies without a word (kill -9: its lease stays until it expires); b takes the shard
        a.scope.cancel()
        assert a.held is not None
        redis.client.set(KEYS.lease(0), f"{a.held.owner}", px=1000)
        killed = trio.current_time()
        await b.send("b-2", incoming("track", now + 2000, device="v1", name="After"))
        await b.done("b-2")
        with trio.fail_after(10):
            while "After" not in [e.name for e in committed(redis)]:
                await trio.sleep(0.05)
        takeover = trio.current_time() - killed
        assert b.held is not None and b.held.leases[0].held
        assert takeover < 1.0 + b.held.renew_every + 1.0
        b.scope.cancel()
    rows = committed(redis)
    names = [e.name for e in rows]
    assert sorted(names) == ["After", "Click"]  # the page view is still held (its duration)
    after = next(e for e in rows if e.name == "After")
    assert after.session_id == first["Click"]  # the session continued from its committed state
    assert after.path == "/one"
    assert redis.client.xlen(KEYS.inbox(0)) == 0
    assert redis.client.get(KEYS.lease(0)) is None  # b left gracefully: let go


async def test_an_owner_that_loses_its_lease_forwards_the_batch_in_hand(valkey: Any) -> None:
    redis = redis_of(valkey)
    a = Instance("host-a", redis, 30)
    now = int(time.time() * 1000)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.run)
        await a.holding()
        redis.client.set(KEYS.lease(0), "host-z/other")  # another instance took the shard
        redis.client.incr(KEYS.fence(0))
        await a.send("a-1", incoming("track", now, device="v1", name="InHand"))
        await a.done("a-1")  # refused by the fence, then left for the new owner
        assert a.held is not None and not a.held.leases[0].held
        (entry,) = redis.client.xrange(KEYS.inbox(0))
        assert [e.row.name for e in decode_unit(entry[1][b"u"])[2]] == ["InHand"]
        assert committed(redis) == []
        a.scope.cancel()


async def test_a_joining_instance_is_handed_the_shards_it_is_preferred_for(valkey: Any) -> None:
    """host-h is preferred for shard 0 over host-a (rendezvous hashing): when it joins, host-a
    hands the shard over between two units and host-h continues its sessions; when host-h
    leaves gracefully, host-a takes the shard back at once."""
    redis = redis_of(valkey)
    a, h = Instance("host-a", redis, 1.0), Instance("host-h", redis, 1.0)
    now = int(time.time() * 1000)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.run)
        await a.send("a-1", incoming("page", now, device="v1", properties={"path": "/one"}))
        await a.done("a-1")
        assert a.held is not None and a.held.leases[0].held
        nursery.start_soon(h.run)
        await h.holding()
        assert not a.held.leases[0].held and a.held.members == ["host-a", "host-h"]
        await a.send("a-2", incoming("track", now + 1000, device="v1", name="Moved"))  # a forwards it
        await a.done("a-2")
        with trio.fail_after(5):
            while "Moved" not in [e.name for e in committed(redis)]:
                await trio.sleep(0.05)
        h.scope.cancel()  # a graceful leave: its lease and membership go at once
        with trio.fail_after(3):
            while not a.held.leases[0].held:
                await trio.sleep(0.02)
        await a.send("a-3", incoming("track", now + 2000, device="v1", name="Back"))
        await a.done("a-3")
        a.scope.cancel()
    rows = {e.name: e for e in committed(redis)}
    assert rows["Moved"].session_id == rows["Back"].session_id and rows["Moved"].path == "/one"
    assert redis.client.xlen(KEYS.inbox(0)) == 0
