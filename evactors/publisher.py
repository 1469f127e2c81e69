"""Publisher: live notifications and live state, best effort, off the delivery path.

* ``event:received`` (rows committed to the buffer) and ``event:saved`` (rows in
  ClickHouse) on Redis pub/sub. One message per batch: ``{"columns": [...], "rows":
  [[...], ...]}``, the rows as the ``events`` table holds them. Encoding is skipped while
  no one subscribes.
* the last screen view per (project, profile), readable for 31 minutes;
* live visitors: a sorted set per project (profile → last seen), trimmed to 5 minutes.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import msgspec
import trio

from .clickhouse import TABLES
from .messages import Notice
from .model import EventRow
from .redis_io import TRANSIENT, Keys, RedisIO

log = logging.getLogger("evactors.publisher")

LAST_SCREEN_VIEW_TTL = 31 * 60
LIVE_WINDOW_MS = 5 * 60 * 1000
CHANNELS = ("event:received", "event:saved")
_COLUMNS = TABLES["events"][1]
_encode = msgspec.json.Encoder().encode


class Publisher:
    def __init__(self, redis: RedisIO, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self.subscribers: dict[str, int] = {c: 1 for c in CHANNELS}
        self._checked = 0.0

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
        last_views: dict[str, EventRow] = {}
        messages: list[tuple[str, bytes]] = []
        for notice in notices:
            if self.subscribers.get(notice.channel):
                messages.append((notice.channel, _encode({"columns": _COLUMNS, "rows": notice.rows})))
            if notice.channel != "event:received":
                continue
            for row in notice.rows:
                visitor = row.profile_id or row.device_id
                if not visitor or row.name == "session_end":
                    continue
                live.setdefault(row.project_id, {})[visitor] = now
                if row.name == "screen_view":
                    last_views[self.keys.last_screen_view(row.project_id, visitor)] = row

        def build(pipe: object) -> None:
            p = pipe
            for channel, payload in messages:
                p.publish(channel, payload)  # type: ignore[attr-defined]
            for key, row in last_views.items():
                p.set(key, _encode(msgspec.structs.asdict(row)), ex=LAST_SCREEN_VIEW_TTL)  # type: ignore
            for project, members in live.items():
                p.zadd(self.keys.live(project), members)  # type: ignore[attr-defined]
                p.zremrangebyscore(self.keys.live(project), "-inf", now - LIVE_WINDOW_MS)  # type: ignore
                p.pexpire(self.keys.live(project), LIVE_WINDOW_MS)  # type: ignore[attr-defined]

        if messages or last_views or live:
            await self.redis.pipeline(build)


async def publisher(pub: Publisher, inbox: trio.MemoryReceiveChannel[Notice]) -> None:
    async for notice in inbox:
        batch = [notice]
        while len(batch) < 64:
            try:
                batch.append(inbox.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        try:
            await pub.publish(batch)
        except TRANSIENT as e:  # notifications are best effort; the data is safe elsewhere
            log.warning("publish skipped, redis unavailable: %s", e)


# Readers of the live state (sync: for the CLI, an admin page, or another process).


def live_visitors(client: Any, keys: Keys, project: str) -> int:
    """Visitors of a project seen in the last 5 minutes."""
    now = int(time.time() * 1000)
    return int(client.zcount(keys.live(project), now - LIVE_WINDOW_MS, "+inf"))


def last_screen_view(client: Any, keys: Keys, project: str, profile: str) -> dict[str, Any] | None:
    """The last screen view of a profile (31 minutes), as the ``events`` row."""
    raw = client.get(keys.last_screen_view(project, profile))
    return msgspec.json.decode(raw) if raw else None
