"""Health: ``/health/live`` (the process answers) and ``/health/ready`` (Redis, ClickHouse
and the backlog, in events and in bytes, allow accepting events). ``/metrics`` is on the
admin listener (``service.http.admin``)."""

from __future__ import annotations

import trio

from evactors.pipeline.backlog import Backlog
from evactors.service.http.request import JSON, Reply
from evactors.store.clickhouse import ClickHouse
from evactors.store.redis_io import TRANSIENT, RedisIO
from evactors.store.redis_memory import Memory


class Health:
    def __init__(self, redis: RedisIO, clickhouse: ClickHouse | None, backlog: Backlog,
                 high_water_events: int, memory: Memory | None = None) -> None:
        self.memory = memory
        self.redis = redis
        self.clickhouse = clickhouse
        self.backlog = backlog
        self.high_water_events = high_water_events

    async def __call__(self, path: str, authorization: str = "") -> Reply | None:
        """The reply of a health or metrics route, or None when ``path`` is not one."""
        if path == "/health/live":
            return 200, list(JSON), b'{"status":"live"}'
        if path == "/health/ready":
            return await self.ready()
        return None

    async def ready(self) -> Reply:
        try:
            with trio.fail_after(2):
                await self.redis.run(self.redis.client.ping)
        except (*TRANSIENT, trio.TooSlowError):
            return 503, list(JSON), b'{"status":"redis unavailable"}'
        if self.clickhouse is not None and not await self.clickhouse.healthy():
            return 503, list(JSON), b'{"status":"clickhouse unavailable"}'
        if self.backlog.cached > self.high_water_events or (self.memory is not None and self.memory.full):
            return 503, list(JSON), b'{"status":"backlog over high-water mark"}'
        return 200, list(JSON), b'{"status":"ready"}'
