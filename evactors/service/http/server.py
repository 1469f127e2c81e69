"""The HTTP listeners: our own accept loop, connection caps, and a graceful stop, serving
an ASGI app with our HTTP/1.1 connections (``connection``: llhttp on trio streams).

The accept loop counts connections where they are accepted (a cap could not be placed in
the app, which sees requests, not sockets):

- past ``limits.max_connections`` a new connection gets ``503`` and is closed at once;
- past ``limits.max_connections_per_ip`` (trusted proxies exempt) it gets ``429``;
- EMFILE/ENFILE while accepting: one warning a minute, a short pause, no spin.

A connection is released as soon as its client is gone. One connection's error is logged,
never fatal to the listener.

Graceful stop (hypercorn's trio worker is the model: nested nurseries, the stop a cancel
scope's deadline): stop accepting, close the listening sockets, close idle keep-alive
connections at once, let in-flight requests finish (their answers say ``Connection:
close``), and cancel what is left after ``graceful`` seconds, a fraction of the drain
deadline. With ``server.http2_cleartext`` on, admitted connections are served by
hypercorn instead (``h2c``), behind the same loop and caps.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import resource
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import trio

from evactors.core.config import Config
from evactors.core.limits import ConnectionCount
from evactors.ops import metrics
from evactors.service.http.connection import ASGIApp, Connection, Settings
from evactors.service.supervisor import StartupError

log = logging.getLogger("evactors.http")

_ACCEPT_CAPACITY = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
BACKLOG = 2048  # 100 leaves a burst of new connections waiting in SYN retries


def _refusal(status: int, error: str, message: str, retry_after: int) -> bytes:
    reason = {429: "Too Many Requests", 503: "Service Unavailable"}[status]
    body = msgspec.json.encode({"success": False, "error": error, "message": message})
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"retry-after: {retry_after}\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


def bind_socket(bind: str) -> socket.socket:
    """A listening socket for ``HOST:PORT``, ``[V6]:PORT`` or ``unix:PATH`` (a stale
    socket file is replaced)."""
    if bind.startswith("unix:"):
        path = bind.removeprefix("unix:")
        Path(path).unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
        except OSError:
            sock.close()
            raise
    else:
        host, _, port = bind.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind((host, int(port)))
        except (OSError, ValueError) as e:
            sock.close()
            if isinstance(e, ValueError):
                raise OSError(errno.EINVAL, f"not HOST:PORT: {bind!r}") from None
            raise
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock


def describe(sock: socket.socket) -> str:
    """``HOST:PORT`` (``[V6]:PORT``) or ``unix:PATH`` of a bound socket."""
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{name}"
    if sock.family == socket.AF_INET6:
        return f"[{name[0]}]:{name[1]}"
    return f"{name[0]}:{name[1]}"


class Listener:
    """Accepts, counts and refuses; serves admitted connections until ``shutdown``."""

    def __init__(self, app: ASGIApp, count: ConnectionCount, retry_after: int, read_timeout: float,
                 graceful: float, counted: bool = True, h2c: bool = False) -> None:
        self.app = app
        self.count = count
        self.retry_after = retry_after
        self.graceful = graceful
        self.counted = counted  # in the open-connections gauge (the public listener)
        self.settings = Settings(read_timeout)
        self.h2c: Any = None
        if h2c:
            try:
                from evactors.service.http.h2c import H2C
            except ImportError as e:
                raise StartupError(f"server.http2_cleartext needs the [h2c] extra ({e}): "
                                   "pip install 'evactors[h2c]'") from None
            self.h2c = H2C(app, read_timeout)
        self._capacity_logged = 0.0
        self._refused_logged = 0.0

    async def serve(self, sockets: list[socket.socket], shutdown: Callable[[], Awaitable[Any]],
                    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in sockets]
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as accepting:
                for listener in listeners:
                    accepting.start_soon(self._accept, listener, connections)
                task_status.started([describe(s) for s in sockets])
                await shutdown()
                accepting.cancel_scope.cancel()
            for listener in listeners:
                await listener.aclose()
            self.settings.stop()  # idle keep-alive connections close now
            if self.h2c is not None:
                await self.h2c.stop()
            connections.cancel_scope.deadline = trio.current_time() + self.graceful

    async def _accept(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as e:
                if e.errno not in _ACCEPT_CAPACITY:
                    raise
                metrics.CONNECTIONS_REFUSED.labels("fd_limit").inc()
                if time.monotonic() - self._capacity_logged > 60:
                    self._capacity_logged = time.monotonic()
                    log.warning("cannot accept connections: %s (lower limits.max_connections "
                                "or raise the file descriptor limit)", e)
                await trio.sleep(0.1)
                continue
            try:
                peer = stream.socket.getpeername()
            except OSError:
                peer = None
            ip = str(peer[0]) if isinstance(peer, tuple) and peer else ""
            why = self.count.admit(ip)
            if why:
                nursery.start_soon(self._refuse, stream, why, ip)
                continue
            if self.counted:
                metrics.CONNECTIONS_OPEN.inc()
            nursery.start_soon(self._handle, stream, ip, peer)

    async def _handle(self, stream: trio.SocketStream, ip: str, peer: Any) -> None:
        try:
            if self.h2c is not None:
                await self.h2c.serve(stream)
            else:
                try:
                    local = stream.socket.getsockname()
                except OSError:
                    local = None
                client = (ip, int(peer[1])) if isinstance(peer, tuple) and len(peer) > 1 else None
                server = (str(local[0]), int(local[1])) if isinstance(local, tuple) else None
                await Connection(stream, self.app, self.settings, client, server).run()
        except Exception:  # one connection's fault must not end the listener (and the service)
            log.exception("HTTP connection failed")
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await stream.aclose()
                finally:
                    self.count.release(ip)
                    if self.counted:
                        metrics.CONNECTIONS_OPEN.dec()

    async def _refuse(self, stream: trio.SocketStream, why: str, ip: str) -> None:
        metrics.CONNECTIONS_REFUSED.labels(why).inc()
        if why == "total":
            reply = _refusal(503, "too_many_connections", "the server is at its connection limit "
                             "(limits.max_connections); retry later", self.retry_after)
        else:
            reply = _refusal(429, "too_many_connections", "too many open connections from this "
                             "address (limits.max_connections_per_ip)", self.retry_after)
        if time.monotonic() - self._refused_logged > 10:
            self._refused_logged = time.monotonic()
            log.warning("refusing connections (%s limit reached; e.g. from %s)", why, ip)
        with trio.move_on_after(0.5):  # reply, then read what came so the close is no reset
            try:
                await stream.send_all(reply)
                await stream.send_eof()
                while await stream.receive_some(65536):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
        with trio.CancelScope(shield=True):
            await stream.aclose()


def exempt(trusted: list[str]) -> Callable[[str], bool]:
    """Trusted proxies carry many clients on one address: no per-IP cap for them."""
    nets = [ipaddress.ip_network(p, strict=False) for p in trusted]

    def check(ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in net for net in nets)
    return check


FD_RESERVE = 256  # descriptors kept for Redis, ClickHouse, the AOF, logs and GeoIP


def connection_cap(configured: int) -> int:
    """``limits.max_connections``, lowered to what the file descriptor limit allows (raised
    first to its hard limit: a process may, and the default soft 1024 is too low)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return configured
    allowed = max(16, soft - FD_RESERVE)
    if configured == 0 or configured > allowed:
        log.warning("limits.max_connections lowered to %d: the file descriptor limit is %d "
                    "(raise it, e.g. LimitNOFILE, for more)", allowed, soft)
        return allowed
    return configured


