"""The live hub: an actor that listens on the ``event:received`` pub/sub channel — the same
notifications any other consumer gets — only while someone is watching, and fans each
project's events out to that project's viewers (``service.http.live`` serves them, to holders
of the project's read key). Each project has its own cap of viewers, so one project's
viewers never shut out another's.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import deque
from typing import Any

import msgspec
import redis
import trio

from evactors.store.keys import Keys
from evactors.store.live import count_live
from evactors.store.redis_io import sync_client

log = logging.getLogger("evactors.live")


CHANNEL = "event:received"


# What a viewer sees of an event: no ids of people (the write key that opens the stream is
# may be shared with a wall display), only what the page shows.
SHOWN = ("id", "name", "path", "country", "city", "browser", "os", "device", "created_at")


MAX_VIEWERS = 100


class Viewer:
    def __init__(self, project: str) -> None:
        self.project = project
        self.send, self.receive = trio.open_memory_channel[list[dict[str, Any]]](16)


class Full(Exception):
    """Too many viewers already."""


class LiveHub:
    def __init__(self, redis_url: str, keys: Keys, max_viewers: int = MAX_VIEWERS,
                 per_project: int = MAX_VIEWERS // 5) -> None:
        self.redis_url = redis_url
        self.max_viewers, self.per_project = max_viewers, per_project
        self.keys = keys
        self.viewers: set[Viewer] = set()
        self.someone = trio.Event()
        self.limiter = trio.CapacityLimiter(1)  # its own: viewers never wait on ingest's Redis
        self.arrivals: dict[str, deque[tuple[float, int]]] = {}  # watched project → (time, n)
        self.visitors: dict[str, int] = {}  # watched project → live visitors, once a second

    def join(self, project: str) -> Viewer:
        if len(self.viewers) >= self.max_viewers:
            raise Full(f"{self.max_viewers} viewers already")
        if sum(1 for v in self.viewers if v.project == project) >= self.per_project:
            raise Full(f"{self.per_project} viewers of this project already")
        viewer = Viewer(project)
        self.viewers.add(viewer)
        self.someone.set()
        return viewer

    def leave(self, viewer: Viewer) -> None:
        self.viewers.discard(viewer)
        viewer.send.close()

    def rate(self, project: str, window: float = 5.0) -> float:
        """Events per second received for a project, over the last ``window`` seconds."""
        now = time.monotonic()
        arrivals = self.arrivals.get(project, deque())
        while arrivals and arrivals[0][0] < now - window:
            arrivals.popleft()
        return round(sum(n for _t, n in arrivals) / window, 1)

    def _fan_out(self, payload: bytes) -> None:
        body = msgspec.json.decode(payload)
        columns = body["columns"]
        index = {name: columns.index(name) for name in (*SHOWN, "project_id")}
        by_project: dict[str, list[dict[str, Any]]] = {}
        for row in body["rows"]:
            by_project.setdefault(row[index["project_id"]], []).append(
                {name: row[index[name]] for name in SHOWN})
        now = time.monotonic()
        watched = {viewer.project for viewer in self.viewers}
        for project in list(self.arrivals):
            if project not in watched:
                del self.arrivals[project]
        for project, rows in by_project.items():
            if project in watched:
                self.arrivals.setdefault(project, deque()).append((now, len(rows)))
        for viewer in list(self.viewers):
            mine = by_project.get(viewer.project)
            if mine:
                try:
                    viewer.send.send_nowait(mine[-20:])
                except (trio.WouldBlock, trio.ClosedResourceError):
                    pass  # a slow (or gone) viewer skips an update

    async def _count_visitors(self, client: redis.Redis) -> None:
        projects = sorted({viewer.project for viewer in self.viewers})
        counts = await trio.to_thread.run_sync(count_live, client, self.keys, projects, limiter=self.limiter)
        self.visitors = dict(zip(projects, counts, strict=True))

    async def run(self, shutdown: trio.Event) -> None:
        """The hub actor: subscribed while there are viewers, until shutdown."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._listen)
            await shutdown.wait()
            nursery.cancel_scope.cancel()
        for viewer in list(self.viewers):
            self.leave(viewer)

    async def _listen(self) -> None:
        while True:
            await self.someone.wait()
            client = sync_client(self.redis_url, 5)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            next_stats = 0.0
            try:
                await trio.to_thread.run_sync(pubsub.subscribe, CHANNEL, limiter=self.limiter)
                while self.viewers:
                    message = await trio.to_thread.run_sync(
                        functools.partial(pubsub.get_message, timeout=0.5), limiter=self.limiter)
                    if message and message.get("type") == "message":
                        self._fan_out(message["data"])
                    if time.monotonic() >= next_stats:  # one count per watched project
                        next_stats = time.monotonic() + 1.0
                        await self._count_visitors(client)
            except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
                log.warning("live view lost its subscription, resubscribing: %s", e)
                await trio.sleep(1)
            finally:
                pubsub.close()
                client.close()
            if not self.viewers:
                self.someone = trio.Event()
