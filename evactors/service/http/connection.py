"""One HTTP/1.1 connection: requests parsed by llhttp (``httptools``), each served in turn
by an ASGI app, so pipelined requests are answered in order.

Why our own: hypercorn (h11 underneath) cost 1.2–1.6 ms of CPU per request on this
machine, a minimal h11 server ~0.3 ms, llhttp on trio streams 0.07–0.1 ms
(docs/benchmarks.md, "HTTP layer"); at one event per request that was most of the
service's time.

One task per connection reads and answers: it reads the socket only when it needs bytes
(the next request's head, or the body the app asks for), so a client can make it hold at
most one read (64 KB) beyond what the app asked for; while a streaming answer waits for its
client to leave, ``MAX_QUEUED`` pipelined requests (``MAX_QUEUED_BYTES`` of bodies). The
bounds (docs/operations.md, Limits):

- head: from the connection's start, or the end of its last response, to the last header
  of the next request, ``read_timeout`` in total (slowloris; an idle keep-alive connection
  is closed after it too, silently); 64 KB of head at most and ``MAX_HEADERS`` headers
  (``431``), a request target of ``MAX_TARGET`` bytes (``414``); anything llhttp refuses
  (a bad request line, ``Content-Length`` with ``Transfer-Encoding``, two lengths…): ``400``;
- body: each read within ``read_timeout`` (else the app sees ``http.disconnect``); the
  whole body's deadline and the budget of all bodies are the app's (``request.BodyBounds``);
- ``Expect: 100-continue`` is answered when the app first asks for the body, never when it
  refuses before (it then says ``Connection: close``);
- a body the app did not read (a refusal) ends the connection after the answer, unless it
  had already arrived whole;
- a client gone mid-request is ``http.disconnect`` for the app and what it sends then is
  dropped: a hang-up never raises out of here.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

import httptools
import msgspec
import trio

log = logging.getLogger("evactors.http")

RECEIVE_BYTES = 65536
MAX_HEAD = 64 * 1024  # bytes of a request's line and headers
MAX_HEADERS = 128
MAX_TARGET = 16 * 1024  # bytes of the request target (path and query)
MAX_QUEUED = 64  # pipelined requests parsed ahead of the one being answered
MAX_QUEUED_BYTES = 256 * 1024  # and their bodies
LINGER_SECONDS = 0.5  # reading what a client still sends after the last answer
LINGER_BYTES = 1 << 20
# ... and closing once nothing came for this long: what was in flight has arrived, and a
# client that keeps a refused connection open costs a socket for this long, not the linger.
LINGER_QUIET_SECONDS = 0.1
MAX_LINGERING = 64  # connections of a listener lingering at once; past it, close at once

ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[dict[str, Any]]],
                    Callable[[dict[str, Any]], Awaitable[None]]], Awaitable[None]]

_ERRORS = {
    400: ("bad_request", "the request is not valid HTTP/1.1"),
    413: ("request_too_large", "the request is too large"),
    414: ("uri_too_long", f"the request target is too long ({MAX_TARGET // 1024} KB at most)"),
    431: ("headers_too_large", f"the request's headers are too large ({MAX_HEAD // 1024} KB, "
          f"{MAX_HEADERS} headers at most)"),
    500: ("internal_error", "the server failed to answer this request"),
}
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_ASGI = {"version": "3.0", "spec_version": "2.3"}
_DISCONNECT = {"type": "http.disconnect"}


class _Date:
    """The ``Date`` header, formatted once a second."""

    second = -1
    value = b""

    @classmethod
    def now(cls) -> bytes:
        second = int(time.time())
        if second != cls.second:
            cls.second, cls.value = second, formatdate(second, usegmt=True).encode()
        return cls.value


class Refused(Exception):
    """A request that cannot be parsed or is over a bound: answered with ``status``, then closed."""

    def __init__(self, status: int, detail: str = "") -> None:
        super().__init__(status, detail)
        self.status = status
        self.detail = detail


def error_body(status: int, detail: str = "") -> bytes:
    code, message = _ERRORS.get(status, _ERRORS[400])
    return msgspec.json.encode({"success": False, "error": code,
                                "message": f"{message}: {detail}" if detail else message})


class Request:
    """A request as parsed: its head, and its body as it arrives."""

    __slots__ = (
        "body",
        "body_bytes",
        "complete",
        "expect_continue",
        "headers",
        "keep_alive",
        "method",
        "target",
        "version",
    )

    def __init__(self) -> None:
        self.method = ""
        self.target = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.version = "1.1"
        self.keep_alive = True
        self.expect_continue = False
        self.body: list[bytes] = []
        self.body_bytes = 0
        self.complete = False


class Settings:
    """What every connection of a listener shares."""

    def __init__(self, read_timeout: float, scheme: str = "http") -> None:
        self.read_timeout = read_timeout if read_timeout > 0 else math.inf
        self.scheme = scheme
        self.closing = False  # the listener is stopping: answer what is in flight, then close
        self.idle: set[trio.CancelScope] = set()  # connections waiting for a next request
        self.lingering = 0  # connections reading what a client sends after their last answer

    def stop(self) -> None:
        """Close idle connections now, every other one after its current answer."""
        self.closing = True
        for scope in list(self.idle):
            scope.cancel()


class Connection:
    """The HTTP/1.1 server of one accepted stream (``run``); the parser's callbacks."""

    def __init__(self, stream: trio.abc.Stream, app: ASGIApp, settings: Settings,
                 client: tuple[str, int] | None, server: tuple[str, int] | None) -> None:
        self.stream = stream
        self.app = app
        self.settings = settings
        self.client = client
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.parsing: Request | None = None  # the request whose head or body is being parsed
        self.ready: deque[Request] = deque()  # heads complete, not yet answered
        self.in_head = False  # a request's line and headers are being parsed
        self.head_bytes = 0  # of the head being parsed: its target and headers
        self.head_fed = 0  # bytes fed while its head was being parsed
        self.eof = False  # the client closed its side (or broke the connection)
        self.broken = False  # nothing more can be sent
        self.sending = trio.StrictFIFOLock()  # a streaming app may send from two tasks

    # --- llhttp's callbacks -------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.parsing = Request()
        self.in_head, self.head_bytes, self.head_fed = True, 0, 0

    def on_url(self, url: bytes) -> None:
        assert self.parsing is not None
        self.parsing.target += url
        self.head_bytes += len(url)
        if len(self.parsing.target) > MAX_TARGET:
            raise Refused(414)

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.parsing is not None
        headers = self.parsing.headers
        self.head_bytes += len(name) + len(value) + 4
        if len(headers) >= MAX_HEADERS or self.head_bytes > MAX_HEAD:
            raise Refused(431)
        headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        request = self.parsing
        assert request is not None
        self.in_head = False
        request.method = self.parser.get_method().decode("ascii")
        request.version = self.parser.get_http_version()
        request.keep_alive = self.parser.should_keep_alive()
        for name, value in request.headers:
            if name == b"expect" and value.lower() == b"100-continue":
                request.expect_continue = True
        self.ready.append(request)

    def on_body(self, body: bytes) -> None:
        request = self.parsing
        assert request is not None
        request.body.append(body)
        request.body_bytes += len(body)

    def on_message_complete(self) -> None:
        assert self.parsing is not None
        self.parsing.complete = True
        self.parsing = None

    # --- reading ---------------------------------------------------------------------
    def _feed(self, data: bytes | bytearray) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            # Upgrade (h2c, websocket) is not served: the request is answered in HTTP/1.1,
            # and what follows it is parsed as the next request
            self.parser = httptools.HttpRequestParser(self)
            rest = data[e.args[0]:] if e.args and isinstance(e.args[0], int) else b""
            if rest:
                self._feed(rest)
            return
        except httptools.HttpParserCallbackError as e:
            if isinstance(e.__context__, Refused):
                raise e.__context__ from None
            raise Refused(400, str(e)) from None
        except httptools.HttpParserError as e:
            last = self.ready[-1] if self.ready else None
            if last is not None and last.complete and not last.keep_alive and self.parsing is None:
                self.eof = True  # bytes after a request that closes the connection: ignored
                return
            raise Refused(400, str(e)) from None
        if self.in_head:  # bounds what llhttp buffers of a head that never ends
            self.head_fed += len(data)
            if self.head_fed > MAX_HEAD + RECEIVE_BYTES:
                raise Refused(431)

    async def _read(self) -> bytes | bytearray:
        """What the client sent next; empty when it is gone (an end, a reset, a close)."""
        try:
            return await self.stream.receive_some(RECEIVE_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return b""

    async def _receive(self) -> bool:
        """Read once into the parser, within ``read_timeout``; False: the client is gone."""
        if self.eof:
            return False
        with trio.move_on_after(self.settings.read_timeout):
            data = await self._read()
            if not data:
                self.eof = True
                return False
            self._feed(data)
            return True
        self.eof = True  # silent for too long
        return False

    async def _next_request(self) -> Request | None:
        """The next request's head, within ``read_timeout`` from now (None: close)."""
        if self.ready:
            return self.ready[0]
        if self.eof or self.settings.closing:
            return None
        with trio.move_on_after(self.settings.read_timeout) as deadline:
            idle = self.parsing is None
            if idle:  # nothing of a next request yet: a graceful stop closes it at once
                self.settings.idle.add(deadline)
            try:
                while not self.ready:
                    data = await self._read()
                    if not data:
                        self.eof = True
                        return None
                    if idle:
                        self.settings.idle.discard(deadline)
                        idle = False
                    self._feed(data)
            finally:
                self.settings.idle.discard(deadline)
        return self.ready[0] if self.ready else None

    # --- writing ---------------------------------------------------------------------
    async def _send(self, data: bytes) -> None:
        if self.broken:
            return
        async with self.sending:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                self.broken = True
            except trio.Cancelled:
                self.broken = True  # a half-sent answer: this connection cannot go on
                raise

    async def _refuse(self, status: int, detail: str = "") -> None:
        body = error_body(status, detail)
        await self._send(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                         b"connection: close\r\ndate: %s\r\n\r\n%s"
                         % (status, _REASONS.get(status, b""), len(body), _Date.now(), body))

    # --- serving ---------------------------------------------------------------------
    async def run(self) -> None:
        """Serve requests until the client or the listener closes the connection."""
        try:
            while True:
                request = await self._next_request()
                if request is None or not await self._serve(request):
                    break
        except Refused as e:
            await self._refuse(e.status, e.detail)
        await self._linger()

    async def _linger(self) -> None:
        """Half-close, then read what the client still sends for a moment (until it is quiet):
        closing with unread bytes would be a reset, which may destroy the answer in flight."""
        if self.broken or self.settings.lingering >= MAX_LINGERING:
            return  # a burst of refusals: each closes at once rather than hold a socket
        self.settings.lingering += 1
        try:
            await self._drain_after_answer()
        finally:
            self.settings.lingering -= 1

    async def _drain_after_answer(self) -> None:
        with trio.move_on_after(LINGER_SECONDS):
            try:
                if isinstance(self.stream, trio.abc.HalfCloseableStream):
                    await self.stream.send_eof()
                drained = 0
                while not self.eof and drained < LINGER_BYTES:
                    data: bytes | bytearray = b""
                    with trio.move_on_after(LINGER_QUIET_SECONDS):
                        data = await self.stream.receive_some(RECEIVE_BYTES)
                    if not data:
                        break
                    drained += len(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError, OSError):
                pass

    def _scope(self, request: Request) -> dict[str, Any]:
        path, _, query = request.target.partition(b"?")
        raw = path.decode("latin-1")
        return {
            "type": "http", "asgi": _ASGI, "http_version": request.version, "method": request.method,
            "scheme": self.settings.scheme, "path": unquote(raw) if "%" in raw else raw,
            "raw_path": path, "query_string": query, "root_path": "", "headers": request.headers,
            "client": self.client, "server": self.server,
        }

    async def _serve(self, request: Request) -> bool:
        """Run the app on ``request``; True when the connection may carry another."""
        state = _Exchange(self, request)
        try:
            await self.app(self._scope(request), state.receive, state.send)
        except Exception:
            if state.refused is None:
                log.exception("HTTP request %s %r failed", request.method, request.target[:200])
            if state.started and state.refused is None:
                self.broken = True
            else:
                await self._refuse(500 if state.refused is None else state.refused.status)
                return False
        if state.refused is not None:  # its body was not valid HTTP/1.1: the app's answer was dropped
            await self._refuse(state.refused.status, state.refused.detail)
            return False
        if not state.finished:
            if not state.started:
                await self._refuse(500)
                return False
            self.broken = True  # an unfinished answer: only closing ends it
        self.ready.popleft()
        return (not self.broken and not state.close and request.complete
                and not self.settings.closing and not self.eof)


class _Exchange:
    """One request's ASGI ``receive`` and ``send``."""

    __slots__ = (
        "chunked",
        "close",
        "conn",
        "continued",
        "delivered",
        "finished",
        "head",
        "head_only",
        "refused",
        "request",
        "started",
    )

    def __init__(self, conn: Connection, request: Request) -> None:
        self.conn = conn
        self.request = request
        self.started = False
        self.finished = False
        self.close = not request.keep_alive
        self.chunked = False
        self.head = b""
        self.continued = not request.expect_continue
        self.head_only = request.method == "HEAD"
        self.delivered = False  # the body's last part was handed to the app
        self.refused: Refused | None = None  # the body broke HTTP/1.1

    async def receive(self) -> dict[str, Any]:
        request, conn = self.request, self.conn
        if self.finished:
            return _DISCONNECT
        if self.delivered:  # the body is done: the next event is the client going away
            return await self._wait_disconnect()
        if not request.body and not request.complete:
            if not self.continued and request.version != "1.0":
                self.continued = True
                await conn._send(b"HTTP/1.1 100 Continue\r\n\r\n")
            while not request.body and not request.complete:
                try:
                    if not await conn._receive():
                        return _DISCONNECT
                except Refused as e:  # a bad chunk: the answer is this refusal, not the app's
                    self.refused, conn.eof = e, True
                    return _DISCONNECT
        body = request.body
        chunk = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        self.delivered = request.complete
        return {"type": "http.request", "body": chunk, "more_body": not request.complete}

    async def _wait_disconnect(self) -> dict[str, Any]:
        """Until the client closes (a streaming answer's watch); a pipelined next request is
        parsed meanwhile, up to a bound past which nothing more is read."""
        conn = self.conn
        while not conn.eof:
            if len(conn.ready) > MAX_QUEUED or sum(r.body_bytes for r in conn.ready) > MAX_QUEUED_BYTES:
                await trio.sleep_forever()  # the app's own watch (or the stop) ends it
            try:
                data = await conn.stream.receive_some(RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                data = b""
            if not data:
                conn.eof = True
                break
            try:
                conn._feed(data)
            except Refused:
                conn.eof = True  # a bad next request: this connection ends with this answer
        return _DISCONNECT

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        conn = self.conn
        if self.refused is not None:
            return
        if kind == "http.response.start":
            if self.started:
                raise RuntimeError("http.response.start sent twice")
            self.started = True
            status = message["status"]
            lines = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b""))]
            length = False
            for name, value in message.get("headers", ()):
                lowered = name.lower()
                if lowered == b"content-length":
                    length = True
                elif lowered == b"connection":
                    if b"close" in value.lower():
                        self.close = True
                    continue  # written below, once
                lines.append(b"%s: %s\r\n" % (name, value))
            if self.request.version == "1.0" and not length and not self.head_only:
                self.close = True  # no chunked encoding in HTTP/1.0: the close ends the body
            elif not length and status >= 200 and status not in (204, 304) and not self.head_only:
                self.chunked = True
                lines.append(b"transfer-encoding: chunked\r\n")
            if not self.request.complete:
                self.close = True  # answered before its body arrived: it cannot be skipped
            if conn.settings.closing:
                self.close = True
            if self.close:
                lines.append(b"connection: close\r\n")
            elif self.request.version == "1.0":
                lines.append(b"connection: keep-alive\r\n")
            lines.append(b"date: %s\r\n\r\n" % _Date.now())
            self.head = b"".join(lines)
        elif kind == "http.response.body":
            if not self.started or self.finished:
                raise RuntimeError("http.response.body outside a response")
            body = message.get("body", b"")
            more = message.get("more_body", False)
            if self.head_only:
                body = b""
            elif self.chunked:
                body = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + (b"" if more else b"0\r\n\r\n")
            if not more:
                self.finished = True
            if self.head:
                body, self.head = self.head + body, b""
            if body:
                await conn._send(body)
