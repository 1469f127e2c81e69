"""The HTTP/1.1 server (service/http/connection.py, server.py) on real sockets, with a small
ASGI app: pipelining in order, chunked bodies, 100-continue, HTTP/1.0, HEAD, streaming,
the head bounds and deadlines, hang-ups, an app's error, and the graceful stop."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from evactors.core.limits import ConnectionCount
from evactors.service.http.connection import MAX_HEAD, MAX_HEADERS, MAX_TARGET
from evactors.service.http.server import Listener, bind_socket

Scope = dict[str, Any]


async def echo(scope: Scope, receive: Callable[[], Awaitable[dict[str, Any]]],
               send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
    """Answers with what it saw: method, path, query, the body's length and its first bytes."""
    path = scope["path"]
    if path == "/fail":
        raise RuntimeError("the app failed")
    if path == "/stream":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for i in range(3):
            await send({"type": "http.response.body", "body": b"data: %d\n\n" % i, "more_body": True})
        gone = await receive()
        assert gone["type"] == "http.disconnect"
        return
    if path == "/refuse":  # answers before reading the body, as a 401 does
        body = b'{"error":"unauthorized"}'
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
        return
    chunks, event = [], {"more_body": True}
    while event.get("more_body"):
        event = await receive()
        if event["type"] == "http.disconnect":
            SEEN.append("disconnect")
            return
        chunks.append(event.get("body", b""))
    if path == "/slow":
        await trio.sleep(0.5)
    body = b"".join(chunks)
    reply = json.dumps({"method": scope["method"], "path": path, "query": scope["query_string"].decode(),
                        "length": len(body), "start": body[:20].decode(errors="replace"),
                        "version": scope["http_version"]}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(reply)).encode())]})
    await send({"type": "http.response.body", "body": reply})


SEEN: list[str] = []


