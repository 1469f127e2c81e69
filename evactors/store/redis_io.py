"""Redis from trio: the sync redis-py client in worker threads, one hop per pipeline, and
for the hot paths (``execute``, ``script``, ``scripts``) a small trio-native client
(``resp``) with no hop at all.

``redis.asyncio`` does not run under trio; the sync client is called from
``trio.to_thread.run_sync`` with whole pipelines (see STACK.md). A thread call cannot be
cancelled, so every socket has a short timeout; a ``CapacityLimiter`` bounds how many
threads Redis may occupy. ``retrying`` turns connection faults into logged, counted
retries with backoff: the caller's work is never dropped because Redis was away.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis
import trio

from evactors.ops import metrics
from evactors.store.cluster import ClusterRedis, is_cluster_url, parse_cluster_url
from evactors.store.resp import Command, FenceMoved, NativeRedis, Script, run_scripts

log = logging.getLogger("evactors.redis")


T = TypeVar("T")


TRANSIENT = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError,
             redis.exceptions.TryAgainError, OSError)


# Error replies that describe a passing state of the server, not a bad command.
_RECOVERABLE_REPLIES = ("OOM", "MISCONF", "READONLY", "LOADING", "BUSY", "TRYAGAIN",
                        "CLUSTERDOWN", "MASTERDOWN", "NOREPLICAS")


def transient(e: BaseException) -> bool:
    """A fault to wait out: the connection, or the server saying "not now"."""
    if isinstance(e, (*TRANSIENT, redis.exceptions.OutOfMemoryError)):  # redis-py drops "OOM"
        return True
    return isinstance(e, redis.ResponseError) and str(e).split(" ", 1)[0] in _RECOVERABLE_REPLIES


def _fenced(client: Any, commands: Sequence[Command], fence: tuple[str, bytes]) -> list[Any]:
    """redis-py's form of ``NativeRedis.execute`` with a fence (``commands``: MULTI … EXEC)."""
    with client.pipeline(transaction=True) as pipe:
        pipe.watch(fence[0])
        held = pipe.get(fence[0])
        if held != fence[1]:
            raise FenceMoved(fence[0], held)
        pipe.multi()
        for command in commands[1:-1]:
            pipe.execute_command(*command)
        try:
            result = pipe.execute(raise_on_error=False)
        except redis.WatchError:
            raise FenceMoved(fence[0], None) from None
    return ["OK", *["QUEUED"] * (len(commands) - 2), result]


def _pipeline(client: Any, commands: Sequence[Command]) -> list[Any]:
    pipe = client.pipeline(transaction=False)
    for command in commands:
        pipe.execute_command(*command)
    return pipe.execute(raise_on_error=False)  # type: ignore[no-any-return]


def as_dict(reply: Any) -> dict[bytes, bytes]:
    """A field/value reply (HGETALL, a stream entry's fields): flat from the trio-native
    client, a dict from redis-py."""
    return reply if isinstance(reply, dict) else dict(zip(reply[::2], reply[1::2], strict=False))


def stream_entries(reply: list[Any]) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """XRANGE's reply as (id, fields)."""
    return [(entry_id, as_dict(fields)) for entry_id, fields in reply]


def sync_client(url: str, timeout: float, max_connections: int | None = None) -> Any:
    """redis-py's client for ``url``: a ``RedisCluster`` for ``redis+cluster://`` seeds."""
    if is_cluster_url(url):
        from redis.cluster import ClusterNode, RedisCluster

        seeds, user, password = parse_cluster_url(url)
        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in seeds], username=user,
                            password=password, socket_timeout=timeout,
                            socket_connect_timeout=min(timeout, 3.0))
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=min(timeout, 3.0),
                                health_check_interval=30, max_connections=max_connections)


class RedisIO:
    """A redis-py client whose calls run in worker threads under a limiter, and the
    trio-native client for the hot paths (over a cluster's masters on a cluster)."""

    def __init__(self, url: str, timeout: float, threads: int = 8, wait_replicas: int = 0) -> None:
        self.url = url
        self.cluster = is_cluster_url(url)
        self.client = sync_client(url, timeout, threads + 4)
        self.limiter = trio.CapacityLimiter(threads)
        # the hot paths' commands, in the trio thread (no thread hop); rediss:// stays on redis-py
        self.native: NativeRedis | ClusterRedis | None = (
            ClusterRedis(url, timeout, wait_replicas) if self.cluster
            else NativeRedis(url, timeout) if NativeRedis.supports(url) else None)

    async def execute(self, commands: Sequence[Command], check: bool = False,
                      fence: tuple[str, bytes] | None = None) -> list[Any]:
        """``commands`` in one pipeline (one round trip); error replies come back in place,
        as exceptions (``check``: the first is raised). ``fence``: a MULTI … EXEC run only
        while that key holds that value (one round trip more; ``NativeRedis.execute``)."""
        if self.native is not None:
            replies = await self.native.execute(commands, fence)
        elif fence is not None:
            replies = await self.run(functools.partial(_fenced, self.client, commands, fence))
        else:
            replies = await self.run(functools.partial(_pipeline, self.client, commands))
        if check:
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
        return replies

    async def script(self, script: Script, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """One call of ``script``; an error reply is raised."""
        (reply,) = await self.scripts(script, [(keys, args)])
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def scripts(self, script: Script, calls: Sequence[tuple[Sequence[Any], Sequence[Any]]],
                      extra: Sequence[Command] = (), wait: bool = False) -> list[Any]:
        """``script`` per (keys, args), then ``extra``, in one pipeline; reloaded on NOSCRIPT
        (see ``run_scripts``)."""
        return await run_scripts(self.execute, script, calls, extra, wait)

    async def on_each_master(self, commands: Sequence[Command]) -> list[list[Any]]:
        """``commands`` (keyless: INFO, CONFIG GET…) on every master, each one's replies:
        one server, or each master of a cluster."""
        if isinstance(self.native, ClusterRedis):
            return await self.native.on_each_master(commands)
        return [await self.execute(commands)]

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    async def pipeline(self, build: Callable[[Any], None], transaction: bool = False) -> list[Any]:
        """Build a pipeline and execute it in one thread hop (one round trip)."""

        def go() -> list[Any]:
            pipe = self.client.pipeline(transaction=transaction)
            build(pipe)
            return pipe.execute()

        return await self.run(go)

    def close(self) -> None:
        self.client.close()
        if self.native is not None:
            self.native.close()


async def retrying(what: str, fn: Callable[..., Awaitable[T]], *args: Any, initial: float = 0.05,
                   maximum: float = 5.0) -> T:
    """Run ``fn(*args)`` until it succeeds; Redis faults are logged, counted and backed off."""
    delay = initial
    failures = 0
    while True:
        try:
            return await fn(*args)
        except Exception as e:
            if not transient(e):
                raise
            failures += 1
            metrics.REDIS_ERRORS.labels(what).inc()
            level = logging.WARNING if failures in (1, 10) or failures % 100 == 0 else logging.DEBUG
            log.log(level, "redis unavailable during %s (attempt %d), retrying in %.2fs: %s",
                    what, failures, delay, e)
            await trio.sleep(delay)
            delay = min(delay * 2, maximum)
