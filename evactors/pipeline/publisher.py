"""Publisher: live notifications and live state, best effort, off the delivery path.

* ``event:received`` (rows committed to the buffer) and ``event:saved`` (rows in
  ClickHouse) on Redis pub/sub. One message per batch: ``{"columns": [...], "rows":
  [[...], ...]}``, the rows as the ``events`` table holds them. Encoding is skipped while
  no one subscribes.
* the last screen view per (project, profile), readable for 31 minutes: the one of the
  latest event time (a late view, or a held one saved later, does not replace a newer one);
* live visitors: a sorted set per project (profile → last seen), trimmed to 5 minutes.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import msgspec
import trio

from evactors.core.channels import take_queued
from evactors.core.messages import Notice
from evactors.core.model import EventRow
from evactors.store.clickhouse import TABLES
from evactors.store.keys import Keys
from evactors.store.live import LAST_SCREEN_VIEW_TTL, LIVE_WINDOW_MS
from evactors.store.redis_io import RedisIO, transient
from evactors.store.scripts import SET_LAST_VIEWS

log = logging.getLogger("evactors.publisher")

CHANNELS = ("event:received", "event:saved")
_COLUMNS = TABLES["events"][1]
_encode = msgspec.json.Encoder().encode


class Publisher:
    def __init__(self, redis: RedisIO, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self.subscribers: dict[str, int] = {c: 1 for c in CHANNELS}
        self._checked = 0.0
        self.set_last_views = SET_LAST_VIEWS

    async def _refresh_subscribers(self) -> None:
        if time.monotonic() - self._checked < 1.0:
            return
        self._checked = time.monotonic()
        counts = await self.redis.run(lambda: self.redis.client.pubsub_numsub(*CHANNELS))
        self.subscribers = {c.decode() if isinstance(c, bytes) else c: n for c, n in counts}

    async def publish(self, notices: list[Notice]) -> None:
        await self._refresh_subscribers()
        now = int(time.time() * 1000)
        live: dict[str, dict[str, int]] = {}
        last_views: dict[str, dict[str, EventRow]] = {}  # project → key → view
        messages: list[tuple[str, bytes]] = []
        for notice in notices:
            if notice.rows and self.subscribers.get(notice.channel):
                messages.append((notice.channel, _encode({"columns": _COLUMNS, "rows": notice.rows})))
            if notice.channel != "event:received":
                continue
            for row in (*notice.rows, *notice.held):
                visitor = row.profile_id or row.device_id
                if not visitor or row.name == "session_end":
                    continue
                live.setdefault(row.project_id, {})[visitor] = now
                if row.name == "screen_view":
                    key = self.keys.last_screen_view(row.project_id, visitor)
                    views = last_views.setdefault(row.project_id, {})
                    if key not in views or row.created_at >= views[key].created_at:
                        views[key] = row

        commands: list[list[Any]] = [["PUBLISH", channel, payload] for channel, payload in messages]
        for project, members in live.items():
            key = self.keys.live(project)
            commands.append(["ZADD", key, *(x for member, seen in members.items() for x in (seen, member))])
            commands.append(["ZREMRANGEBYSCORE", key, "-inf", now - LIVE_WINDOW_MS])
            commands.append(["PEXPIRE", key, LIVE_WINDOW_MS])
        calls = []
        for views in last_views.values():  # one script per project (one slot)
            args: list[Any] = [LAST_SCREEN_VIEW_TTL]
            for row in views.values():
                args += [row.created_at, _encode(msgspec.structs.asdict(row))]
            calls.append((list(views), args))
        if calls or commands:
            for reply in await self.redis.scripts(self.set_last_views, calls, commands):
                if isinstance(reply, Exception):
                    raise reply


async def publisher(pub: Publisher, inbox: trio.MemoryReceiveChannel[Notice]) -> None:
    async for notice in inbox:
        batch = take_queued(inbox, notice, limit=64)
        try:
            await pub.publish(batch)
        except Exception as e:  # notifications are best effort; the data is safe elsewhere
            if not transient(e):  # (a full Redis refuses them with OOM: skipped too)
                raise
            log.warning("publish skipped, redis unavailable: %s", e)
