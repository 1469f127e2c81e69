"""The enricher pool: bot filter, UA parsing, GeoIP, page/UTM fields and PII removal.

Pure CPU work on whole batches (no I/O: dedup happens in the session actor, atomically with
the commit). Output is routed to the session shard that owns each (project, device).
"""

from __future__ import annotations

import ipaddress
import logging
import zlib
from urllib.parse import parse_qs, urlsplit

import trio

from . import metrics
from .bots import BotDetector
from .config import PipelineConfig
from .geoip import GeoIP
from .messages import Enriched, IngestBatch, Receipt, ShardBatch
from .model import EventRow, Incoming, event_id, flatten
from .useragent import UserAgentParser

log = logging.getLogger("evactors.enrich")


def shard_of(project_id: str, device_id: str, shards: int) -> int:
    """Stable across processes and restarts (unlike ``hash``)."""
    return zlib.crc32(f"{project_id}\x00{device_id}".encode()) % shards


def device_of(event: Incoming) -> str:
    return event.anonymous_id or event.user_id


def truncate_ip(ip: str) -> str:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ""
    prefix = 24 if address.version == 4 else 48
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False).network_address)


def _host(url: str) -> str:
    try:
        return urlsplit(url).hostname or ""
    except ValueError:
        return ""


def _page_fields(event: Incoming) -> tuple[str, str, str]:
    """(path, origin, referrer) from context.page, else from page properties."""
    page = event.context.page
    props = event.properties
    url = (page.url if page else None) or str(props.get("url") or "")
    path = (page.path if page else None) or str(props.get("path") or "")
    referrer = (page.referrer if page else None) or str(props.get("referrer") or "")
    origin = ""
    if url:
        try:
            parts = urlsplit(url)
        except ValueError:  # not a URL: keep what the event said
            return path, origin, referrer
        origin = f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else ""
        path = path or parts.path
    return path, origin, referrer


def _utm(event: Incoming) -> tuple[str, str, str, str, str]:
    c = event.context.campaign
    if c is not None:
        return (c.source or "", c.medium or "", c.name or "", c.term or "", c.content or "")
    page = event.context.page
    url = (page.url if page else None) or str(event.properties.get("url") or "")
    if "utm_" not in url:
        return ("", "", "", "", "")
    try:
        q = parse_qs(urlsplit(url).query)
    except ValueError:
        return ("", "", "", "", "")
    return tuple(q.get(f"utm_{k}", [""])[0] for k in  # type: ignore[return-value]
                 ("source", "medium", "campaign", "term", "content"))


class Enricher:
    """Stateless per batch; holds the shared parsers and caches."""

    def __init__(self, config: PipelineConfig, geoip: GeoIP, ua: UserAgentParser,
                 bots: BotDetector) -> None:
        self.config = config
        self.geoip = geoip
        self.ua = ua
        self.bots = bots

    def enrich(self, event: Incoming) -> EventRow | None:
        """The enriched row, or None when the event is a bot that is not kept."""
        info = self.ua.parse(event.user_agent)
        bot = self.bots.reason(event.user_agent, info.spider)
        if bot:
            metrics.BOTS.labels(bot).inc()
            if not self.config.keep_bots:
                return None
        geo = self.geoip.lookup(event.ip)
        path, origin, referrer = _page_fields(event)
        utm = _utm(event)
        library = event.context.library
        pii = self.config.pii
        kind = event.type
        name = "screen_view" if kind in ("page", "screen") else (event.name if kind == "track" else kind)
        properties = flatten(event.properties)
        if kind in ("page", "screen") and event.name:
            properties.setdefault("name", event.name)
        if kind == "group":
            properties["group_id"] = event.group_id
        if kind == "alias":
            properties["previous_id"] = event.previous_id
        if event.context.page and event.context.page.title:
            properties.setdefault("title", event.context.page.title)
        return EventRow(
            id=event_id(event.project_id, event.message_id),
            project_id=event.project_id,
            name=name,
            device_id=device_of(event),
            profile_id=event.user_id,
            session_id="",
            created_at=event.timestamp_ms,
            received_at=event.received_ms,
            path=path,
            origin=origin,
            referrer=referrer,
            referrer_name=_host(referrer),
            duration=0,
            properties=properties,
            country=geo.country,
            country_name=geo.country_name,
            region=geo.region,
            region_name=geo.region_name,
            city=geo.city,
            postal_code=geo.postal_code,
            latitude=geo.latitude,
            longitude=geo.longitude,
            timezone=geo.timezone or (event.context.timezone or ""),
            browser=info.browser,
            browser_version=info.browser_version,
            os=info.os,
            os_version=info.os_version,
            device=info.device,
            brand=info.brand,
            model=info.model,
            utm_source=utm[0],
            utm_medium=utm[1],
            utm_campaign=utm[2],
            utm_term=utm[3],
            utm_content=utm[4],
            is_new_session=0,
            session_number=0,
            session_start=0,
            message_id=event.message_id,
            type=kind,
            is_bot=1 if bot else 0,
            bot_reason=bot,
            sdk_name=(library.name or "") if library else "",
            sdk_version=(library.version or "") if library else "",
            ip=event.ip if pii == "keep" else truncate_ip(event.ip) if pii == "truncate" else "",
            user_agent=event.user_agent if pii == "keep" else "",
        )

    def split(self, batch: IngestBatch, shards: int) -> dict[int, ShardBatch]:
        """Enrich a batch and cut it into per-shard parts; set each receipt's part count."""
        parts: dict[int, ShardBatch] = {}
        receipts_by_event: list[Receipt] = []
        for receipt in batch.receipts:
            receipts_by_event.extend([receipt] * receipt.events)
        touched: dict[int, set[int]] = {}
        for event, receipt in zip(batch.events, receipts_by_event, strict=True):
            row = self.enrich(event)
            if row is None:
                continue
            shard = shard_of(event.project_id, row.device_id, shards)
            parts.setdefault(shard, ShardBatch()).events.append(Enriched(row, event, shard))
            touched.setdefault(id(receipt), set()).add(shard)
        for receipt in batch.receipts:
            receipt.remaining = len(touched.get(id(receipt), ()))
            for shard in touched.get(id(receipt), ()):
                parts[shard].receipts.append(receipt)
        metrics.STAGE_EVENTS.labels("enrich").inc(sum(len(p.events) for p in parts.values()))
        return parts


async def enricher(enricher: Enricher, shards: int,
                   inbox: trio.MemoryReceiveChannel[IngestBatch],
                   shard_outboxes: list[trio.MemorySendChannel[ShardBatch]],
                   done: trio.MemorySendChannel[list[Receipt]]) -> None:
    """One task of the pool. Receipts with no part left (all bots) go straight to the acker."""
    async for batch in inbox:
        parts = enricher.split(batch, shards)
        finished = [r for r in batch.receipts if r.remaining == 0]
        for shard, part in parts.items():
            await shard_outboxes[shard].send(part)
        if finished:
            await done.send(finished)
