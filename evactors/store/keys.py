"""Every Redis key the service writes, named in one place. Per-shard keys share a hash
tag, so the commit of a shard's batch is single-slot on Redis Cluster too.
"""

from __future__ import annotations

import logging
from typing import TypeVar

log = logging.getLogger("evactors.redis")


T = TypeVar("T")


class Keys:
    """Every Redis key the service writes. Per-shard keys share a hash tag, so the
    commit of a shard's batch is single-slot on Redis Cluster too."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.ingest = f"{prefix}:in"  # stream: one entry per accepted request
        self.ingest_count = f"{prefix}:in:n"  # events in the ingest stream
        self.buffer_size_cached = f"{prefix}:bufsize"
        self.dead_letter = f"{prefix}:dead"  # stream: what could not be processed, with why
        self.meta = f"{prefix}:meta"  # hash: facts the stored data depends on (shard count)
        self.flush_plan_all = f"{prefix}:flush"  # the flush being carried out, over all shards
        # zset: the instances that hold session shards → until when (ms) they are alive
        self.members = f"{prefix}:members"

    def shard(self, shard: int) -> str:
        return f"{self.prefix}:{{s{shard}}}"

    def buffer(self, shard: int) -> str:
        return f"{self.shard(shard)}:buf"  # stream of row blocks waiting for ClickHouse

    def buffer_count(self, shard: int) -> str:
        return f"{self.shard(shard)}:buf:n"

    def flush_plan(self, shard: int) -> str:
        return f"{self.shard(shard)}:flush"  # a shard's own plan, as earlier versions made them

    def inbox(self, shard: int) -> str:
        # stream: units of the shard's events left by an instance that does not hold it, for
        # its owner, wherever it runs (deleted by the commit that takes them in)
        return f"{self.shard(shard)}:inbox"

    def lease(self, shard: int) -> str:
        return f"{self.shard(shard)}:lease"  # string with a TTL: the owner of the shard

    def fence(self, shard: int) -> str:
        # the shard's fencing token, one more at each change of owner: every commit of the
        # shard is a transaction that runs only while it holds its writer's token
        return f"{self.shard(shard)}:fence"

    def session_index(self, shard: int) -> str:
        return f"{self.shard(shard)}:idx"  # zset: open session → last activity (wall ms)

    def commits(self, shard: int) -> str:
        # commits of the shard, counted by each: a count that does not follow tells the
        # actor that Redis lost writes (or another writer): its memory is dropped
        return f"{self.shard(shard)}:commits"

    def user_state(self, shard: int, project: str, device: str) -> str:
        return f"{self.shard(shard)}:u:{project}:{device}"

    def dedup(self, shard: int, bucket: int) -> str:
        # string: the 8-byte fingerprints of the (project, messageId) committed in one time
        # bucket, appended; it expires with the dedup window
        return f"{self.shard(shard)}:dd:{bucket}"

    def alias(self, project: str, previous_id: str) -> str:
        # not per shard: any shard resolves ids through it (written by the alias's shard)
        return f"{self.prefix}:alias:{project}:{previous_id}"

    def live(self, project: str) -> str:
        return f"{self.prefix}:live:{project}"  # zset: profile → last seen (ms)

    def last_screen_view(self, project: str, profile: str) -> str:
        # a project's last views share a slot (the hash tag); the publisher writes them with
        # plain commands, at most once a second
        return f"{self.prefix}:lastsv:{{{project}}}:{profile}"
