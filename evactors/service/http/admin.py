"""The operator's routes, behind the admin token: ``/admin/status``, ``/admin/remap``
(``bin/evactors remap``) and ``/admin/query`` (``bin/evactors query`` while the service
owns the embedded engine), with ``/metrics``, on a listener of their own (``AdminApp``,
``serve_admin``), never the public one, which may be bound to 0.0.0.0 for browsers.

By default that listener is a Unix socket in the data dir (0600 in a 0700 dir: only the
service's user reaches it); ``admin.listen`` may make it TCP. The token is still required,
except for ``/metrics`` (project ids and volumes: readable by whoever reaches the listener).
``/admin/query`` runs one read-only statement (``store.readonly_query``)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import msgspec
import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from evactors.core.model import Context, Incoming
from evactors.core.segment import RequestError
from evactors.ops import metrics
from evactors.pipeline.durable_log import DurableLog
from evactors.pipeline.inflight import InFlight
from evactors.service.credentials import AdminToken, WriteKeys
from evactors.service.http.request import (
    JSON,
    Receive,
    Reply,
    Scope,
    Send,
    encode,
    header,
    json_reply,
    lifespan,
    read_body,
)
from evactors.service.http.server import serve_unix_or_tcp
from evactors.service.supervisor import StartupError
from evactors.store.clickhouse import ClickHouse
from evactors.store.paths import DataDir
from evactors.store.readonly_query import ReadOnlyQuery

_encode = msgspec.msgpack.Encoder().encode


log = logging.getLogger("evactors.admin")

TEST_WRITES = "EVACTORS_TEST_ADMIN_WRITES"  # test hook: /admin/execute runs any statement


class RemapRequest(msgspec.Struct):
    project: str
    pairs: list[tuple[str, str]]


class AdminRoutes:
    def __init__(self, token: AdminToken, status: Callable[[], Awaitable[dict[str, Any]]] | None,
                 clickhouse: ClickHouse | None, write_keys: WriteKeys, durable: DurableLog,
                 in_flight: InFlight, retry_after: int) -> None:
        self.token = token
        self.status = status
        self.clickhouse = clickhouse
        self.write_keys = write_keys
        self.durable = durable
        self.in_flight = in_flight
        self.retry_after = retry_after
        self.reader = ReadOnlyQuery(clickhouse) if clickhouse is not None else None
        self.test_writes = os.environ.get(TEST_WRITES) == "1"

    async def __call__(self, path: str, method: str, scope: Scope, receive: Receive) -> Reply | None:
        """The reply of an admin route, or None when ``path`` is not one."""
        route = {("/admin/status", "GET"), ("/admin/remap", "POST"), ("/admin/query", "POST"),
                 ("/admin/execute", "POST")}
        if (path, method) not in route:
            return None
        try:
            authorized = self.token.check(header(scope, b"authorization"))
        except TypeError:  # a non-ASCII token: hmac refuses to compare it
            authorized = False
        if not authorized:
            raise RequestError(401, "unauthorized", "admin token required (Bearer)")
        if path == "/admin/status":
            if self.status is None:
                raise RequestError(404, "not_found", "no status here")
            return json_reply(200, await self.status())
        if path == "/admin/remap":
            return json_reply(200, await self.remap(await read_body(scope, receive, 64 << 20)))
        if self.clickhouse is None or self.reader is None:
            raise RequestError(404, "not_found", "no ClickHouse in this process")
        if path == "/admin/execute" and not self.test_writes:
            raise RequestError(404, "not_found", "no endpoint /admin/execute")
        sql = (await read_body(scope, receive, 1 << 20)).decode(errors="replace")
        try:
            if path == "/admin/execute":  # tests only: any statement, in the flusher's session
                columns, rows = await self.clickhouse.query(sql)
            else:
                columns, rows = await self.reader.query(sql)
        except Exception as e:
            text = str(e).splitlines()[0][:2000] if str(e) else type(e).__name__
            raise RequestError(400, "query_failed", text) from None
        return json_reply(200, {"columns": columns, "rows": rows})

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
            await self.durable.append(events, [_encode(e) for e in events])
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
                                   retry_after=self.retry_after)
            await trio.sleep(0.01)


class AdminApp:
    """The admin listener's ASGI app: the admin routes, ``/metrics`` and ``/health/live``."""

    def __init__(self, routes: AdminRoutes) -> None:
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await lifespan(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        try:
            reply: Reply | None
            if path == "/metrics" and method == "GET":
                reply = 200, [(b"content-type", CONTENT_TYPE_LATEST.encode())], generate_latest(metrics.REGISTRY)
            elif path == "/health/live":
                reply = 200, list(JSON), b'{"status":"live"}'
            else:
                reply = await self.routes(path, method, scope, receive)
            if reply is None:
                raise RequestError(404, "not_found", f"no endpoint {path}")
            status, headers, body = reply
        except RequestError as e:
            status, headers, body = e.status, list(JSON), encode(e.body)
            log.info("admin refused %s %r: %d %s", method, path, e.status, e.body["error"])
        headers = [*headers, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def admin_bind(listen: str, data_dir: DataDir) -> str:
    """The admin listener's bind: ``unix:PATH`` (``admin.listen`` empty: DATA/admin.sock) or HOST:PORT."""
    return listen or f"unix:{data_dir.admin_socket}"


async def serve_admin(app: AdminApp, bind: str, shutdown: trio.Event, graceful: float,
                      read_timeout: float = 10.0,
                      task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """The admin listener, until ``shutdown``; started with its address (``unix:PATH`` or
    a URL). A bind that fails is a ``StartupError``. A stale socket file (kill -9) is
    replaced: the data dir is locked by this process."""

    def started(binds: list[str]) -> None:
        task_status.started(bind if bind.startswith("unix:") else f"http://{binds[0]}")

    listening: Any = SimpleNamespace(started=started)
    try:
        await serve_unix_or_tcp(app, bind, shutdown, graceful, read_timeout, task_status=listening)
    except OSError as e:
        raise StartupError(f"cannot listen on {bind} (admin.listen): "
                           f"{getattr(e, 'strerror', None) or e}") from None
