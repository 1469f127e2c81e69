"""A Redis/Valkey Cluster from trio: the trio-native client (``resp``), one pool per master,
each command sent to the master of its key's hash slot.

Why not redis-py's cluster client on the hot paths: it is synchronous (a thread hop per
call, see ``resp``), and its pipelines do not keep our transactions whole. Here a pipeline
is cut into *parts*: a ``MULTI … EXEC`` block is one part (all its keys in one slot: the
per-shard hash tags see to that), every other command is a part of its own; parts go to
their masters (each master's parts in order, in one round trip), and the replies come
back in place.

Redirections and failover:

- ``MOVED`` (the slot lives elsewhere now: a failover, a resharding): the slot map is read
  again and the parts that got it are sent again. A ``MOVED`` reply means the command was
  not run; a transaction with a redirected command is aborted whole (``EXECABORT``), so
  sending it again runs it once.
- ``ASK`` (the slot is being migrated and the key is already on the target): the command
  goes to the target after ``ASKING``. A transaction that meets one is not split over two
  nodes: it fails with ``TRYAGAIN``, a transient fault its caller backs off from, until
  the migration is over.
- A master that is gone: the connection error is raised (a transient fault, retried by
  the caller with backoff) and the slot map is read again before the next call, from any
  node that answers, so the retries find the promoted replica.

``WAIT``/``WAITAOF`` concern the connection they are sent on: they go with the part
before them. ``SCRIPT LOAD`` goes to every master, as a script may run on any.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import redis
import trio
from redis.crc import key_slot

from evactors.store.resp import Command, NativeRedis

log = logging.getLogger("evactors.redis")

Address = tuple[str, int]

SCHEME = "redis+cluster://"
MAX_REDIRECTS = 5


# commands that write nothing (no WAIT after them)
READS = frozenset(name.encode() for name in (
    "GET", "MGET", "EXISTS", "TTL", "PTTL", "STRLEN", "HGET", "HGETALL", "HMGET", "XRANGE",
    "XREVRANGE", "XLEN", "XINFO", "ZRANGE", "ZRANGEBYSCORE", "ZCOUNT", "ZCARD", "ZSCORE",
    "SCAN", "PUBLISH", "PUBSUB", "MEMORY", "INFO", "PING", "CONFIG", "WATCH", "UNWATCH",
    "CLUSTER", "ASKING", "WAIT", "WAITAOF", "SCRIPT", "DBSIZE", "TYPE"))


def _as_bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def is_cluster_url(url: str) -> bool:
    return url.startswith(SCHEME)


def parse_cluster_url(url: str) -> tuple[list[Address], str | None, str | None]:
    """``redis+cluster://[user:password@]host:port[,host:port…]``: the seed nodes, user,
    password."""
    rest = url[len(SCHEME):].split("/", 1)[0].split("?", 1)[0]
    user = password = None
    if "@" in rest:
        auth, rest = rest.rsplit("@", 1)
        user, _, password = auth.rpartition(":")
        user, password = unquote(user) or None, unquote(password) or None
    seeds: list[Address] = []
    for part in rest.split(","):
        if not part:
            continue
        parsed = urlsplit("//" + part)
        seeds.append((parsed.hostname or "127.0.0.1", parsed.port or 6379))
    if not seeds:
        raise ValueError(f"no seed node in {url!r}")
    return seeds, user, password


def command_key(command: Command) -> Any:
    """The key that routes ``command`` (None: any node will do)."""
    name = _as_bytes(command[0]).upper()
    if name in (b"EVALSHA", b"EVAL", b"FCALL"):
        return command[3] if int(command[2]) > 0 else None
    if name in (b"MEMORY", b"PUBSUB", b"XINFO", b"OBJECT"):
        return command[2] if len(command) > 2 else None  # MEMORY USAGE key, PUBSUB NUMSUB channel
    if name in (b"PING", b"INFO", b"SCRIPT", b"WAIT", b"WAITAOF", b"MULTI", b"EXEC", b"UNWATCH",
                b"DISCARD", b"CONFIG", b"DBSIZE", b"BGREWRITEAOF", b"CLUSTER", b"ASKING"):
        return None
    return command[1] if len(command) > 1 else None


def slot_of(key: Any) -> int:
    return int(key_slot(_as_bytes(key)))


def _redirect(reply: Any) -> tuple[str, int, Address] | None:
    """("MOVED"|"ASK", slot, address) for a redirection reply, else None."""
    if isinstance(reply, redis.ResponseError):
        kind, _, rest = str(reply).partition(" ")
        if kind in ("MOVED", "ASK"):
            slot, _, where = rest.partition(" ")
            host, _, port = where.rpartition(":")
            return kind, int(slot), (host or "127.0.0.1", int(port))
    return None


def _split_mgets(commands: Sequence[Command]) -> tuple[list[Command], list[tuple[int, list[tuple[int, list[int]]]]]]:
    """``commands`` with each MGET outside a transaction whose keys span slots cut into one
    MGET per slot (not atomic, like any read over several masters); and how to put their
    replies back: (position, [(position of a part, the indexes of its keys)])."""
    out: list[Command] = []
    splits: list[tuple[int, list[tuple[int, list[int]]]]] = []
    in_block = False
    for command in commands:
        name = _as_bytes(command[0]).upper()
        in_block = (in_block or name == b"MULTI") and name not in (b"EXEC", b"DISCARD")
        if name == b"MGET" and not in_block and len(command) > 2:
            groups: dict[int, list[int]] = {}
            for j, key in enumerate(command[1:]):
                groups.setdefault(slot_of(key), []).append(j)
            if len(groups) > 1:
                subs = []
                for indexes in groups.values():
                    subs.append((len(out), indexes))
                    out.append(["MGET", *(command[1 + j] for j in indexes)])
                splits.append((len(out) - len(subs), subs))
                continue
        out.append(command)
    return out, splits


def _join_mgets(replies: list[Any], splits: list[tuple[int, list[tuple[int, list[int]]]]]) -> list[Any]:
    """The replies of ``_split_mgets``'s commands as the replies of the original ones."""
    if not splits:
        return replies
    joined: list[Any] = []
    at = 0
    for first, subs in splits:
        joined += replies[at:first]
        size = sum(len(indexes) for _, indexes in subs)
        values: list[Any] = [None] * size
        error = next((replies[p] for p, _ in subs if isinstance(replies[p], Exception)), None)
        for p, indexes in subs:
            if error is None:
                for j, value in zip(indexes, replies[p], strict=True):
                    values[j] = value
        joined.append(error if error is not None else values)
        at = first + len(subs)
    joined += replies[at:]
    return joined


