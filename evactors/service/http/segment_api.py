"""Segment's HTTP Tracking API (``/v1/track`` … ``/v1/batch``): the front door of the
pipeline.

A request is answered ``200`` only after its events are durable in Redis, in the ingest
stream (``DurableLog``, which writes the requests that arrive together as one entry). The
events then go to the enricher pool over a bounded channel, so a slow pipeline slows the
answers instead of piling up memory. Past the
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

from evactors.core.config import CorsConfig, LimitsConfig, ServerConfig
from evactors.core.limits import TokenBuckets, retry_after
from evactors.core.model import Incoming
from evactors.core.segment import Parsed, Peer, RequestError, body_write_key, decompress, parse
from evactors.enrichment.bots import header_describes_sender
from evactors.ops import metrics
from evactors.pipeline.backlog import Backlog
from evactors.pipeline.durable_log import DurableLog
from evactors.service.credentials import WriteKeys
from evactors.service.http.cors import Cors
from evactors.service.http.request import BodyBounds, ClientAddress, Receive, Scope, header, read_body
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
                 backlog: Backlog, cors: Cors | None = None, memory: Memory | None = None,
                 bounds: LimitsConfig | None = None) -> None:
        self.memory = memory  # Redis's memory, read each second (pipeline.memory_watch)
        self.limits = limits
        self.cors = cors if cors is not None else Cors(CorsConfig(), set())  # per-project origins
        self.bounds = bounds = bounds or LimitsConfig()
        self.per_key = TokenBuckets(bounds.key_events_per_second, bounds.key_burst_events)
        self.per_device = TokenBuckets(bounds.device_events_per_second, bounds.device_burst_events)
        self.bodies = BodyBounds(bounds, limits.retry_after_seconds)
        self.write_keys = write_keys
        self.durable = durable
        self.backlog = backlog
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
        # A key in the Authorization header is checked before the body costs anything.
        key = basic_user(header(scope, b"authorization"))
        project = self.write_keys.project(key)
        if key is not None and project is None:
            raise RequestError(401, "unauthorized", "unknown write key")
        if project is not None:
            self._rate_check(self.per_key, project, 1, "key")
        raw = await read_body(scope, receive, limits.max_batch_bytes, self.bodies)
        body = decompress(raw, header(scope, b"content-encoding"), limits.max_batch_bytes)
        if key is None:
            key = body_write_key(body) or query_write_key(scope)
            project = self.write_keys.project(key)
        if project is None:
            raise RequestError(401, "unauthorized", "missing write key" if not key else "unknown write key")
        self.check_origin(scope, project)
        cap = self.bounds.max_user_agent_length
        header_ua = header(scope, b"user-agent")[:cap]
        if header_describes_sender(header_ua):
            header_ua = ""  # curl, an SDK's HTTP client…: the sender, not a visitor
        peer = Peer(self.client_address(scope), header_ua, int(time.time() * 1000), *fallback_headers(scope),
                    write_key=key or "", max_user_agent=cap)
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
            self._rate_limit(project, parsed.events)
            try:
                await self.durable.append(parsed.events, parsed.encoded)
            except (*TRANSIENT, TimeoutError, redis.ResponseError) as e:  # OOM, MISCONF, READONLY…
                log.warning("cannot store events, answering 503: %s", e)
                metrics.EVENTS_REJECTED.labels("redis_unavailable").inc(len(parsed.events))
                raise RequestError(503, "storage_unavailable",
                                   "events cannot be stored durably right now; retry later") from None
            metrics.EVENTS_ACCEPTED.labels(project).inc(len(parsed.events))
        if parsed.rejected:
            return {
                "success": False, "error": "invalid_events",
                "message": f"{len(parsed.rejected)} event(s) rejected, {len(parsed.events)} accepted",
                "accepted": len(parsed.events),
                "rejected": [r.as_dict() for r in parsed.rejected[:100]],
            }
        return None

    def _rate_check(self, buckets: TokenBuckets, key: Any, n: int, limit: str) -> None:
        wait = buckets.wait_for(key, n)
        if wait > 0:
            metrics.RATE_LIMITED.labels(limit).inc()
            seconds = retry_after(wait)
            what = "write key" if limit == "key" else f"device {key[1][:64]!r}"
            raise RequestError(429, "rate_limited", f"too many events for this {what} "
                               f"(limits.{limit}_events_per_second); retry in {seconds} s",
                               retry_after=seconds)

    def _rate_limit(self, project: str, events: list[Incoming]) -> None:
        """Per write key (its project) and per device: all of the request or none of it."""
        per_device: dict[tuple[str, str], int] = {}
        if self.per_device.enabled:
            for event in events:
                device = (project, event.anonymous_id or event.user_id)
                per_device[device] = per_device.get(device, 0) + 1
            for device, n in per_device.items():
                self._rate_check(self.per_device, device, n, "device")
        self._rate_check(self.per_key, project, len(events), "key")
        self.per_key.take(project, len(events))
        for device, n in per_device.items():
            self.per_device.take(device, n)
