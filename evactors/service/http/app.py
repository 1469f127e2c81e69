"""The HTTP surface as one ASGI application: a request id and metrics for every request,
then a route: Segment's API, PostHog's and OpenPanel's, the live view, health (admin and
``/metrics`` have their own listener: ``service.http.admin``).

Each group of routes is its own object with its own collaborators (``segment_api``,
``protocols``, ``live``, ``health``); this module only dispatches and writes the reply, so a
route's error (``RequestError``) becomes the same JSON reply everywhere, and every route a
browser may call gets its CORS headers here (``cors``), errors and 404s too.
"""

from __future__ import annotations

import logging
import re
import secrets
import time

from evactors.core.segment import ENDPOINTS, RequestError
from evactors.ops import logs, metrics
from evactors.service.http.cors import Cors
from evactors.service.http.health import Health
from evactors.service.http.live import LiveRoutes
from evactors.service.http.protocols import KINDS, OtherApis, route
from evactors.service.http.request import JSON, Headers, Receive, Scope, Send, encode, has_body, header, lifespan
from evactors.service.http.segment_api import SegmentApi

log = logging.getLogger("evactors.ingest")

_SAFE_ID = re.compile(r"[A-Za-z0-9._-]+")


class App:
    def __init__(self, segment: SegmentApi, health: Health,
                 live: LiveRoutes | None, retry_after: int, others: OtherApis | None = None) -> None:
        self.segment = segment
        self.cors: Cors = segment.cors  # the same origins as the Segment API checks
        self.others = others  # PostHog, OpenPanel, the SDKs' telemetry
        self.health = health
        self.live = live
        self.retry_after = retry_after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await lifespan(scope, receive, send)
            return
        started = time.perf_counter()
        path, method = scope["path"], scope["method"]
        given = header(scope, b"x-request-id")
        rid = given if 0 < len(given) <= 64 and _SAFE_ID.fullmatch(given) else secrets.token_hex(6)
        logs.request_id.set(rid)  # this request's task only: its log lines carry it
        kind = ENDPOINTS.get(path.rstrip("/")) or (route(path) if self.others is not None else None)
        # browsers may call every route but the admin's and the live view's (their own page)
        browser = not path.startswith(("/admin/", "/live"))
        origin = header(scope, b"origin") if browser else ""
        headers: Headers
        try:
            if method == "OPTIONS" and browser:
                status, body = 204, b""
                headers = self.cors.preflight(origin, header(scope, b"access-control-request-headers"),
                                              bool(header(scope, b"access-control-request-private-network")))
                browser = False  # its CORS headers are these
            elif kind is not None:
                if kind not in KINDS:
                    if method != "POST":
                        raise RequestError(405, "method_not_allowed", f"{path} accepts POST")
                    status, payload, extra = await self.segment.track(kind, scope, receive)
                else:
                    assert self.others is not None
                    status, payload, extra = await self.others(kind, scope, receive)
                headers, body = extra, payload if isinstance(payload, bytes) else encode(payload)
                if not extra:
                    headers.append((b"content-type", b"application/json"))
            elif path == "/live/stream" and method == "GET" and self.live is not None:
                await self.live.stream(scope, receive, send)
                return
            else:
                status, headers, body = await self.other(path, method, scope, receive)
        except RequestError as e:
            status, body = e.status, encode(e.body)
            log.info("refused %s %r: %d %s", method, path, e.status, e.body["error"])
            headers = list(JSON)
            if e.status == 429:
                headers.append((b"retry-after", str(e.body.get("retry_after", 1)).encode()))
            elif e.status == 503:
                headers.append((b"retry-after", str(self.retry_after).encode()))

        if browser:
            headers += self.cors.headers(origin)
        metrics.REQUESTS.labels(kind or "other", str(status)).inc()
        if kind is not None:
            metrics.HTTP_LATENCY.observe(time.perf_counter() - started)
        headers.append((b"content-length", str(len(body)).encode()))
        headers.append((b"x-request-id", rid.encode()))
        if not scope.get("evactors.body_read") and has_body(scope):
            # answered before reading the request's body (refused early): the connection
            # cannot carry another request, so say so instead of letting the client find out
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def other(self, path: str, method: str, scope: Scope,
                    receive: Receive) -> tuple[int, Headers, bytes]:
        if (reply := await self.health(path, header(scope, b"authorization"))) is not None:
            return reply
        if path == "/live" and method == "GET" and self.live is not None:
            return self.live.page(scope)
        # /admin/* and /metrics: on the admin listener only (service.http.admin)
        raise RequestError(404, "not_found", f"no endpoint {path}")
