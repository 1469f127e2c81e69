"""The operator's routes, behind the admin token: ``/admin/status``, ``/admin/remap``
(``bin/evactors remap``) and ``/admin/query`` (``bin/evactors query`` while the service
owns the embedded engine)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import trio

from evactors.core.messages import IngestBatch
from evactors.core.model import Context, Incoming
from evactors.core.segment import RequestError
from evactors.pipeline.durable_log import DurableLog
from evactors.pipeline.inflight import InFlight
from evactors.service.credentials import AdminToken, WriteKeys
from evactors.service.http.request import Receive, Reply, Scope, header, json_reply, read_body
from evactors.store.clickhouse import ClickHouse


class RemapRequest(msgspec.Struct):
    project: str
    pairs: list[tuple[str, str]]


class AdminRoutes:
    def __init__(self, token: AdminToken, status: Callable[[], Awaitable[dict[str, Any]]] | None,
                 clickhouse: ClickHouse | None, write_keys: WriteKeys, durable: DurableLog,
                 outbox: trio.MemorySendChannel[IngestBatch], in_flight: InFlight,
                 retry_after: int) -> None:
        self.token = token
        self.status = status
        self.clickhouse = clickhouse
        self.write_keys = write_keys
        self.durable = durable
        self.outbox = outbox
        self.in_flight = in_flight
        self.retry_after = retry_after

    async def __call__(self, path: str, method: str, scope: Scope, receive: Receive) -> Reply | None:
        """The reply of an admin route, or None when ``path`` is not one."""
        route = {("/admin/status", "GET"), ("/admin/remap", "POST"), ("/admin/query", "POST")}
        if (path, method) not in route:
            return None
        if not self.token.check(header(scope, b"authorization")):
            raise RequestError(401, "unauthorized", "admin token required (Bearer)")
        if path == "/admin/status":
            if self.status is None:
                raise RequestError(404, "not_found", "no status here")
            return json_reply(200, await self.status())
        if path == "/admin/remap":
            return json_reply(200, await self.remap(await read_body(scope, receive, 64 << 20)))
        if self.clickhouse is None:
            raise RequestError(404, "not_found", "no ClickHouse in this process")
        sql = (await read_body(scope, receive, 1 << 20)).decode(errors="replace")
        try:
            columns, rows = await self.clickhouse.query(sql)
        except Exception as e:
            raise RequestError(400, "query_failed", str(e).splitlines()[0][:2000]) from None
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
                                   retry_after=self.retry_after)
            await trio.sleep(0.01)
