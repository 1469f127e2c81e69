"""HTTP/2 cleartext (h2c), only when ``server.http2_cleartext`` is on: each admitted
connection is then served by hypercorn's per-connection server (HTTP/1.1 via h11, with
h2c's upgrade and prior-knowledge preface), behind the same accept loop and caps
(``server.Listener``). Off (the default), connections are ours (``connection``) and
hypercorn is never imported.

Why keep it: browsers and SDKs speak HTTP/1.1 over plain HTTP, but an operator who turned
h2c on keeps it; it costs ~1.2 ms of CPU per request (docs/benchmarks.md, "HTTP layer").
"""

from __future__ import annotations

import logging
from typing import Any

import h11
import trio
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import wrap_app

from evactors.service.http.connection import error_body


class _H11(H11Protocol):
    """Hypercorn's HTTP/1.1, with the project's JSON body on the errors it answers itself."""

    async def _send_error_response(self, status_code: int) -> None:
        body = error_body(status_code)
        await self._send_h11_event(h11.Response(status_code=status_code, headers=[
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"), *self.config.response_headers("h11")]))
        await self._send_h11_event(h11.Data(data=body))
        await self._send_h11_event(h11.EndOfMessage())


class _Locked(trio.abc.HalfCloseableStream):
    """hypercorn may close (send_eof) from one task while another still writes a reply:
    trio refuses two senders at once (BusyResourceError), so they take turns."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.socket = stream.socket  # hypercorn reads the peer's address from it
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
        await self.stream.aclose()


class _Server(TCPServer):
    """Ended when its client is gone (hypercorn's own waits for its keep-alive timer)."""

    async def _read_data(self) -> None:
        await super()._read_data()
        await self.idle_task.stop()


class H2C:
    """Serves one connection with hypercorn; ``stop`` closes its idle keep-alives."""

    def __init__(self, app: Any, read_timeout: float) -> None:
        import hypercorn.protocol

        hypercorn.protocol.H11Protocol = _H11  # type: ignore[misc]  # picked by module name
        self.config = hypercorn.config.Config()
        self.config.accesslog = None
        self.config.errorlog = logging.getLogger("evactors.http")
        self.config.keep_alive_timeout = read_timeout
        self.config.read_timeout = read_timeout  # type: ignore[assignment]
        self.config.h11_max_incomplete_size = 64 * 1024
        self.app = wrap_app(app, self.config.wsgi_max_body_size, "asgi")
        self.context = WorkerContext(None)

    async def serve(self, stream: trio.SocketStream) -> None:
        locked: Any = _Locked(stream)
        await _Server(self.app, self.config, self.context, ConnectionState({}), locked)

    async def stop(self) -> None:
        await self.context.terminated.set()

