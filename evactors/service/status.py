"""The service's status (``/admin/status``, ``bin/evactors status``): uptime, backlog and
lag, each actor's state and restarts, channel depths, live visitors per project."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from evactors.pipeline.backlog import Backlog
from evactors.service.credentials import WriteKeys
from evactors.service.supervisor import Supervisor
from evactors.store.clickhouse import ClickHouse
from evactors.store.keys import Keys
from evactors.store.live import count_live
from evactors.store.redis_io import RedisIO


class Status:
    def __init__(self, supervisor: Supervisor, backlog: Backlog, depths: Callable[[], dict[str, int]],
                 redis: RedisIO, keys: Keys, clickhouse: ClickHouse, write_keys: WriteKeys) -> None:
        self.supervisor = supervisor
        self.backlog = backlog
        self.depths = depths
        self.redis = redis
        self.keys = keys
        self.clickhouse = clickhouse
        self.write_keys = write_keys
        self.started_at = time.time()

    async def __call__(self) -> dict[str, Any]:
        projects = sorted(set(self.write_keys.projects()))
        counts = await self.redis.run(count_live, self.redis.client, self.keys, projects) if projects else []
        sup = self.supervisor
        return {
            "pid": os.getpid(), "uptime_seconds": round(time.time() - self.started_at, 1),
            "backlog_events": await self.backlog.exact(), "lag_seconds": round(await self.backlog.lag(), 3),
            "actors": {name: {"state": state, "restarts": sup.restarts.get(name, 0)}
                       for name, state in sorted(sup.states.items())},
            "channels": self.depths(),
            "live_visitors": dict(zip(projects, counts, strict=True)),
            "clickhouse_connected": self.clickhouse.client is not None,
        }
