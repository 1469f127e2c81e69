"""Ingest: the Segment-compatible HTTP API, served by hypercorn on trio.

A request is answered ``200`` only after its events are durable in Redis: one stream
entry per request (one MULTI with the backlog counter; WAITAOF too in ``strict`` mode).
The events then go to the enricher pool over a bounded channel, so a slow pipeline slows
the answers instead of piling up memory. Past the backlog high-water mark, or with Redis
away, the answer is ``503`` with ``Retry-After``: nothing is accepted that cannot be kept.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

import msgspec
import redis
import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import logs, metrics
from .bots import header_describes_sender
from .cleanup import Backlog
from .clickhouse import ClickHouse
from .config import Config
from .live import PAGE, Full, LiveHub
from .messages import IngestBatch, Receipt
from .model import Context, Incoming
from .redis_io import TRANSIENT, Keys, RedisIO
from .replay import InFlight
from .resp import Script
from .segment import ENDPOINTS, Peer, RequestError, body_write_key, decompress, parse

log = logging.getLogger("evactors.ingest")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_encode = msgspec.json.Encoder(enc_hook=str).encode
_SAFE_ID = re.compile(r"[A-Za-z0-9._-]+")
_CORS = [
    (b"access-control-allow-origin", b"*"),
    (b"access-control-allow-methods", b"POST, OPTIONS"),
    (b"access-control-allow-headers", b"Content-Type, Authorization, Content-Encoding"),
    (b"access-control-max-age", b"86400"),
]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class WriteKeys:
    """Write key → project. Keys are compared by their SHA-256 digests, so lookup time
    does not depend on how much of a guessed key is right. Replaceable at run time."""

    def __init__(self, keys: dict[str, str]) -> None:
        self.replace(keys)

    def replace(self, keys: dict[str, str]) -> None:
        self._by_digest = {_digest(k): p for k, p in keys.items()}

    def projects(self) -> list[str]:
        return list(self._by_digest.values())

    def project(self, key: str | None) -> str | None:
        if not key:
            return None
        return self._by_digest.get(_digest(key))


class AdminToken:
    def __init__(self, token: str) -> None:
        self.token = token

    def check(self, header: str) -> bool:
        scheme, _, value = header.partition(" ")
        return (bool(self.token) and scheme.lower() == "bearer"
                and hmac.compare_digest(value.strip(), self.token))


# KEYS: ingest stream, its counter. ARGV: events, blob. Atomic: the entry and the count.
APPEND = """
local id = redis.call('XADD', KEYS[1], '*', 'n', ARGV[1], 'e', ARGV[2])
redis.call('INCRBY', KEYS[2], tonumber(ARGV[1]))
return id
"""


class _Append:
    """One request's entry waiting in a group commit: its outcome, and its turn."""

    __slots__ = ("blob", "done", "entry_id", "error", "events", "turn")

    def __init__(self, events: list[Incoming], blob: bytes) -> None:
        self.events, self.blob = events, blob
        self.turn = trio.Event()  # set when this entry's outcome is known, or it is to lead
        self.done = False
        self.entry_id = ""
        self.error: BaseException | None = None


class DurableLog:
    """Appends accepted events to the ingest stream; returns once Redis has them.

    Group commit: requests that arrive while a write is in flight are written together
    by the next one, in one pipeline (one thread hop, one round trip), each still as its
    own stream entry, and each request is answered from its own command's reply. No
    background task: the first waiting request leads the next group, so a group is never
    left without a writer. Waiting is shielded like the thread call it replaces (which
    could not be interrupted either): a leader is never lost to a cancelled request."""

    MAX_GROUP = 64  # requests (≤ 500 KB each) in one pipeline: bounded work per round trip

    def __init__(self, redis: RedisIO, keys: Keys, wait_aof: bool) -> None:
        self.redis = redis
        self.keys = keys
        self.wait_aof = wait_aof
        self.script = Script(APPEND)
        self._queue: list[_Append] = []
        self._busy = False

    async def append(self, events: list[Incoming], blob: bytes) -> Receipt:
        """Store ``events`` (``blob``: their msgpack array) as one stream entry. In strict
        mode WAITAOF ends the group's pipeline: on the same connection, so it waits for
        *these* writes (WAITAOF waits for the writes of its own connection)."""
        item = _Append(events, blob)
        self._queue.append(item)
        with trio.CancelScope(shield=True):
            if self._busy:
                await item.turn.wait()  # a result, or the lead of the next group
            if not item.done:
                self._busy = True
                group, self._queue = self._queue[:self.MAX_GROUP], self._queue[self.MAX_GROUP:]
                try:
                    await self._write(group)
                finally:
                    for waiting in group:
                        if not waiting.entry_id and waiting.error is None:  # never a 200 unwritten
                            waiting.error = TimeoutError("the group commit was interrupted")
                        waiting.done = True
                        waiting.turn.set()
                    if self._queue:
                        self._queue[0].turn.set()  # not done: it leads the next group
                    else:
                        self._busy = False
        if item.error is not None:
            raise item.error
        return Receipt(item.entry_id, len(events))

    async def _write(self, group: list[_Append]) -> None:
        """One pipeline for the group; every entry gets its own id or error. An EVALSHA
        refused with NOSCRIPT (a restarted Redis) ran nothing: those are written again."""
        keys = [self.keys.ingest, self.keys.ingest_count]
        calls = [(keys, [len(item.events), item.blob]) for item in group]
        extra = [["WAITAOF", 1, 0, 5000]] if self.wait_aof else []

        async def go() -> list[Any]:
            replies = await self.redis.scripts(self.script, calls, extra, wait=True)
            if self.wait_aof:
                fsynced = replies.pop()
                if isinstance(fsynced, Exception):
                    raise fsynced
                if int(fsynced[0]) < 1:
                    raise TimeoutError("redis did not fsync the events in time (WAITAOF)")
            return replies

        try:
            replies = await go()
        except Exception as e:  # the connection, or no fsync: none of the group is answered 200
            for item in group:
                item.error = e
            return
        for item, reply in zip(group, replies, strict=True):
            if isinstance(reply, Exception):
                item.error = reply
            else:
                item.entry_id = reply.decode()


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return ""


