"""Every Redis key the service writes, named in one place. Per-shard keys share a hash
tag, so the commit of a shard's batch is single-slot on Redis Cluster too.
"""

from __future__ import annotations

import logging
from typing import NamedTuple, TypeVar

from evactors.core.config import Config
from evactors.store.cluster import is_cluster_url

log = logging.getLogger("evactors.redis")


T = TypeVar("T")


def keys_for(config: Config) -> Keys:
    """The keys of ``config``'s Redis: ingest lanes on a cluster."""
    return Keys(config.redis.key_prefix, config.redis.ingest_lanes if is_cluster_url(config.redis.url) else 0)


class Lane(NamedTuple):
    """An ingest stream with its counter and its dead letters, in one hash slot."""

    stream: str  # one entry per group of accepted requests
    counter: str  # events in the stream
    dead: str  # what could not be processed, with why


class Keys:
    """Every Redis key the service writes. Per-shard keys share a hash tag, so the
    commit of a shard's batch is single-slot on Redis Cluster too.

    ``lanes``: 0 on one server (one ingest stream); on a cluster, the ingest streams, each
    with its own hash tag (``{iN}``), so that ingest is spread over the masters rather than
    funnelled through one key."""

    def __init__(self, prefix: str, lanes: int = 0) -> None:
        self.prefix = prefix
        self.lanes = [Lane(f"{prefix}:in", f"{prefix}:in:n", f"{prefix}:dead")] if lanes == 0 else [
            Lane(f"{prefix}:{{i{i}}}:in", f"{prefix}:{{i{i}}}:in:n", f"{prefix}:{{i{i}}}:dead")
            for i in range(lanes)]
        self.clustered = lanes > 0
        self.lane_count = lanes  # as given: 0 on one server
        self.ingest, self.ingest_count, self.dead_letter = self.lanes[0]
        self.buffer_size_cached = f"{prefix}:bufsize"
        self.meta = f"{prefix}:meta"  # hash: facts the stored data depends on (shard count)
        self.flush_plan_all = f"{prefix}:flush"  # the flush being carried out, over all shards
        # zset: the instances that hold session shards → until when (ms) they are alive
        self.members = f"{prefix}:members"
        # zset: the live instances with the ingest or sessions role → until when (ms) alive
        self.instances = f"{prefix}:instances"

    def shard(self, shard: int) -> str:
        return f"{self.prefix}:{{s{shard}}}"

    def buffer(self, shard: int) -> str:
        return f"{self.shard(shard)}:buf"  # stream of row blocks waiting for ClickHouse

    def buffer_count(self, shard: int) -> str:
        return f"{self.shard(shard)}:buf:n"

    def buffer_dead(self, shard: int) -> str:
        """Where a buffer entry that cannot be decoded goes (its shard's slot on a cluster)."""
        return f"{self.shard(shard)}:dead" if self.clustered else self.dead_letter

    def backlog_counters(self, shards: int) -> list[str]:
        """The backlog's counters: each ingest lane's, then each shard buffer's."""
        return [lane.counter for lane in self.lanes] + [self.buffer_count(s) for s in range(shards)]

    def backlog_streams(self, shards: int) -> list[str]:
        """The streams the backlog waits in: each ingest lane, then each shard buffer."""
        return [lane.stream for lane in self.lanes] + [self.buffer(s) for s in range(shards)]

    def dead_letters(self, shards: int) -> list[str]:
        """Every dead-letter stream."""
        return list(dict.fromkeys([*(lane.dead for lane in self.lanes),
                                   *(self.buffer_dead(s) for s in range(shards))]))

    def flush_plan(self, shard: int) -> str:
        return f"{self.shard(shard)}:flush"  # a shard's own plan, as earlier versions made them

    def inbox(self, shard: int) -> str:
        # stream: units of the shard's events left by an instance that does not hold it, for
        # its owner, wherever it runs (deleted by the commit that takes them in)
        return f"{self.shard(shard)}:inbox"

    def pending_aliases(self, shard: int) -> str:
        # hash: alias key → target, committed with the shard's transaction on a cluster and
        # deleted once the alias keys (other slots) are written: none is lost, none is early
        return f"{self.shard(shard)}:aliases"

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
