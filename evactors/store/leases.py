"""Shard leases with fencing: who may write a session shard's state.

A shard's state is written by one owner at a time. The owner holds the shard's lease, a
Redis key naming it that expires after ``pipeline.lease_seconds`` unless renewed (every
third of that); each change of owner moves the shard's fence, a counter beside it, on by one.
Every commit of the shard is a transaction that runs only while the fence holds the token
its writer took (``RedisIO.execute(fence=…)``: WATCH, GET, then MULTI … EXEC), so an owner
that lost the shard — a session worker orphaned by its service, a process paused past its
lease, an instance cut off by a partition — can never write again: its commit is refused
and nothing of it lands. The lease only says who is alive; the fence is what keeps a stale
owner out, so no clock has to be trusted for correctness.

Shards spread over the live instances by themselves: each instance with the sessions role
says it is alive in ``evx:members`` (renewed with its leases), and every shard has one
preferred instance among the live ones (rendezvous hashing: the same answer everywhere, and
a join or a leave moves only the shards it must). An owner hands a shard it is not preferred
for to the preferred one (between two units: it lets go, the other takes it at its next look),
and a standby takes a free shard at once if it is preferred, else only once the shard has
been free for a whole lease (its preferred instance is not taking it).

Every instance that takes requests or holds shards also says it is alive in ``evx:instances``
(``announce``):
while there are several, answers wait for commits and owners read their inboxes for every
unit (``pipeline.answer``), which keeps a visitor's order across instances.

Owners are named ``INSTANCE/INCARNATION``. An instance (a data dir, whose lock proves any
earlier holder of that name dead or dying) takes its own earlier incarnations' leases at
once, when it starts; another instance's only once they expired. A lease lost while running
(expired, or taken) is taken again only if no one holds it: the new token makes the shard's
writer drop its memory and read the state again.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
import zlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from evactors.ops import metrics
from evactors.store import scripts
from evactors.store.keys import Keys
from evactors.store.redis_io import RedisIO, retrying

log = logging.getLogger("evactors.leases")


class LeaseLost(Exception):
    """The shard is held by another owner: this one must not write it any more."""


class Lease:
    """One shard's lease as its writer sees it: the token it holds, or none."""

    def __init__(self, shard: int, fence_key: str) -> None:
        self.shard = shard
        self.fence_key = fence_key
        self.token: int | None = None
        self.lost = False  # taken by another owner (it may be taken again once free)
        self.tried = False  # taken (or tried) by this incarnation already
        self.free_since: float | None = None  # seen free (not preferred here), since when

    def fence(self) -> tuple[str, bytes]:
        """The fence a commit runs under; ``LeaseLost`` unless the shard is held."""
        if self.token is None or self.lost:
            raise LeaseLost(f"shard {self.shard} is {'held by another owner' if self.lost else 'not held'}")
        return self.fence_key, b"%d" % self.token

    @property
    def held(self) -> bool:
        return self.token is not None and not self.lost

    def _set(self, token: int | None, lost: bool = False) -> None:
        self.token, self.lost = token, lost


class ShardLeases:
    """The leases of some shards, held by one owner (``hold``)."""

    def __init__(self, redis: RedisIO, keys: Keys, shards: Sequence[int], instance: str,
                 lease_seconds: float, take: bool = True) -> None:
        self.redis, self.keys = redis, keys
        self.take = take  # False: an instance without the sessions role holds no shard
        self.instance = instance
        self.owner = f"{instance}/{secrets.token_hex(6)}"
        self.ttl_ms = int(lease_seconds * 1000)
        self.lease_seconds = lease_seconds
        self.renew_every = lease_seconds / 3
        self.leases = {s: Lease(s, keys.fence(s)) for s in shards}
        self.members: list[str] = []  # the live instances that hold shards, as last read
        self.others = Others(lease_seconds)  # other live instances, of any role (``announce``)

    def preferred(self, shard: int) -> str:
        """The live instance this shard belongs with (this one, while none is known)."""
        if not self.members:
            return self.instance
        return max(self.members, key=lambda m: (zlib.crc32(f"{m}\x00{shard}".encode()), m))

    def hand_off(self, shard: int) -> bool:
        """Held here while another live instance is preferred for it: let it go."""
        return self.leases[shard].held and self.preferred(shard) != self.instance

    async def heartbeat(self) -> None:
        """Say this instance is alive (for a lease) and read who else is."""
        if not self.take:
            return
        now = int(time.time() * 1000)
        _added, _expired, members, live = await retrying("members", self.redis.execute, [
            ["ZADD", self.keys.members, now + self.ttl_ms, self.instance],
            ["ZREMRANGEBYSCORE", self.keys.members, "-inf", now],
            ["ZRANGE", self.keys.members, 0, -1],
            ["ZRANGEBYSCORE", self.keys.instances, now, "+inf"]], True)
        self.members = sorted(_names(members))
        self.others.seen(live, self.instance)

    async def _acquire(self, shard: int, takeover: str) -> tuple[bool, int]:
        """(taken, fence) or (False, ms left of the holder's lease)."""
        taken, value = await self.redis.script(
            scripts.ACQUIRE_LEASE, [self.keys.lease(shard), self.keys.fence(shard)],
            [self.owner, takeover, self.ttl_ms])
        return bool(taken), int(value)

    async def try_acquire(self, shard: int) -> bool:
        """Take the shard if it is free. Its first try by this incarnation also takes it from
        an earlier incarnation of this instance (never later: an orphan that lost it must not
        take it back from its successor)."""
        lease = self.leases[shard]
        if not self.take:
            return False
        if lease.tried and self.preferred(shard) != self.instance:
            # another live instance is preferred: take the shard only if it leaves it free
            (holder,) = await retrying("lease", self.redis.execute, [["GET", self.keys.lease(shard)]], True)
            if holder is not None:
                lease.free_since = None
                return False
            lease.free_since = lease.free_since or time.monotonic()
            if time.monotonic() - lease.free_since < self.lease_seconds:
                return False
        lease.free_since = None
        takeover = self.owner if lease.tried else f"{self.instance}/"
        lease.tried = True
        taken, value = await retrying("lease", self._acquire, shard, takeover)
        if taken:
            lease._set(value)
            metrics.LEASES_TAKEN.inc()
            log.info("session-%d: shard taken (fence %d)", shard, value)
        return taken

    async def renew(self) -> None:
        """Renew each lease; one that lapsed is taken again if free, lost if another's."""
        await self.heartbeat()
        for shard, lease in self.leases.items():
            if not lease.held:
                continue
            taken, value = await retrying("lease", self._acquire, shard, self.owner)
            if taken:
                if lease.token is not None and value != lease.token:
                    log.warning("session-%d: lease lapsed and taken again (fence %d)", shard, value)
                lease._set(value)
            else:
                log.error("session-%d: lease taken by another owner: this one stops writing it", shard)
                metrics.LEASES_LOST.inc()
                lease._set(None, lost=True)

    async def release(self, shard: int | None = None) -> None:
        """Let go of one shard, or of all and of the membership (a graceful stop): another
        instance may take them at once."""
        with trio.move_on_after(2):
            if shard is None and self.take:
                await self.redis.execute([["ZREM", self.keys.members, self.instance]])
            for s in self.leases if shard is None else [shard]:
                if self.leases[s].held:
                    self.leases[s]._set(None)
                    await self.redis.script(scripts.RELEASE_LEASE, [self.keys.lease(s)], [self.owner])


