"""The HTTP listener: our own accept loop in front of hypercorn's connection handling,
serving the ASGI app until shutdown, its graceful stop a fraction of the drain deadline.

Why not ``hypercorn.trio.serve``: it accepts every connection the kernel hands it, with no
cap overall or per client IP, so a few thousand slow sockets from one address held every
file descriptor (EMFILE for everyone else, and a log line per failed accept). Hypercorn
has no hook between ``accept`` and its per-connection server, so this module runs the
loop itself (as ``hypercorn.trio.run.worker_serve`` does, minus TLS, QUIC and lifespan,
which the service does not use) and counts connections where they are accepted:

- past ``limits.max_connections`` a new connection gets ``503`` and is closed at once;
- past ``limits.max_connections_per_ip`` (trusted proxies exempt) it gets ``429``;
- EMFILE/ENFILE while accepting: one warning a minute, a short pause, no spin.

Each admitted connection is then served by hypercorn's own ``TCPServer`` (HTTP/1.1 via
h11; HTTP/2 cleartext only when ``server.http2_cleartext`` says so), and counted until it
closes. Header and idle deadlines are hypercorn's (``keep_alive_timeout``: from the
connection's start, or the end of its last response, to a request's last header); the
body's deadline is the application's (``request.read_body`` and ``BodyBounds``).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import resource
import time
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import h11
import hypercorn.config
import hypercorn.protocol
import msgspec
import trio
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import repr_socket_addr, wrap_app

from evactors.core.config import Config
from evactors.core.limits import ConnectionCount
from evactors.ops import metrics
from evactors.service.supervisor import StartupError

log = logging.getLogger("evactors.http")

_ACCEPT_CAPACITY = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_PROTOCOL_ERRORS = {
    400: ("bad_request", "the request is not valid HTTP/1.1"),
    408: ("request_timeout", "the request took too long"),
    413: ("request_too_large", "the request is too large"),
    414: ("uri_too_long", "the request target is too long"),
    431: ("headers_too_large", "the request's headers are too large (64 KB at most)"),
}


class _H11(H11Protocol):
    """Hypercorn's HTTP/1.1, with a JSON body on the errors it answers itself (a request
    that is not HTTP, headers over the 64 KB limit…) instead of an empty one."""

    async def _send_error_response(self, status_code: int) -> None:
        code, message = _PROTOCOL_ERRORS.get(status_code, ("bad_request", "the request is not valid"))
        body = msgspec.json.encode({"success": False, "error": code, "message": message})
        await self._send_h11_event(h11.Response(status_code=status_code, headers=[
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"), *self.config.response_headers("h11")]))
        await self._send_h11_event(h11.Data(data=body))
        await self._send_h11_event(h11.EndOfMessage())


class _HTTP11Only(_H11):
    """HTTP/1.1 without the cleartext switches to HTTP/2 (``Upgrade: h2c`` and the
    prior-knowledge preface): the request is answered in HTTP/1.1 like any other."""

    async def _check_protocol(self, event: Any) -> None:
        return None


def allow_http2_cleartext(allowed: bool) -> None:
    """Process-wide (hypercorn picks its HTTP/1.1 class by module name); one server per process."""
    hypercorn.protocol.H11Protocol = _H11 if allowed else _HTTP11Only  # type: ignore[misc]


def _refusal(status: int, error: str, message: str, retry_after: int) -> bytes:
    reason = {429: "Too Many Requests", 503: "Service Unavailable"}[status]
    body = msgspec.json.encode({"success": False, "error": error, "message": message})
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"retry-after: {retry_after}\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


class _Counted(trio.abc.HalfCloseableStream):
    """A socket stream that gives its slot back when closed (once)."""

    def __init__(self, stream: trio.SocketStream, release: Callable[[], None]) -> None:
        self.stream = stream
        self.socket = stream.socket  # hypercorn reads the peer's address from it
        self._release: Callable[[], None] | None = release
        # hypercorn may close (send_eof) from one task while another still writes a reply:
        # trio refuses two senders at once (BusyResourceError), so they take turns
        self._sending = trio.StrictFIFOLock()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        async with self._sending:
            await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.stream.receive_some(max_bytes)

    async def send_eof(self) -> None:
        async with self._sending:
            await self.stream.send_eof()

    async def aclose(self) -> None:
        try:
            await self.stream.aclose()
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()
                metrics.CONNECTIONS_OPEN.dec()


class _Server(TCPServer):
    """Hypercorn's per-connection server, ended when its client is gone: hypercorn's own
    keeps the connection (its descriptor, its slot) until the keep-alive timer fires, so
    a client closing 30 connections a second would hold 300 of them."""

    async def _read_data(self) -> None:
        await super()._read_data()
        await self.idle_task.stop()


class Listener:
    """Accepts, counts and refuses; hands admitted connections to hypercorn."""

    def __init__(self, app: Any, hconfig: hypercorn.config.Config, count: ConnectionCount,
                 retry_after: int) -> None:
        self.app = wrap_app(app, hconfig.wsgi_max_body_size, "asgi")
        self.hconfig = hconfig
        self.count = count
        self.retry_after = retry_after
        self.context = WorkerContext(None)
        self._capacity_logged = 0.0
        self._refused_logged = 0.0

    async def serve(self, shutdown: Callable[[], Awaitable[Any]],
                    task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        sockets = self.hconfig.create_sockets()
        for sock in sockets.insecure_sockets:
            sock.listen(self.hconfig.backlog)
        listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in sockets.insecure_sockets]
        binds = [f"http://{repr_socket_addr(s.family, s.getsockname())}" for s in sockets.insecure_sockets]
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as accepting:
                for listener in listeners:
                    accepting.start_soon(self._accept, listener, connections)
                task_status.started(binds)
                await shutdown()
                accepting.cancel_scope.cancel()
            for listener in listeners:
                await listener.aclose()
            await self.context.terminated.set()  # idle keep-alive connections close now
            connections.cancel_scope.deadline = trio.current_time() + self.hconfig.graceful_timeout

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
                ip = str(stream.socket.getpeername()[0])
            except (OSError, IndexError, TypeError):
                ip = ""
            why = self.count.admit(ip)
            if why:
                nursery.start_soon(self._refuse, stream, why, ip)
                continue
            metrics.CONNECTIONS_OPEN.inc()
            counted = _Counted(stream, lambda ip=ip: self.count.release(ip))  # type: ignore[misc]
            nursery.start_soon(self._handle, counted)

    async def _handle(self, stream: _Counted) -> None:
        try:
            await _Server(self.app, self.hconfig, self.context, ConnectionState({}), stream)  # type: ignore[arg-type]
        except Exception:  # one connection's fault must not end the listener (and the service)
            log.exception("HTTP connection failed")
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

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


def hypercorn_config(config: Config) -> hypercorn.config.Config:
    hconfig = hypercorn.config.Config()
    hconfig.bind = [config.server.listen]
    hconfig.accesslog = None
    hconfig.errorlog = logging.getLogger("evactors.http")
    hconfig.graceful_timeout = max(1.0, config.supervisor.drain_seconds / 3)
    # One rule for slow and idle clients: nothing received for this long closes it; and
    # the same timer bounds a request's headers in total (see the module's docstring).
    hconfig.keep_alive_timeout = config.server.read_timeout_seconds
    hconfig.read_timeout = config.server.read_timeout_seconds  # type: ignore[assignment]
    hconfig.h11_max_incomplete_size = 64 * 1024
    hconfig.backlog = 2048  # hypercorn's 100 leaves a burst of new connections waiting in SYN retries
    return hconfig


async def serve_http(app: Any, config: Config, shutdown: trio.Event,
                     task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` until ``shutdown``; started once it listens (the bound addresses).
    A bind that fails is a ``StartupError``."""
    listening = False

    def started(binds: list[str]) -> None:
        nonlocal listening
        listening = True
        task_status.started(binds)

    allow_http2_cleartext(config.server.http2_cleartext)
    count = ConnectionCount(connection_cap(config.limits.max_connections),
                            config.limits.max_connections_per_ip, exempt(config.server.trusted_proxies))
    listener = Listener(app, hypercorn_config(config), count, config.server.retry_after_seconds)
    try:
        status: Any = SimpleNamespace(started=started)
        await listener.serve(shutdown.wait, task_status=status)
    except* OSError as group:  # a failed bind (alone or inside a group)
        if listening:
            raise
        e = group.exceptions[0]
        reason = getattr(e, "strerror", None) or e
        raise StartupError(f"cannot listen on {config.server.listen}: {reason}") from None
