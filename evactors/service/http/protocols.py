"""The routes of the other protocols: PostHog's capture API, OpenPanel's ``/track``, and
the SDKs' own telemetry (analytics.js ``/v1/m``, RudderStack ``/rsaMetrics``).

Why a module of its own: ``segment_api`` serves Segment's API; these are routed here,
turned into Segment messages by ``core.posthog`` / ``core.openpanel``, and stored by the
same ``SegmentApi.store`` — so dedup, bots, enrichment, sessions and exactly-once are shared
by every protocol. Each answer has the body its SDK expects (PostHog ``{"status": 1}``,
OpenPanel ``{deviceId, sessionId}``), and PostHog's start-up calls get a valid empty
configuration.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import parse_qsl

import msgspec
from prometheus_client import Counter

from evactors.core import openpanel, posthog
from evactors.core.openpanel import Clients
from evactors.core.segment import DECODE_ERRORS, Peer, RequestError, decompress
from evactors.enrichment.bots import header_describes_sender
from evactors.ops.metrics import REGISTRY
from evactors.service.http.request import Headers, Receive, Scope, header, read_body
from evactors.service.http.segment_api import SegmentApi

Answer = tuple[int, Any, Headers]

KINDS = frozenset({"metrics", "openpanel", "posthog", "posthog-flags", "posthog-config"})
SDK_TELEMETRY = Counter("evactors_sdk_telemetry_requests", "The SDKs' own telemetry (analytics.js "
                        "/v1/m, RudderStack /rsaMetrics), accepted and dropped", registry=REGISTRY)


def route(path: str) -> str | None:
    """The protocol of a path that is not one of Segment's, or None."""
    bare = path.rstrip("/")
    if bare == "/track":
        return "openpanel"  # OpenPanel's one endpoint
    if bare == "/rsaMetrics":
        return "metrics"  # RudderStack's own error and metrics reports: counted, not kept
    return posthog.route(path)


class OtherApis:
    """PostHog and OpenPanel on top of the Segment API's storing; OpenPanel's clients."""

    def __init__(self, segment: SegmentApi, clients: Clients) -> None:
        self.segment = segment
        self.clients = clients

    async def __call__(self, kind: str, scope: Scope, receive: Receive) -> Answer:
        method, limit = scope["method"], self.segment.limits.max_batch_bytes
        if kind == "metrics":  # an SDK's own telemetry: counted, not kept, never an error
            if method != "POST":
                raise RequestError(405, "method_not_allowed", f"{scope['path']} accepts POST")
            await read_body(scope, receive, limit, self.segment.bodies)
            SDK_TELEMETRY.inc()
            return 200, {"success": True}, []
        if kind == "posthog-flags":
            if method not in ("GET", "POST"):
                raise RequestError(405, "method_not_allowed", f"{scope['path']} accepts GET and POST")
            if method == "POST":
                await read_body(scope, receive, limit, self.segment.bodies)
            return 200, posthog.EMPTY_FLAGS, []
        if kind == "posthog-config":
            if method != "GET":
                raise RequestError(405, "method_not_allowed", f"{scope['path']} accepts GET")
            if scope["path"].endswith(".js"):
                return 200, b"/* evactors: no remote configuration */", [
                    (b"content-type", b"application/javascript")]
            return 200, posthog.EMPTY_REMOTE_CONFIG, []
        if method != "POST":
            raise RequestError(405, "method_not_allowed", f"{scope['path']} accepts POST")
        if kind == "posthog":
            return await self.posthog(scope, receive)
        return await self.openpanel(scope, receive)

    def _peer(self, scope: Scope, sdk_prefix: str) -> Peer:
        cap = self.segment.bounds.max_user_agent_length
        agent = header(scope, b"user-agent")[:cap]
        if header_describes_sender(agent) or agent.lower().startswith(sdk_prefix):
            agent = ""  # the sending server's HTTP client or SDK, not a visitor
        return Peer(self.segment.client_address(scope), agent, int(time.time() * 1000), max_user_agent=cap)

    async def _read(self, scope: Scope, receive: Receive) -> bytes:
        limits = self.segment.limits
        if self.segment.backlog.cached > limits.high_water_events:
            raise RequestError(503, "backlog_full", "the durable backlog is over its high-water "
                               "mark; retry later", retry_after=limits.retry_after_seconds)
        raw = await read_body(scope, receive, limits.max_batch_bytes, self.segment.bodies)
        return decompress(raw, header(scope, b"content-encoding"), limits.max_batch_bytes)

    async def posthog(self, scope: Scope, receive: Receive) -> Answer:
        limits = self.segment.limits
        body = await self._read(scope, receive)
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        request = posthog.read(posthog.body_json(body, query, header(scope, b"content-type").lower(),
                                                 limits.max_batch_bytes))
        if request.key is None:  # an array of events: the first event's token names the project
            request.key = query.get("token") or query.get("api_key") or None
            for raw in request.events[:1]:
                try:
                    first = msgspec.json.decode(raw)
                except DECODE_ERRORS:
                    break
                if isinstance(first, dict):
                    request.key = posthog.event_key(first) or request.key
        project = self.segment.write_keys.project(request.key)
        if project is None:
            raise RequestError(401, "unauthorized", "missing project token (api_key)" if not request.key
                               else "unknown project token (api_key)")
        self.segment.check_origin(scope, project)
        parsed = posthog.parse(request, project, self._peer(scope, "posthog-"), limits.max_event_bytes)
        refused = await self.segment.store(project, parsed)
        return (400, refused, []) if refused else (200, {"status": 1}, [])

    async def openpanel(self, scope: Scope, receive: Receive) -> Answer:
        client_id = header(scope, b"openpanel-client-id").strip()
        project = self.clients.project(client_id, header(scope, b"openpanel-client-secret").strip())
        self.segment.check_origin(scope, project)
        body = await self._read(scope, receive)
        command = openpanel.read(body)
        peer = self._peer(scope, "openpanel")
        answer = {"deviceId": openpanel.device_id(project, peer.ip, peer.user_agent, peer.received_ms),
                  "sessionId": ""}
        if command.type == "replay":
            return 200, answer, []
        message_id = self.clients.message_id(project, client_id, peer.ip, peer.user_agent, body,
                                             peer.received_ms)
        parsed = openpanel.parse(command, body, message_id, project, peer, self.segment.limits.max_event_bytes)
        if parsed.rejected and not parsed.events:
            bad = parsed.rejected[0]
            raise RequestError(400, "invalid_event", f"{bad.field}: {bad.error}", field=bad.field)
        if parsed.events:
            answer["deviceId"] = parsed.events[0].anonymous_id
        refused = await self.segment.store(project, parsed)
        return (400, refused, []) if refused else (200, answer, [])
