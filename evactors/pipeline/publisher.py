"""Publisher: live notifications and live state, best effort, off the delivery path.

* ``event:received`` (rows committed to the buffer) and ``event:saved`` (rows in
  ClickHouse) on Redis pub/sub, as they come. One message per batch (of at most 2,000
  rows): ``{"columns": [...], "rows": [[...], ...]}``, the rows as the ``events`` table holds
  them. Encoding is skipped while no one subscribes.
* the live keys, gathered in memory and written at most once a second (at once after a
  quiet second, so a lone visitor shows up without delay), with plain commands:
  - live visitors: a sorted set per project (profile, else device → last seen), trimmed to
    5 minutes (``ZADD``, ``ZREMRANGEBYSCORE``, ``PEXPIRE``);
  - the last screen view per (project, profile), readable for 31 minutes (``SET … EX``):
    the one of the latest event time, so a late view, or a held one saved later, does not
    replace a newer one. The event time of what is stored is remembered (a bounded map);
    a key not remembered is read back first (``GET``, one round trip for all of them).
    Two publishers writing one profile's view in the same instant (its devices in two
    worker processes or instances) may leave the older: the check is not atomic, which
    no Lua script per write is worth.
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

log = logging.getLogger("evactors.publisher")

CHANNELS = ("event:received", "event:saved")
LIVE_WRITE_SECONDS = 1.0
KNOWN_VIEWS = 100_000
MESSAGE_ROWS = 2_000  # most rows in one pub/sub message  # last-view keys whose stored event time is remembered
_COLUMNS = TABLES["events"][1]
_encode = msgspec.json.Encoder().encode


class _Stored(msgspec.Struct):
    created_at: int = 0


_decode_stored = msgspec.json.Decoder(_Stored).decode


def _count(reply: Any) -> int:
    """A NUMSUB reply's count: [channel, n] (or [(channel, n)] from redis-py)."""
    flat = [x for item in reply for x in (item if isinstance(item, tuple) else (item,))]
    return int(flat[1]) if len(flat) > 1 else 0