def _has_body(scope: Scope) -> bool:
    length = _header(scope, b"content-length")
    return (length.isdigit() and int(length) > 0) or bool(_header(scope, b"transfer-encoding"))


def _basic_user(header: str) -> str | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, _, _password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return user or None


class RemapRequest(msgspec.Struct):
    project: str
    pairs: list[tuple[str, str]]


class Ingest:
    def __init__(self, config: Config, write_keys: WriteKeys, log_: DurableLog,
                 outbox: trio.MemorySendChannel[IngestBatch], backlog: Backlog,
                 clickhouse: ClickHouse | None, admin: AdminToken,
                 redis: RedisIO, in_flight: InFlight,
                 status: Callable[[], Awaitable[dict[str, Any]]] | None = None,
                 live: LiveHub | None = None) -> None:
        self.config = config
        self.write_keys = write_keys
        self.durable = log_
        self.outbox = outbox
        self.backlog = backlog
        self.clickhouse = clickhouse
        self.admin = admin
        self.redis = redis
        self.keys = log_.keys
        self.in_flight = in_flight
        self.status = status
        self.live = live
        self.trusted = [ipaddress.ip_network(p, strict=False) for p in config.server.trusted_proxies]

    # --- ASGI ------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        path, method = scope["path"], scope["method"]
        given = _header(scope, b"x-request-id")
        rid = given if 0 < len(given) <= 64 and _SAFE_ID.fullmatch(given) else secrets.token_hex(6)
        logs.request_id.set(rid)  # this request's task only: its log lines carry it
        kind = ENDPOINTS.get(path.rstrip("/"))
        try:
            if kind is not None:
                if method == "OPTIONS":
                    status, headers, body = 204, list(_CORS), b""
                elif method != "POST":
                    raise RequestError(405, "method_not_allowed", f"{path} accepts POST")
                else:
                    status, payload, extra = await self.track(kind, scope, receive)
                    headers, body = list(_CORS) + extra, _encode(payload)
                    headers.append((b"content-type", b"application/json"))
            elif path == "/live/stream" and method == "GET" and self.live is not None:
                await self.live_stream(scope, receive, send)
                return
            else:
                status, headers, body = await self.other(path, method, scope, receive)
        except RequestError as e:
            status, body = e.status, _encode(e.body)
            log.info("refused %s %r: %d %s", method, path, e.status, e.body["error"])
            headers = [(b"content-type", b"application/json")] + (list(_CORS) if kind else [])
            if e.status == 503:
                headers.append((b"retry-after", str(self.config.server.retry_after_seconds).encode()))

        metrics.REQUESTS.labels(kind or "other", str(status)).inc()
        if kind is not None:
            metrics.HTTP_LATENCY.observe(time.perf_counter() - started)
        headers.append((b"content-length", str(len(body)).encode()))
        headers.append((b"x-request-id", rid.encode()))
        if not scope.get("evactors.body_read") and _has_body(scope):
            # answered before reading the request's body (refused early): the connection
            # cannot carry another request, so say so instead of letting the client find out
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _body(self, scope: Scope, receive: Receive, limit: int) -> bytes:
        declared = _header(scope, b"content-length")
        if declared.isdigit() and int(declared) > limit:
            raise RequestError(413, "batch_too_large",
                               f"body is {declared} bytes; the limit is {limit} bytes (500 KB) per request")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RequestError(400, "client_disconnected", "client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise RequestError(413, "batch_too_large",
                                   f"body exceeds the limit of {limit} bytes (500 KB) per request")
            chunks.append(chunk)
            if not message.get("more_body"):
                scope["evactors.body_read"] = True
                return b"".join(chunks)

    def _peer(self, scope: Scope) -> str:
        client = scope.get("client")
        peer = client[0] if client else ""
        if not self.trusted or not peer:
            return peer
        try:
            if not any(ipaddress.ip_address(peer) in net for net in self.trusted):
                return peer
        except ValueError:
            return peer
        for hop in reversed([h.strip() for h in _header(scope, b"x-forwarded-for").split(",") if h.strip()]):
            try:
                if not any(ipaddress.ip_address(hop) in net for net in self.trusted):
                    return hop
            except ValueError:
                return peer
        return peer

    async def track(self, kind: str, scope: Scope,
                    receive: Receive) -> tuple[int, dict[str, Any], list[tuple[bytes, bytes]]]:
        limits = self.config.server
        if self.backlog.cached > limits.high_water_events:
            raise RequestError(503, "backlog_full", "the durable backlog is over its high-water "
                               "mark; retry later", retry_after=limits.retry_after_seconds)
        raw = await self._body(scope, receive, limits.max_batch_bytes)
        body = decompress(raw, _header(scope, b"content-encoding"), limits.max_batch_bytes)
        key = _basic_user(_header(scope, b"authorization")) or body_write_key(body)
        project = self.write_keys.project(key)
        if project is None:
            raise RequestError(401, "unauthorized", "missing write key" if not key else "unknown write key")
        header_ua = _header(scope, b"user-agent")
        if header_describes_sender(header_ua):
            header_ua = ""  # curl, an SDK's HTTP client…: the sender, not a visitor
        peer = Peer(self._peer(scope), header_ua, int(time.time() * 1000))
        parsed = parse(kind, body, project, peer, limits.max_event_bytes)
        for rejected in parsed.rejected:
            metrics.EVENTS_REJECTED.labels(rejected.field).inc()
        if parsed.events:
            try:
                receipt = await self.durable.append(parsed.events, parsed.stored_form())
            except (*TRANSIENT, TimeoutError, redis.ResponseError) as e:  # OOM, MISCONF, READONLY…
                log.warning("cannot store events, answering 503: %s", e)
                metrics.EVENTS_REJECTED.labels("redis_unavailable").inc(len(parsed.events))
                raise RequestError(503, "storage_unavailable",
                                   "events cannot be stored durably right now; retry later") from None
            metrics.EVENTS_ACCEPTED.labels(project).inc(len(parsed.events))
            self.in_flight.add([receipt.entry_id])
            await self.outbox.send(IngestBatch([receipt], parsed.events))
        if parsed.rejected:
            return 400, {
                "success": False, "error": "invalid_events",
                "message": f"{len(parsed.rejected)} event(s) rejected, {len(parsed.events)} accepted",
                "accepted": len(parsed.events),
                "rejected": [r.as_dict() for r in parsed.rejected[:100]],
            }, []
        return 200, {"success": True}, []

    async def remap(self, body: bytes) -> dict[str, Any]:
        """``{"project": P, "pairs": [[old, new], …]}`` → re-map entries in the ingest stream,
        durable and ordered with the traffic like events (``bin/evactors remap``)."""
        try:
            request = msgspec.json.decode(body, type=RemapRequest)
        except msgspec.ValidationError as e:
            raise RequestError(400, "invalid_remap", str(e)) from None
        if request.project not in self.write_keys.projects():
            raise RequestError(400, "invalid_remap", f"unknown project {request.project!r}")
        await self._settle()
        now = int(time.time() * 1000)
        pairs = [(str(old), str(new)) for old, new in request.pairs if old and new and old != new]
        for i in range(0, len(pairs), 1000):
            events = [Incoming(request.project, "remap", f"remap\x00{old}\x00{new}", new, "", "", {}, {},
                               Context(), now, now, "", "", old, "") for old, new in pairs[i:i + 1000]]
            receipt = await self.durable.append(events, msgspec.msgpack.encode(events))
            self.in_flight.add([receipt.entry_id])
            await self.outbox.send(IngestBatch([receipt], events))
        return {"success": True, "remapped": len(pairs), "skipped": len(request.pairs) - len(pairs)}

    async def _settle(self, timeout: float = 60.0) -> None:
        """Wait until every event accepted so far has been processed. A re-map reads the old
        id's state, which another shard (in another process) writes: it must come after
        the events sent before it, not merely be queued after them."""
        waiting = set(self.in_flight.since)
        deadline = trio.current_time() + timeout
        while waiting:
            waiting.intersection_update(self.in_flight.since)
            if not waiting:
                break
            if trio.current_time() > deadline:
                raise RequestError(503, "busy", f"{len(waiting)} request(s) accepted before the "
                                   "re-map are still being processed; retry the re-map later",
                                   retry_after=self.config.server.retry_after_seconds)
            await trio.sleep(0.01)

    async def live_stream(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Server-Sent Events for one viewer: ``hello``, ``stats`` every second, ``events``."""
        assert self.live is not None
        query = dict(parse_qsl(scope.get("query_string", b"").decode(errors="replace")))
        project = self.write_keys.project(query.get("key"))
        if project is None:
            body = _encode({"success": False, "error": "unauthorized",
                            "message": "a write key of the project is required (?key=…)"})
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})
            return
        try:
            viewer = self.live.join(project)
        except Full as e:
            raise RequestError(503, "too_many_viewers", str(e)) from None
        key = query.get("key")
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]})

            async def event(name: str, data: Any) -> None:
                chunk = f"event: {name}\ndata: ".encode() + _encode(data) + b"\n\n"
                await send({"type": "http.response.body", "body": chunk, "more_body": True})

            async def stats(cancel: trio.CancelScope) -> None:
                while self.write_keys.project(key) == project:  # a revoked key ends the stream
                    hub = self.live
                    assert hub is not None
                    await event("stats", {"live_visitors": hub.visitors.get(project, 0),
                                          "events_per_second": hub.rate(project)})
                    await trio.sleep(1)
                cancel.cancel()

            async def until_disconnect(cancel: trio.CancelScope) -> None:
                while True:  # the client sends nothing more until it goes away
                    if (await receive())["type"] == "http.disconnect":
                        break
                cancel.cancel()

            await event("hello", {"project": project})
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stats, nursery.cancel_scope)
                nursery.start_soon(until_disconnect, nursery.cancel_scope)
                async for rows in viewer.receive:
                    await event("events", rows)
                nursery.cancel_scope.cancel()  # the hub closed: the service is stopping
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except* OSError:
            pass  # the viewer went away: EventSource reconnects by itself
        finally:
            self.live.leave(viewer)

    async def other(self, path: str, method: str, scope: Scope,
                    receive: Receive) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        json = [(b"content-type", b"application/json")]
        if path == "/health/live":
            return 200, json, b'{"status":"live"}'
        if path == "/health/ready":
            try:
                with trio.fail_after(2):
                    await self.redis.run(self.redis.client.ping)
            except (*TRANSIENT, trio.TooSlowError):
                return 503, json, b'{"status":"redis unavailable"}'
            if self.clickhouse is not None and not await self.clickhouse.healthy():
                return 503, json, b'{"status":"clickhouse unavailable"}'
            if self.backlog.cached > self.config.server.high_water_events:
                return 503, json, b'{"status":"backlog over high-water mark"}'
            return 200, json, b'{"status":"ready"}'
        if path == "/live" and method == "GET":
            return 200, [(b"content-type", b"text/html; charset=utf-8")], PAGE.encode()
        if path == "/metrics":
            return 200, [(b"content-type", CONTENT_TYPE_LATEST.encode())], generate_latest(metrics.REGISTRY)
        if path == "/admin/status" and method == "GET":
            if not self.admin.check(_header(scope, b"authorization")):
                raise RequestError(401, "unauthorized", "admin token required (Bearer)")
            if self.status is None:
                raise RequestError(404, "not_found", "no status here")
            return 200, json, _encode(await self.status())
        if path == "/admin/remap" and method == "POST":
            if not self.admin.check(_header(scope, b"authorization")):
                raise RequestError(401, "unauthorized", "admin token required (Bearer)")
            return 200, json, _encode(await self.remap(await self._body(scope, receive, 64 << 20)))
        if path == "/admin/query" and method == "POST":
            if not self.admin.check(_header(scope, b"authorization")):
                raise RequestError(401, "unauthorized", "admin token required (Bearer)")
            if self.clickhouse is None:
                raise RequestError(404, "not_found", "no ClickHouse in this process")
            sql = (await self._body(scope, receive, 1 << 20)).decode(errors="replace")
            try:
                columns, rows = await self.clickhouse.query(sql)
            except Exception as e:
                raise RequestError(400, "query_failed", str(e).splitlines()[0][:2000]) from None
            return 200, json, _encode({"columns": columns, "rows": rows})
        raise RequestError(404, "not_found", f"no endpoint {path}")