def graceful_seconds(config: Config) -> float:
    """The listeners' graceful stop: a third of the drain deadline, at least a second."""
    return max(1.0, config.supervisor.drain_seconds / 3)


async def serve_http(app: ASGIApp, config: Config, shutdown: trio.Event,
                     task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` until ``shutdown``; started once it listens (``http://HOST:PORT``).
    A bind that fails is a ``StartupError``."""
    try:
        sock = bind_socket(config.server.listen)
    except OSError as e:
        raise StartupError(f"cannot listen on {config.server.listen}: {e.strerror or e}") from None
    count = ConnectionCount(connection_cap(config.limits.max_connections),
                            config.limits.max_connections_per_ip, exempt(config.server.trusted_proxies))
    listener = Listener(app, count, config.server.retry_after_seconds, config.server.read_timeout_seconds,
                        graceful_seconds(config), h2c=config.server.http2_cleartext)
    prefixed: Any = _Prefixed(task_status, "http://")
    await listener.serve([sock], shutdown.wait, task_status=prefixed)


class _Prefixed:
    """``task_status`` whose started value is the addresses as URLs."""

    def __init__(self, status: Any, prefix: str) -> None:
        self.status, self.prefix = status, prefix

    def started(self, binds: list[str]) -> None:
        self.status.started([self.prefix + b for b in binds])


async def serve_unix_or_tcp(app: ASGIApp, bind: str, shutdown: trio.Event, graceful: float,
                            read_timeout: float,
                            task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    """A listener without connection caps (the admin's: a 0600 socket, or an address the
    operator chose), ``unix:PATH`` made 0600 before it is announced."""
    sock = bind_socket(bind)
    if bind.startswith("unix:"):
        os.chmod(bind.removeprefix("unix:"), 0o600)
    listener = Listener(app, ConnectionCount(0, 0), 1, read_timeout, graceful, counted=False)
    status: Any = task_status
    await listener.serve([sock], shutdown.wait, task_status=status)
