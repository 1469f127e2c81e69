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

from .clickhouse import TABLES
from .messages import Notice
from .model import EventRow
from .redis_io import TRANSIENT, Keys, RedisIO
from .resp import Script

log = logging.getLogger("evactors.publisher")

LAST_SCREEN_VIEW_TTL = 31 * 60
LIVE_WINDOW_MS = 5 * 60 * 1000
CHANNELS = ("event:received", "event:saved")
_COLUMNS = TABLES["events"][1]
_encode = msgspec.json.Encoder().encode

# KEYS: last-view keys. ARGV: ttl, then per key the view's created_at and its JSON. Each is
# kept unless the stored view is newer. One call per batch of notices, however many views.
SET_LAST_VIEWS = """
local written = 0
for i = 1, #KEYS do
  local at = tonumber(ARGV[2 * i])
  local old = redis.call('GET', KEYS[i])
  local newer = false
  if old then
    local ok, view = pcall(cjson.decode, old)
    newer = ok and type(view) == 'table' and tonumber(view.created_at) ~= nil
            and tonumber(view.created_at) > at
  end
  if not newer then
    redis.call('SET', KEYS[i], ARGV[2 * i + 1], 'EX', ARGV[1])
    written = written + 1
  end
end
return written
"""


class Publisher:
    def __init__(self, redis: RedisIO, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self.subscribers: dict[str, int] = {c: 1 for c in CHANNELS}
        self._checked = 0.0
        self.set_last_views = Script(SET_LAST_VIEWS)

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
