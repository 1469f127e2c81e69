"""Enrichment of one event into its ``events`` row: bot filter, UA parsing, GeoIP,
page/UTM fields and PII removal.

Pure CPU work (no I/O: dedup happens in the session actor, atomically with the commit),
cached where inputs repeat. The enricher actor (``pipeline.enricher``) runs it on batches.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Generator
from functools import lru_cache
from typing import NamedTuple
from urllib.parse import parse_qs, urlsplit

from evactors.core.config import PipelineConfig
from evactors.core.messages import Enriched, IngestBatch, ShardBatch
from evactors.core.model import BotRow, EventRow, Incoming, event_id, flatten
from evactors.core.sharding import shard_of
from evactors.enrichment.bots import BotDetector
from evactors.enrichment.geoip import GeoIP
from evactors.enrichment.useragent import UAInfo, UserAgentParser
from evactors.ops import metrics

log = logging.getLogger("evactors.enrich")


def truncate_ip(ip: str) -> str:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ""
    prefix = 24 if address.version == 4 else 48
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False).network_address)


STEP = 32  # events between the pauses of split_steps (where a caller may look at its clock)
MAX_CACHED_KEY = 1024  # characters: longer user agents and URLs are parsed, not cached


class PageInfo(NamedTuple):
    path: str
    origin: str
    utm: tuple[str, str, str, str, str]


_NO_UTM = ("", "", "", "", "")


def _host(url: str) -> str:
    try:
        return urlsplit(url).hostname or ""
    except ValueError:
        return ""


def _page_info(url: str) -> PageInfo:
    """Path, origin and UTM parameters of a page URL (cached: pages repeat)."""
    try:
        parts = urlsplit(url)
    except ValueError:  # not a URL: nothing to take from it
        return PageInfo("", "", _NO_UTM)
    origin = f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else ""
    utm = _NO_UTM
    if "utm_" in parts.query:
        q = parse_qs(parts.query)
        utm = tuple(q.get(f"utm_{k}", [""])[0]  # type: ignore[assignment]
                    for k in ("source", "medium", "campaign", "term", "content"))
    return PageInfo(parts.path, origin, utm)


def remap_row(event: Incoming) -> EventRow:
    """A re-map (``bin/evactors remap``) travels as an event of the new id, so it lands in
    that id's shard, in order and exactly once; the session actor applies it, and saves
    no row for it."""
    return EventRow(
        event_id(event.project_id, event.message_id), event.project_id, "$remap", event.anonymous_id,
        "", "", event.timestamp_ms, event.received_ms, "", "", "", "", 0, {}, "", "", "", "", "", "",
        None, None, "", "", "", "", "", "", "", "", "", "", "", "", "", 0, 0, 0, event.message_id,
        "remap", 0, "", "", "", "", "")


class Enricher:
    """Stateless per batch; holds the shared parsers and caches.

    The hot path works on cached verdicts: per user agent (parse + bot reason), per IP
    (geo), per page URL (path, origin, UTM) and per referrer (host); a row is built
    positionally. This is what keeps a warm event at a few microseconds."""

    def __init__(self, config: PipelineConfig, geoip: GeoIP, ua: UserAgentParser,
                 bots: BotDetector, max_user_agent: int = 1024) -> None:
        self.config = config
        self.max_user_agent = max_user_agent  # ingest cuts too; this guards older entries
        self.geoip = geoip
        self.ua = ua
        self.bots = bots
        self.agent = lru_cache(maxsize=config.ua_cache_size)(self._agent)
        self.page = lru_cache(maxsize=config.ua_cache_size)(_page_info)
        self.host = lru_cache(maxsize=config.ua_cache_size)(_host)
        self.bots_seen: dict[str, int] = {}  # reason → count, published once per batch
        # A fault-injection hook for the poison test: no real input makes enrichment raise.
        self.poison_hook = os.environ.get("EVACTORS_TEST_POISON_EVENT") or None

    def _agent(self, user_agent: str) -> tuple[UAInfo, str]:
        info = self.ua.parse(user_agent)
        return info, self.bots.reason(user_agent, info.spider)

    def bot_row(self, event: Incoming, reason: str) -> BotRow:
        page = event.context.page
        path = (page.path if page else None) or event.properties.get("path") or ""
        name = "screen_view" if event.type in ("page", "screen") else (
            event.name if event.type == "track" else event.type)
        return BotRow(event_id(event.project_id, event.message_id), event.project_id, name,
                      event.anonymous_id or event.user_id, str(path), reason, event.user_agent,
                      event.timestamp_ms, event.message_id)

    def enrich(self, event: Incoming) -> EventRow | BotRow:
        """The enriched row; for a bot (unless bots are kept in events) its events_bots row."""
        ua = event.user_agent  # an outsized key would not be worth keeping in a cache
        if len(ua) > self.max_user_agent:
            ua = ua[:self.max_user_agent]
        info, bot = self.agent(ua) if len(ua) <= MAX_CACHED_KEY else self._agent(ua)
        if bot:
            self.bots_seen[bot] = self.bots_seen.get(bot, 0) + 1
            if not self.config.keep_bots:
                return self.bot_row(event, bot)
        geo = self.geoip.lookup(event.ip)
        context = event.context
        props = event.properties
        page = context.page
        url = (page.url if page else None) or props.get("url") or ""
        path = (page.path if page else None) or props.get("path") or ""
        referrer = (page.referrer if page else None) or props.get("referrer") or ""
        if type(url) is not str:
            url = str(url)
        info_url = (self.page(url) if len(url) <= MAX_CACHED_KEY else _page_info(url)) if url else None
        origin = info_url.origin if info_url else ""
        if info_url and not path:
            path = info_url.path
        if type(path) is not str:
            path = str(path)
        if type(referrer) is not str:
            referrer = str(referrer)
        c = context.campaign
        utm = ((c.source or "", c.medium or "", c.name or "", c.term or "", c.content or "")
               if c is not None else info_url.utm if info_url else _NO_UTM)
        library = context.library
        kind = event.type
        properties = flatten(props) if props else {}
        if kind == "page" or kind == "screen":
            name = "screen_view"
            if event.name:
                properties.setdefault("name", event.name)
        elif kind == "track":
            name = event.name
        else:
            name = kind
            if kind == "group":
                properties["group_id"] = event.group_id
            elif kind == "alias":
                properties["previous_id"] = event.previous_id
        if page is not None and page.title:
            properties.setdefault("title", page.title)
        pii = self.config.pii
        ip = "" if pii == "remove" else event.ip if pii == "keep" else truncate_ip(event.ip)
        return EventRow(
            event_id(event.project_id, event.message_id), event.project_id, name,
            event.anonymous_id or event.user_id, event.user_id, "", event.timestamp_ms,
            event.received_ms, path, origin, referrer,
            (self.host(referrer) if len(referrer) <= MAX_CACHED_KEY else _host(referrer)) if referrer else "",
            # Geo and UAInfo fields are in the row's column order: splat, don't look up.
            0, properties, *geo[:8], geo.timezone or context.timezone or "", *info[:7], *utm,
            0, 0, 0,
            event.message_id, kind, 1 if bot else 0, bot,
            (library.name or "") if library else "", (library.version or "") if library else "",
            ip, event.user_agent if pii == "keep" else "",
        )

    def split(self, batch: IngestBatch, shards: int) -> tuple[dict[int, ShardBatch],
                                                              list[tuple[Incoming, str]]]:
        """Enrich a batch and cut it into per-shard parts; set each receipt's part count.
        Events whose enrichment raises come back apart (poison), with the error."""
        steps = self.split_steps(batch, shards)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]

    def split_steps(self, batch: IngestBatch, shards: int) -> Generator[None, None, tuple[
            dict[int, ShardBatch], list[tuple[Incoming, str]]]]:
        """:meth:`split`, pausing after every ``STEP`` events so that a caller may give the
        event loop a turn (``enricher`` does when a batch runs past its time budget)."""
        parts = [ShardBatch() for _ in range(shards)]
        step = 0
        enrich, events = self.enrich, batch.events
        poison: list[tuple[Incoming, str]] = []
        offset = 0
        for receipt in batch.receipts:
            touched: set[int] = set()
            for event in events[offset:offset + receipt.events]:
                step += 1
                if step % STEP == 0:
                    yield
                try:
                    if event.name == self.poison_hook:
                        raise RuntimeError("injected poison (EVACTORS_TEST_POISON_EVENT)")
                    row = enrich(event) if event.type != "remap" else remap_row(event)
                except Exception as e:  # one bad event must not stop the others
                    poison.append((event, f"{type(e).__name__}: {e}"))
                    continue
                shard = shard_of(event.project_id, row.device_id, shards)
                parts[shard].events.append(Enriched(row, event, shard))
                touched.add(shard)
            offset += receipt.events
            receipt.remaining = len(touched)
            for shard in touched:
                parts[shard].receipts.append(receipt)
        for reason, count in self.bots_seen.items():
            metrics.BOTS.labels(reason).inc(count)
        self.bots_seen.clear()
        kept = {shard: part for shard, part in enumerate(parts) if part.receipts}
        metrics.STAGE_EVENTS.labels("enrich").inc(sum(len(p.events) for p in kept.values()))
        return kept, poison