@asynccontextmanager
async def hold(redis: RedisIO, keys: Keys, shards: Sequence[int], instance: str,
               lease_seconds: float, take: bool = True) -> AsyncIterator[ShardLeases]:
    """The leases of ``shards``, for their actors to take (``try_acquire``), kept renewed in
    a task of our own and let go at the end."""
    leases = ShardLeases(redis, keys, shards, instance, lease_seconds, take)
    await leases.heartbeat()
    async with trio.open_nursery() as nursery:

        async def keep() -> None:  # by deadline: a slow renewal does not stretch the period
            due = trio.current_time()
            while True:
                due = max(due + leases.renew_every, trio.current_time())
                await trio.sleep_until(due)
                await leases.renew()

        nursery.start_soon(keep)
        try:
            yield leases
        finally:
            nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                try:
                    await leases.release()
                except Exception as e:  # they expire anyway
                    log.warning("leases not released: %s", e)


def _names(reply: list[Any]) -> list[str]:
    """Instance names, as a zset read gives them."""
    return [m.decode() if isinstance(m, bytes) else str(m) for m in reply]


class Others:
    """Whether other instances are live, as ``evx:instances`` last said: once seen, others
    count as live until reads have said "alone" for ``hold`` seconds — a read that fails (a
    Redis failover) changes nothing, and entries that expired in an outage have time to
    come back — so that ordered answers (``PipelineConfig.answers_committed``) never lapse
    while another instance may take requests."""

    def __init__(self, lease_seconds: float) -> None:
        self.hold = 2 * lease_seconds + 5  # a lease to say so again, and a retry's longest wait
        self.alone_since: float | None = -math.inf

    def seen(self, live: list[Any], instance: str) -> None:
        """``live``: the members of ``evx:instances`` alive now; ``instance``: this one."""
        others = sum(name != instance for name in _names(live))
        metrics.LIVE_INSTANCES.set(others + 1)
        if others:
            self.alone_since = None
        elif self.alone_since is None:
            self.alone_since = time.monotonic()

    @property
    def live(self) -> bool:
        return self.alone_since is None or time.monotonic() - self.alone_since < self.hold


async def announce_once(redis: RedisIO, keys: Keys, instance: str, ttl_ms: int) -> list[Any]:
    """Say this instance is alive for ``ttl_ms``; the instances alive now."""
    now = int(time.time() * 1000)
    _added, _expired, live = await redis.execute([
        ["ZADD", keys.instances, now + ttl_ms, instance],
        ["ZREMRANGEBYSCORE", keys.instances, "-inf", now],
        ["ZRANGEBYSCORE", keys.instances, now, "+inf"]], True)
    return list(live)


async def announce(redis: RedisIO, keys: Keys, instance: str, lease_seconds: float, others: Others) -> None:
    """Keep this instance in ``evx:instances`` (every third of a lease, by deadline), telling
    ``others`` how many are live; at a graceful stop (cancelled) leave it at once. A crash
    leaves it: the supervisor's restart says it is alive again."""
    due = trio.current_time()
    try:
        while True:
            others.seen(await retrying("instances", announce_once, redis, keys, instance,
                                       int(lease_seconds * 1000)), instance)
            due = max(due + lease_seconds / 3, trio.current_time())
            await trio.sleep_until(due)
    except trio.Cancelled:
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            try:
                await redis.execute([["ZREM", keys.instances, instance]])
            except Exception as e:  # it expires anyway
                log.warning("instance not withdrawn: %s", e)
        raise
