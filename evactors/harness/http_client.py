"""The senders' HTTP/1.1 client: pre-encoded requests written straight to a keep-alive
connection (an asyncio ``Protocol`` on uvloop), answers parsed by hand — the status, the
two headers the harness reads (``Content-Length``, ``Retry-After``), ``Connection: close``
and chunked bodies. Answers come back in request order, so a connection may pipeline.
No aiohttp on the hot path: its CPU per request was the harness's limit at one event per
request (docs/benchmarks.md, "What the harness costs")."""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass

MAX_HEAD = 64 * 1024  # a longer answer head is not an HTTP server's answer


class HTTPError(ConnectionError):
    """No (complete) answer: the connection was refused, reset, closed early, or spoke no HTTP."""


@dataclass(slots=True)
class Answer:
    status: int
    body: bytes
    retry_after: bytes | None = None


def request_head(method: str, target: str, host: str, headers: dict[str, str]) -> bytes:
    """Everything of a request before its Content-Length value: built once per kind of
    request, the body's length and the body are added per request."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", *(f"{k}: {v}" for k, v in headers.items()),
             "Content-Length: "]
    return "\r\n".join(lines).encode("latin-1")


def encode(head: bytes, body: bytes) -> bytes:
    return b"%b%d\r\n\r\n%b" % (head, len(body), body)


class Connection(asyncio.Protocol):
    """One connection: ``send`` writes a request and waits for its answer; answers are matched
    to requests in order (pipelining works: several requests may be in flight)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiting: collections.deque[asyncio.Future[Answer]] = collections.deque()
        self.buffer = bytearray()
        self.closed = False
        self.answers = 0  # answers received on this connection (keep-alive reuse)
        self._head: tuple[int, int, bytes | None, bool, bool] | None = None  # status, length, retry, close, chunked

    # -- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            while self.waiting and self._parse():
                pass
        except (HTTPError, ValueError) as e:
            self._fail(e if isinstance(e, HTTPError) else HTTPError(f"bad answer: {e}"))
        if self.buffer and not self.waiting and not self.closed:
            self._fail(HTTPError("an answer to no request"))

    def eof_received(self) -> bool:
        self._fail(HTTPError("the server closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(HTTPError(f"connection lost: {exc}" if exc else "connection closed"))

    # -- use -----------------------------------------------------------------------------
    def send(self, data: bytes) -> asyncio.Future[Answer]:
        """Write one encoded request; the future is its answer (or an ``HTTPError``)."""
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        if self.closed or self.transport is None:
            future.set_exception(HTTPError("connection closed"))
            return future
        self.waiting.append(future)
        self.transport.write(data)
        return future

    def expire(self) -> None:
        """No answer in time: the connection goes (later answers could not be matched)."""
        self._fail(TimeoutError("no answer in time"))

    def _fail(self, error: Exception) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)

    def _parse(self) -> bool:
        """One whole answer off the buffer, to the oldest waiting request; False: need more."""
        buffer = self.buffer
        if self._head is None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD:
                    raise HTTPError("answer head too long")
                return False
            lines = bytes(buffer[:end]).split(b"\r\n")
            del buffer[:end + 4]
            parts = lines[0].split(b" ", 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
                raise HTTPError(f"not an HTTP answer: {lines[0][:80]!r}")
            status = int(parts[1])
            length, retry, close, chunked = 0, None, parts[0] == b"HTTP/1.0", False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"retry-after":
                    retry = value.strip()
                elif name == b"connection":
                    close = value.strip().lower() == b"close"
                elif name == b"transfer-encoding":
                    chunked = b"chunked" in value.lower()
            if 100 <= status < 200:  # an interim answer (100 Continue): the final one follows
                return True
            self._head = (status, length, retry, close, chunked)
        status, length, retry, close, chunked = self._head
        if chunked:
            body = self._chunked()
            if body is None:
                return False
        else:
            if len(buffer) < length:
                return False
            body = bytes(buffer[:length])
            del buffer[:length]
        self._head = None
        self.answers += 1
        future = self.waiting.popleft()
        if not future.done():
            future.set_result(Answer(status, body, retry))
        if close:
            self._fail(HTTPError("the server closed the connection after its answer"))
            return False
        return True

    def _chunked(self) -> bytes | None:
        """A whole chunked body (trailers ignored) or None, the buffer left as it was."""
        buffer, at, body = self.buffer, 0, bytearray()
        while True:
            eol = buffer.find(b"\r\n", at)
            if eol < 0:
                return None
            size = int(bytes(buffer[at:eol]).split(b";")[0], 16)
            if size == 0:
                end = buffer.find(b"\r\n\r\n", eol)
                if end < 0:
                    return None
                del buffer[:end + 4]
                return bytes(body)
            if len(buffer) < eol + 2 + size + 2:
                return None
            body += buffer[eol + 2:eol + 2 + size]
            at = eol + 2 + size + 2


class Client:
    """A lane's connection to one host: opened when needed, reopened after it failed or the
    server closed it; ``timeout`` per answer (then the connection is dropped: answers after it
    could not be matched)."""

    def __init__(self, host: str, port: int, timeout: float, unix_path: str | None = None) -> None:
        self.host, self.port, self.timeout, self.unix_path = host, port, timeout, unix_path
        self.connection: Connection | None = None
        self.connects = 0

    async def _open(self) -> Connection:
        loop = asyncio.get_running_loop()
        if self.unix_path:
            _, protocol = await loop.create_unix_connection(Connection, self.unix_path)
        else:
            _, protocol = await loop.create_connection(Connection, self.host, self.port)
        self.connects += 1
        self.connection = protocol
        return protocol

    async def _connection(self) -> Connection:
        connection = self.connection
        if connection is None or connection.closed:  # (wait_for costs a task: only to connect)
            try:
                connection = await asyncio.wait_for(self._open(), self.timeout)
            except OSError as e:
                raise HTTPError(str(e)) from e
        return connection

    async def request(self, data: bytes) -> Answer:
        """One encoded request and its answer; ``HTTPError`` or ``TimeoutError`` without one."""
        connection = await self._connection()
        future = connection.send(data)
        timer = asyncio.get_running_loop().call_later(self.timeout, connection.expire)
        try:
            return await future
        finally:
            timer.cancel()

    def pipeline(self, requests: list[bytes]) -> list[asyncio.Future[Answer]]:
        """Several requests written at once on the open connection (answers in order)."""
        assert self.connection is not None and not self.connection.closed, "connect first"
        return [self.connection.send(data) for data in requests]

    async def connect(self) -> None:
        await self._connection()

    def close(self) -> None:
        if self.connection is not None and not self.connection.closed:
            self.connection.closed = True
            if self.connection.transport is not None:
                self.connection.transport.close()