class Publisher:
    def __init__(self, redis: RedisIO, keys: Keys, interval: float = LIVE_WRITE_SECONDS) -> None:
        self.redis = redis
        self.keys = keys
        self.interval = interval
        self.subscribers: dict[str, int] = {c: 1 for c in CHANNELS}
        self._checked = 0.0
        self.live: dict[str, dict[str, int]] = {}  # project → visitor → last seen (wall ms)
        self.views: dict[str, EventRow] = {}  # last-view key → the newest view not yet written
        self.known: dict[str, tuple[int, float]] = {}  # key → (stored view's event time, when written)
        self.pending = trio.Event()  # set while live state waits to be written

    async def _refresh_subscribers(self) -> None:
        if time.monotonic() - self._checked < 1.0:
            return
        self._checked = time.monotonic()
        # one NUMSUB per channel: on a cluster, each asks the node its subscribers use
        # (the master of the channel's slot, as redis-py's cluster pub/sub picks it)
        replies = await self.redis.execute([["PUBSUB", "NUMSUB", c] for c in CHANNELS], check=True)
        self.subscribers = {c: _count(reply) for c, reply in zip(CHANNELS, replies, strict=True)}

    async def publish(self, notices: list[Notice]) -> None:
        """Publish the batches now; gather their live state for ``write_live``."""
        await self._refresh_subscribers()
        now = int(time.time() * 1000)
        messages: list[Any] = []
        for notice in notices:
            if notice.rows and self.subscribers.get(notice.channel):
                # a flush's rows (up to flush.chunk_rows) as messages of MESSAGE_ROWS, the
                # event loop let in between: one encode of 20,000 rows held it ~20 ms
                for i in range(0, len(notice.rows), MESSAGE_ROWS):
                    rows = notice.rows[i:i + MESSAGE_ROWS]
                    messages.append(["PUBLISH", notice.channel, _encode({"columns": _COLUMNS, "rows": rows})])
                    await trio.lowlevel.checkpoint()
            if notice.channel == "event:received":
                self._gather(now, (*notice.rows, *notice.held))
        if messages:
            await self.redis.execute(messages, check=True)

    def _gather(self, now: int, rows: tuple[EventRow, ...]) -> None:
        for row in rows:
            visitor = row.profile_id or row.device_id
            if not visitor or row.name == "session_end":
                continue
            self.live.setdefault(row.project_id, {})[visitor] = now
            self.pending.set()
            if row.name == "screen_view":
                key = self.keys.last_screen_view(row.project_id, visitor)
                held = self.views.get(key)
                if held is None or row.created_at >= held.created_at:
                    self.views[key] = row

    async def write_live(self) -> None:
        """Write what was gathered: one round trip (two when last views must be read back)."""
        live, views = self.live, self.views
        self.live, self.views, self.pending = {}, {}, trio.Event()
        try:
            await self._write(live, views)
        except BaseException:  # kept for the next write (newer state gathered since wins)
            for project, members in live.items():
                now = self.live.setdefault(project, {})
                for visitor, seen in members.items():
                    now[visitor] = max(seen, now.get(visitor, 0))
            for key, row in views.items():
                if key not in self.views or row.created_at > self.views[key].created_at:
                    self.views[key] = row
            if self.live or self.views:
                self.pending.set()
            raise

    async def _write(self, live: dict[str, dict[str, int]], views: dict[str, EventRow]) -> None:
        now = int(time.time() * 1000)
        fresh = time.monotonic() - LAST_SCREEN_VIEW_TTL + 5  # a key remembered since is still there
        unknown = [key for key in views if self.known.get(key, (0, 0.0))[1] < fresh]
        if unknown:
            stored = await self.redis.execute([["GET", key] for key in unknown], check=True)
            for key, raw in zip(unknown, stored, strict=True):
                self.known.pop(key, None)
                if raw is not None:
                    try:
                        self.known[key] = (_decode_stored(raw).created_at, time.monotonic())
                    except msgspec.DecodeError:
                        pass  # unreadable: replaced
        commands: list[list[Any]] = []
        for project, members in live.items():
            key = self.keys.live(project)
            commands.append(["ZADD", key, *(x for member, seen in members.items() for x in (seen, member))])
            commands.append(["ZREMRANGEBYSCORE", key, "-inf", now - LIVE_WINDOW_MS])
            commands.append(["PEXPIRE", key, LIVE_WINDOW_MS])
        written = []
        for key, row in views.items():
            if key in self.known and self.known[key][0] > row.created_at:
                continue  # a newer view is stored
            commands.append(["SET", key, _encode(msgspec.structs.asdict(row)), "EX", LAST_SCREEN_VIEW_TTL])
            written.append((key, row.created_at))
        if commands:
            await self.redis.execute(commands, check=True)
        at = time.monotonic()
        for key, created_at in written:
            self.known.pop(key, None)
            self.known[key] = (created_at, at)
        while len(self.known) > KNOWN_VIEWS:  # the least recently written go first
            del self.known[next(iter(self.known))]

    async def keep_live(self) -> None:
        """Write the live state when there is some, at most once per ``interval``."""
        while True:
            await self.pending.wait()
            await self.write_live_if_redis()
            await trio.sleep(self.interval)

    async def write_live_if_redis(self) -> None:
        """``write_live``, skipped with a warning while Redis is unavailable (or full): the
        state stays gathered for the next round."""
        try:
            await self.write_live()
        except Exception as e:
            if not transient(e):
                raise
            log.warning("live keys not written, redis unavailable: %s", e)


async def publisher(pub: Publisher, inbox: trio.MemoryReceiveChannel[Notice]) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pub.keep_live)
        async for notice in inbox:
            batch = take_queued(inbox, notice, limit=64)
            try:
                await pub.publish(batch)
            except Exception as e:  # notifications are best effort; the data is safe elsewhere
                if not transient(e):  # (a full Redis refuses them with OOM: skipped too)
                    raise
                log.warning("publish skipped, redis unavailable: %s", e)
        nursery.cancel_scope.cancel()
    if pub.pending.is_set():  # what the last second gathered
        await pub.write_live_if_redis()