@asynccontextmanager
async def served(read_timeout: float = 5.0, graceful: float = 2.0) -> AsyncIterator[tuple[int, trio.Event]]:
    sock = bind_socket("127.0.0.1:0")
    port = sock.getsockname()[1]
    stop = trio.Event()
    listener = Listener(echo, ConnectionCount(100, 50), 1, read_timeout, graceful, counted=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(listener.serve, [sock], stop.wait)
        yield port, stop
        stop.set()


class Client:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _fill(self) -> bool:
        data = await self.stream.receive_some(65536)
        self.buffer += data
        return bool(data)

    async def response(self, to_head: bool = False) -> tuple[int, dict[str, str], bytes]:
        """The next response (status 0: the connection closed first); ``to_head``: to a HEAD."""
        with trio.fail_after(10):
            while b"\r\n\r\n" not in self.buffer:
                if not await self._fill():
                    return 0, {}, self.buffer
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            if to_head:
                body = b""
            elif "content-length" in headers:
                n = int(headers["content-length"])
                while len(self.buffer) < n:
                    if not await self._fill():
                        break
                body, self.buffer = self.buffer[:n], self.buffer[n:]
            elif headers.get("transfer-encoding") == "chunked":
                body = b""
                while True:
                    while b"\r\n" not in self.buffer:
                        await self._fill()
                    size_line, _, self.buffer = self.buffer.partition(b"\r\n")
                    size = int(size_line, 16)
                    while len(self.buffer) < size + 2:
                        await self._fill()
                    body += self.buffer[:size]
                    self.buffer = self.buffer[size + 2:]
                    if size == 0:
                        break
            else:
                body = self.buffer if status < 200 or status in (204, 304) else b""
            return status, headers, body

    async def closed(self) -> bool:
        """True when the server closes the connection (no more bytes) within 10 s."""
        with trio.move_on_after(10):
            try:
                while await self._fill():
                    pass
            except trio.BrokenResourceError:
                pass
            return True
        return False


async def connect(port: int) -> Client:
    return Client(await trio.open_tcp_stream("127.0.0.1", port))


async def test_pipelined_requests_are_answered_in_order_on_one_connection() -> None:
    async with served() as (port, _):
        client = await connect(port)
        await client.send(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nfirst"
                          b"GET /second?a=1 HTTP/1.1\r\nHost: x\r\n\r\n"
                          b"POST /third HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                          b"3\r\nthi\r\n2\r\nrd\r\n0\r\n\r\n"
                          b"GET /fourth HTTP/1.1\r\nHost: x\r\n\r\n")
        answers = [await client.response() for _ in range(4)]
        assert [json.loads(b)["path"] for _, _, b in answers] == ["/slow", "/second", "/third", "/fourth"]
        assert json.loads(answers[0][2])["start"] == "first"  # the slow one first, though later ones were ready
        assert json.loads(answers[1][2])["query"] == "a=1"
        assert json.loads(answers[2][2])["start"] == "third" and json.loads(answers[2][2])["length"] == 5
        assert all(status == 200 for status, _, _ in answers)
        await client.send(b"GET /fifth HTTP/1.1\r\nHost: x\r\n\r\n")  # still open: keep-alive
        assert json.loads((await client.response())[2])["path"] == "/fifth"


async def test_a_chunked_body_arriving_in_pieces_and_expect_100_continue() -> None:
    async with served() as (port, _):
        client = await connect(port)
        await client.send(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel")
        await trio.sleep(0.1)
        await client.send(b"lo\r\n6\r\n world\r\n0\r\n\r\n")
        status, _, body = await client.response()
        assert status == 200 and json.loads(body)["length"] == 11 and json.loads(body)["start"] == "hello world"
        await client.send(b"POST /up HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
        status, _, _ = await client.response()
        assert status == 100  # asked for by the app reading the body: now the client sends it
        await client.send(b"body")
        status, _, body = await client.response()
        assert status == 200 and json.loads(body)["start"] == "body"


async def test_a_refusal_before_the_body_sends_no_100_and_closes() -> None:
    async with served() as (port, _):
        client = await connect(port)
        await client.send(b"POST /refuse HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                          b"Content-Length: 100000\r\n\r\n")
        status, headers, _ = await client.response()
        assert status == 401 and headers["connection"] == "close"
        assert await client.closed()


async def test_refused_uploads_linger_a_moment_but_only_so_many_at_once(monkeypatch: Any) -> None:
    """After a refusal the server reads what the client still sends for a moment (so the
    answer is not lost to a reset); a burst of refusals can't make it hold a socket each."""
    from evactors.service.http import connection

    monkeypatch.setattr(connection, "MAX_LINGERING", 2)
    head = b"POST /refuse HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
    lasted: dict[int, float] = {}

    async def uploading(i: int, client: Client) -> None:
        """The body keeps coming, 1 KB every 10 ms, until the server's close resets it."""
        started = trio.current_time()
        try:
            while trio.current_time() - started < 3:
                await client.send(b" " * 1000)
                await trio.sleep(0.01)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        lasted[i] = trio.current_time() - started

    async with served() as (port, _):
        clients = [await connect(port) for _ in range(3)]
        async with trio.open_nursery() as nursery:
            for i, client in enumerate(clients):
                await client.send(head)
                assert (await client.response())[0] == 401
                nursery.start_soon(uploading, i, client)
    assert lasted[0] >= 0.4 and lasted[1] >= 0.4, lasted  # lingering while the body comes (0.5 s)
    assert lasted[2] < 0.25, lasted  # the third: closed at once


async def test_http_1_0_closes_unless_kept_alive_and_head_has_no_body() -> None:
    async with served() as (port, _):
        client = await connect(port)
        await client.send(b"GET /old HTTP/1.0\r\n\r\n")
        status, headers, body = await client.response()
        assert status == 200 and json.loads(body)["version"] == "1.0" and headers["connection"] == "close"
        assert await client.closed()
        client = await connect(port)
        await client.send(b"GET /old HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        status, headers, _ = await client.response()
        assert headers["connection"] == "keep-alive"
        await client.send(b"HEAD /head HTTP/1.1\r\nHost: x\r\n\r\nGET /after HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = await client.response(to_head=True)
        assert status == 200 and int(headers["content-length"]) > 0
        status, _, body = await client.response()  # the HEAD's answer had no body: this follows at once
        assert json.loads(body)["path"] == "/after"
        await client.send(b"GET /close HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, headers, _ = await client.response()
        assert status == 200 and headers["connection"] == "close" and await client.closed()


async def test_a_streamed_answer_is_chunked_and_ends_when_the_client_goes() -> None:
    SEEN.clear()
    async with served() as (port, _):
        client = await connect(port)
        await client.send(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(5):
            while client.buffer.count(b"data: ") < 3:
                await client._fill()
        assert b"transfer-encoding: chunked" in client.buffer
        await client.stream.aclose()
        other = await connect(port)  # the listener serves on
        await other.send(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await other.response())[0] == 200


async def test_bad_requests_get_a_json_error_and_the_connection_closes() -> None:
    cases = [
        (b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc", 400),
        (b"NOT HTTP AT ALL\r\n\r\n", 400),
        (b"POST /x HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc", 400),
        (b"GET /" + b"a" * (MAX_TARGET + 10) + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\n" + b"".join(b"x-h%d: v\r\n" % i for i in range(MAX_HEADERS + 1)) + b"\r\n", 431),
        (b"GET / HTTP/1.1\r\nx-big: " + b"b" * (MAX_HEAD + 1000) + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nx-endless: " + b"b" * (3 * MAX_HEAD), 431),  # never ends: cut, not buffered
    ]
    async with served() as (port, _):
        for request, expected in cases:
            client = await connect(port)
            try:
                await client.send(request)
            except trio.BrokenResourceError:
                pass
            status, headers, body = await client.response()
            assert status == expected, (request[:60], status, body[:200])
            assert headers["content-type"] == "application/json" and json.loads(body)["success"] is False
            assert await client.closed()
        client = await connect(port)
        await client.send(b"GET /fine HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await client.response())[0] == 200


async def test_a_body_that_breaks_http_mid_way_gets_400_not_the_apps_answer(caplog: Any) -> None:
    SEEN.clear()
    async with served() as (port, _):
        client = await connect(port)
        await client.send(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nab")
        await trio.sleep(0.1)  # the app is reading the body by now
        await client.send(b"cd\r\nZZZ-not-a-chunk-size\r\n")
        status, _, body = await client.response()
        assert status == 400 and json.loads(body)["error"] == "bad_request", body
        assert await client.closed()
    assert SEEN == ["disconnect"]  # the app saw the request end
    assert "Traceback" not in caplog.text and "failed" not in caplog.text


async def test_slow_heads_and_idle_connections_are_closed_at_the_deadline() -> None:
    async with served(read_timeout=1.0) as (port, _):
        idle = await connect(port)
        started = trio.current_time()
        assert await idle.closed() and trio.current_time() - started < 2.5
        trickle = await connect(port)
        started = trio.current_time()
        with trio.move_on_after(5):
            for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 100:  # a byte every 0.1 s
                try:
                    await trickle.send(bytes([byte]))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
                await trio.sleep(0.1)
        assert trio.current_time() - started < 2.5  # the deadline is for the whole head
        assert await trickle.closed() and trickle.buffer == b""  # closed silently
        kept = await connect(port)  # after an answer the deadline starts again
        await kept.send(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await kept.response())[0] == 200
        await trio.sleep(0.6)
        await kept.send(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await kept.response())[0] == 200


async def test_a_hang_up_mid_body_and_an_app_error_never_end_the_listener() -> None:
    SEEN.clear()
    async with served() as (port, _):
        for _ in range(20):
            client = await connect(port)
            await client.send(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 90000\r\n\r\n{")
            await trio.sleep(0.01)
            await client.stream.aclose()
        with trio.fail_after(5):
            while len(SEEN) < 20:
                await trio.sleep(0.05)
        assert SEEN == ["disconnect"] * 20  # the app saw each client go
        client = await connect(port)
        await client.send(b"GET /fail HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = await client.response()
        assert status == 500 and json.loads(body)["error"] == "internal_error"
        client = await connect(port)
        await client.send(b"GET /fine HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await client.response())[0] == 200


async def test_a_graceful_stop_finishes_in_flight_requests_and_closes_idle_ones() -> None:
    sock = bind_socket("127.0.0.1:0")
    port = sock.getsockname()[1]
    stop = trio.Event()
    listener = Listener(echo, ConnectionCount(100, 50), 1, 30.0, 3.0, counted=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(listener.serve, [sock], stop.wait)
        idle = await connect(port)
        await idle.send(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await idle.response())[0] == 200  # now idle, kept alive
        busy = await connect(port)
        await busy.send(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok")
        await trio.sleep(0.1)
        started = trio.current_time()
        stop.set()
        status, headers, body = await busy.response()  # answered, and told the connection ends
        assert status == 200 and json.loads(body)["start"] == "ok" and headers["connection"] == "close"
        assert await idle.closed() and await busy.closed()
    assert trio.current_time() - started < 2  # well within the graceful deadline
    with socket.socket() as late:  # no longer listening
        assert late.connect_ex(("127.0.0.1", port)) != 0