class _Part:
    """Commands that go to one node together and may be sent again together."""

    __slots__ = ("commands", "positions", "slot", "transaction")

    def __init__(self, slot: int | None, transaction: bool) -> None:
        self.slot = slot
        self.transaction = transaction
        self.commands: list[Command] = []
        self.positions: list[int] = []  # where each command's reply goes in the caller's list


class ClusterRedis:
    """The trio-native client over a cluster's masters (see the module's docstring)."""

    def __init__(self, url: str, timeout: float, wait_replicas: int = 0) -> None:
        self.seeds, self.user, self.password = parse_cluster_url(url)
        self.timeout = timeout
        # replicas each write waits for (WAIT) before its reply counts: what a failover
        # must not lose
        self.wait_replicas = wait_replicas
        self.slots: list[Address | None] = [None] * 16384
        self.pools: dict[Address, NativeRedis] = {}
        self.stale = True
        self._refreshing = trio.Lock()
        # masters seen through ASK (importing a slot, maybe their first): scripts go there too
        self.importing: set[Address] = set()

    def _pool(self, address: Address) -> NativeRedis:
        pool = self.pools.get(address)
        if pool is None:
            auth = ""
            if self.password:
                auth = f"{quote(self.user or '', safe='')}:{quote(self.password, safe='')}@"
            pool = self.pools[address] = NativeRedis(f"redis://{auth}{address[0]}:{address[1]}", self.timeout)
        return pool

    async def refresh(self) -> None:
        """Read the slot map from the first node that answers (known masters, then seeds)."""
        async with self._refreshing:
            if not self.stale:
                return
            candidates = list(dict.fromkeys([*self.pools, *self.seeds]))
            random.shuffle(candidates)
            errors: list[str] = []
            for address in candidates:
                try:
                    (reply,) = await self._pool(address).execute([["CLUSTER", "SLOTS"]])
                except (redis.ConnectionError, redis.TimeoutError) as e:
                    errors.append(f"{address[0]}:{address[1]}: {e}")
                    continue
                if isinstance(reply, Exception) or not reply:
                    errors.append(f"{address[0]}:{address[1]}: {reply or 'no slot map'}")
                    continue
                slots: list[Address | None] = [None] * 16384
                for start, end, master, *_replicas in reply:
                    host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
                    where = (host or address[0], int(master[1]))
                    for slot in range(int(start), int(end) + 1):
                        slots[slot] = where
                self.slots = slots
                self.importing.clear()
                self.stale = False
                return
            raise redis.ConnectionError(f"no cluster node gave its slot map: {'; '.join(errors)}")

    def _node(self, slot: int | None) -> Address:
        if slot is None:
            served = [a for a in self.slots if a is not None]
            if not served:
                self.stale = True
                raise redis.ConnectionError("the cluster's slot map is empty")
            return served[0]
        address = self.slots[slot]
        if address is None:
            self.stale = True  # read again before the retry: the map may have been partial
            raise redis.exceptions.ClusterDownError(f"CLUSTERDOWN slot {slot} is not served")
        return address

    def masters(self) -> list[Address]:
        return list(dict.fromkeys(a for a in self.slots if a is not None))

    async def on_each_master(self, commands: Sequence[Command]) -> list[list[Any]]:
        """``commands`` (keyless) on every master, each one's replies."""
        if self.stale:
            await self.refresh()
        return [await self._call(a, list(commands), None) for a in self.masters()]

    def _parts(self, commands: Sequence[Command]) -> list[_Part]:
        parts: list[_Part] = []
        block: _Part | None = None
        for i, command in enumerate(commands):
            name = _as_bytes(command[0]).upper()
            key = command_key(command)
            if block is not None:
                block.commands.append(command)
                block.positions.append(i)
                if key is not None:
                    slot = slot_of(key)
                    if block.slot is not None and slot != block.slot:
                        raise redis.ResponseError("CROSSSLOT a transaction's keys must share one hash slot")
                    block.slot = slot
                if name in (b"EXEC", b"DISCARD"):
                    block = None
                continue
            if name == b"MULTI":
                block = _Part(None, True)
                block.commands.append(command)
                block.positions.append(i)
                parts.append(block)
                continue
            if name in (b"WAIT", b"WAITAOF") and parts:
                parts[-1].commands.append(command)  # it waits for the writes on that connection
                parts[-1].positions.append(i)
                continue
            part = _Part(None if key is None else slot_of(key), False)
            part.commands.append(command)
            part.positions.append(i)
            parts.append(part)
        return parts

    async def execute(self, commands: Sequence[Command], fence: tuple[str, bytes] | None = None) -> list[Any]:
        """``commands`` in one round trip per master; replies in place (error replies as
        exceptions). ``fence``: as ``NativeRedis.execute``; ``commands`` is then one
        transaction, in the fence's slot."""
        if self.stale:
            await self.refresh()
        splits: list[tuple[int, list[tuple[int, list[int]]]]] = []
        if fence is None:
            commands, splits = _split_mgets(commands)
        replies: list[Any] = [None] * len(commands)
        if fence is not None:
            part = _Part(slot_of(fence[0]), True)
            part.commands, part.positions = list(commands), list(range(len(commands)))
            parts = [part]
        else:
            parts = []
            for part in self._parts(commands):
                if part.commands and _as_bytes(part.commands[0][0]).upper() == b"SCRIPT":
                    await self._everywhere(part, replies)
                else:
                    parts.append(part)
        for _attempt in range(MAX_REDIRECTS):
            parts = await self._send(parts, replies, fence)
            if not parts:
                return _join_mgets(replies, splits)
            await self.refresh()
        raise redis.exceptions.TryAgainError(f"TRYAGAIN still redirected after {MAX_REDIRECTS} tries")

    async def _everywhere(self, part: _Part, replies: list[Any]) -> None:
        """``part`` (a SCRIPT LOAD) on every master; the first master's replies."""
        first: list[Any] | None = None
        for address in dict.fromkeys([*self.masters(), *self.importing]):
            got = await self._call(address, part.commands, None)
            first = got if first is None else first
        for position, reply in zip(part.positions, first or [], strict=False):
            replies[position] = reply

    async def _call(self, address: Address, commands: list[Command], fence: tuple[str, bytes] | None) -> list[Any]:
        """``commands`` on one master; with ``wait_replicas``, writes are replicated first."""
        wait = self.wait_replicas and any(_as_bytes(c[0]).upper() not in READS for c in commands)
        suffix = [["WAIT", self.wait_replicas, int(self.timeout * 500)]] if wait else []
        try:
            replies = await self._pool(address).execute(commands, fence, suffix)
        except (redis.ConnectionError, redis.TimeoutError):
            self.stale = True  # a master gone: the next call reads the map again
            raise
        if wait:
            replicated = replies.pop()
            if not isinstance(replicated, int) or replicated < self.wait_replicas:
                # the writes are on the master only: their callers treat this like a reply
                # lost on the way (written or not, they try again; what they write is
                # idempotent or deduplicated)
                self.stale = True
                raise redis.ResponseError(
                    f"NOREPLICAS {replicated!r} of {self.wait_replicas} replicas of "
                    f"{address[0]}:{address[1]} acknowledged the writes in time")
        return replies

    async def _send(self, parts: list[_Part], replies: list[Any],
                    fence: tuple[str, bytes] | None) -> list[_Part]:
        """Each master's parts in one round trip; the parts redirected by ``MOVED``
        (to be sent again once the map is read again)."""
        by_node: dict[Address, list[_Part]] = {}
        for part in parts:
            by_node.setdefault(self._node(part.slot), []).append(part)
        again: list[_Part] = []
        for address, node_parts in by_node.items():
            try:
                got = await self._call(address, [c for p in node_parts for c in p.commands], fence)
            except redis.ResponseError as e:  # the fence's WATCH redirected: nothing ran
                if _redirect(e) is None:
                    raise
                self.stale = True
                again += node_parts
                continue
            offset = 0
            for part in node_parts:
                part_replies = got[offset:offset + len(part.commands)]
                offset += len(part.commands)
                redirect = next((r for r in map(_redirect, part_replies) if r is not None), None)
                if redirect is None:
                    for position, reply in zip(part.positions, part_replies, strict=True):
                        replies[position] = reply
                    continue
                kind, slot, target = redirect
                if kind == "MOVED":
                    self.stale = True
                    again.append(part)
                elif part.transaction:
                    raise redis.exceptions.TryAgainError(f"TRYAGAIN slot {slot} is migrating")
                else:
                    self.importing.add(target)
                    _asking, *asked = await self._call(target, [["ASKING"], *part.commands], None)
                    if any(_redirect(r) is not None for r in asked):  # the move ended meanwhile
                        self.stale = True
                        again.append(part)
                        continue
                    for position, reply in zip(part.positions, asked, strict=True):
                        replies[position] = reply
        return again

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
