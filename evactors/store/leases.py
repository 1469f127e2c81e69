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

Owners are named ``INSTANCE/INCARNATION``. An instance (a data dir, whose lock proves any
earlier holder of that name dead or dying) takes its own earlier incarnations' leases at
once, when it starts; another instance's only once they expired. A lease lost while running
(expired, or taken) is taken again only if no one holds it: the new token makes the shard's
writer drop its memory and read the state again.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

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
        self.renew_every = lease_seconds / 3
        self.leases = {s: Lease(s, keys.fence(s)) for s in shards}

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
        """Let go of one shard (or all): another instance may take it at once."""
        with trio.move_on_after(2):
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
    async with trio.open_nursery() as nursery:

        async def keep() -> None:
            while True:
                await trio.sleep(leases.renew_every)
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
