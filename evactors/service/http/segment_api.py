"""Segment's HTTP Tracking API (``/v1/track`` … ``/v1/batch``): the front door of the
pipeline.

A request is answered ``200`` only after its events are durable in Redis: one entry of the
ingest stream per request (``DurableLog``). The events then go to the enricher pool over a
bounded channel, so a slow pipeline slows the answers instead of piling up memory. Past the
backlog high-water mark, or with Redis away, the answer is ``503`` with ``Retry-After``:
nothing is accepted that cannot be kept.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from typing import Any

import redis
import trio

from evactors.core.config import CorsConfig, ServerConfig
from evactors.core.messages import IngestBatch
from evactors.core.segment import Parsed, Peer, RequestError, body_write_key, decompress, parse
from evactors.enrichment.bots import header_describes_sender
from evactors.ops import metrics
from evactors.pipeline.backlog import Backlog
from evactors.pipeline.durable_log import DurableLog
from evactors.pipeline.inflight import InFlight
from evactors.service.credentials import WriteKeys
from evactors.service.http.cors import Cors
from evactors.service.http.request import ClientAddress, Receive, Scope, header, read_body
from evactors.service.http.rudderstack import fallback_headers, query_write_key
from evactors.store.redis_io import TRANSIENT
from evactors.store.redis_memory import Memory

log = logging.getLogger("evactors.ingest")


def basic_user(value: str) -> str | None:
    """The user name of an HTTP Basic ``Authorization`` header (Segment's write key)."""
    scheme, _, encoded = value.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, _, _password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return user or None


class SegmentApi:
    """Accepts a request's events: authenticate, parse, make durable, hand to the pipeline."""

    def __init__(self, limits: ServerConfig, write_keys: WriteKeys, durable: DurableLog,
                 outbox: trio.MemorySendChannel[IngestBatch], backlog: Backlog,
                 in_flight: InFlight, cors: Cors | None = None, memory: Memory | None = None) -> None:
        self.memory = memory  # Redis's memory, read each second (pipeline.memory_watch)
        self.limits = limits
        self.cors = cors if cors is not None else Cors(CorsConfig(), set())  # per-project origins
        self.write_keys = write_keys
        self.durable = durable
        self.outbox = outbox
        self.backlog = backlog
        self.in_flight = in_flight
        self.client_address = ClientAddress(limits.trusted_proxies)

    async def track(self, kind: str, scope: Scope,
                    receive: Receive) -> tuple[int, dict[str, Any], list[tuple[bytes, bytes]]]:
        limits = self.limits
        if self.backlog.cached > limits.high_water_events:
            raise RequestError(503, "backlog_full", "the durable backlog is over its high-water "
                               "mark; retry later", retry_after=limits.retry_after_seconds)
        if self.memory is not None and self.memory.full:
            raise RequestError(503, "backlog_full", "the durable backlog is over its high-water "
                               "mark in bytes; retry later", retry_after=limits.retry_after_seconds)
        raw = await read_body(scope, receive, limits.max_batch_bytes)
        body = decompress(raw, header(scope, b"content-encoding"), limits.max_batch_bytes)
        key = (basic_user(header(scope, b"authorization")) or body_write_key(body)
               or query_write_key(scope))
        project = self.write_keys.project(key)
        if project is None:
            raise RequestError(401, "unauthorized", "missing write key" if not key else "unknown write key")
        self.check_origin(scope, project)
        header_ua = header(scope, b"user-agent")
        if header_describes_sender(header_ua):
            header_ua = ""  # curl, an SDK's HTTP client…: the sender, not a visitor
        peer = Peer(self.client_address(scope), header_ua, int(time.time() * 1000), *fallback_headers(scope),
                    write_key=key or "")
        parsed = parse(kind, body, project, peer, limits.max_event_bytes)
        refused = await self.store(project, parsed)
        return (400, refused, []) if refused else (200, {"success": True}, [])

    def check_origin(self, scope: Scope, project: str) -> None:
        """A browser's request for a project that does not list its page's origin: 403."""
        origin = header(scope, b"origin")
        if not self.cors.allows(project, origin):
            raise RequestError(403, "origin_not_allowed", f"origin {origin[:200]!r} may not send "
                               "this project's events ([cors] origins)")

    async def store(self, project: str, parsed: Parsed) -> dict[str, Any] | None:
        """Make the parsed events durable and hand them on; the 400 body if some were refused.
        Every protocol's events end here (protocols.py: PostHog, OpenPanel)."""
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
            return {
                "success": False, "error": "invalid_events",
                "message": f"{len(parsed.rejected)} event(s) rejected, {len(parsed.events)} accepted",
                "accepted": len(parsed.events),
                "rejected": [r.as_dict() for r in parsed.rejected[:100]],
            }
        return None
