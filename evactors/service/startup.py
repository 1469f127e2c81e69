"""Start-up: what must hold before any actor runs. One service per data dir; the real
parts (Redis — embedded Valkey unless a URL is set —, ClickHouse, GeoIP) up and checked;
the credentials loaded or generated; then the topology runs until the service stops.
Everything opened here is closed here, in reverse order, however the service ends."""

from __future__ import annotations

import logging
import secrets
import socket
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import trio

from evactors.core.config import Config, ConfigError
from evactors.core.exits import EXIT_OK
from evactors.enrichment.geoip import GeoIP
from evactors.service.credentials import (
    AdminToken,
    WriteKeys,
    load_or_create_admin_token,
    load_or_create_read_keys,
    load_or_create_write_key,
)
from evactors.service.supervisor import StartupError
from evactors.service.topology import Parts, serve
from evactors.store import files
from evactors.store.clickhouse import ClickHouse, embedded_dsn
from evactors.store.keys import Keys, keys_for
from evactors.store.paths import DataDir
from evactors.store.redis_io import RedisIO
from evactors.store.redis_memory import check_eviction, config_value, embedded_maxmemory
from evactors.store.valkey import DataDirLock, EmbeddedValkey

log = logging.getLogger("evactors.supervisor")


async def run(config: Config, ready: Callable[[dict[str, Any]], None] | None = None,
              reload_config: Callable[[], Config] | None = None) -> int:
    """Run the service until stopped. Returns the process exit code. ``reload_config``
    re-reads the configuration on SIGHUP (write keys and GeoIP are applied live)."""
    data_dir = config.data_path
    files.private_dir(data_dir)  # 0700, tightened if an older run left it looser
    files.private_tree(DataDir(data_dir).redis)
    lock = DataDirLock(data_dir)
    if not lock.acquire():
        raise StartupError(f"another evactors owns {data_dir} (lock {lock.path})")
    with ExitStack() as stack:
        stack.callback(lock.release)
        # Real parts: Redis (embedded Valkey unless a URL is set), ClickHouse, GeoIP.
        redis_url = config.redis.url
        embedded = None
        if not redis_url:
            embedded = EmbeddedValkey(data_dir, config.redis.durability,
                                      embedded_maxmemory(config.redis.maxmemory))
            await trio.to_thread.run_sync(embedded.start)
            stack.callback(embedded.stop)
            redis_url = embedded.url
        redis = RedisIO(redis_url, config.redis.timeout_seconds, wait_replicas=config.redis.wait_replicas)
        stack.callback(redis.close)
        await trio.to_thread.run_sync(redis.client.ping)
        if embedded is None:  # exit 2 naming the setting when it evicts (unless allowed)
            await check_eviction(redis, config.redis.allow_eviction)
        # strict on an external server: WAITAOF after each write, unless the server fsyncs
        # every write itself (appendfsync always); embedded: appendfsync always.
        wait_aof = False
        if config.redis.durability == "strict" and embedded is None:
            wait_aof = await check_strict(redis)
        await check_shards(redis, keys_for(config), config.pipeline.session_shards)
        dsn = config.clickhouse.dsn or embedded_dsn(data_dir)
        clickhouse = ClickHouse(dsn, config.clickhouse.database, config.clickhouse.timeout_seconds,
                                config.clickhouse.cluster)
        stack.callback(clickhouse.close)
        if not config.clickhouse.dsn:
            await trio.to_thread.run_sync(clickhouse.open)  # embedded: it works now or never
        elif not await clickhouse.ensure_open():
            log.warning("ClickHouse is not reachable yet; events are kept in Redis until it is")
        pipe = config.pipeline
        geoip = GeoIP(config.geoip.database or None, pipe.geo_cache_size)

        write_keys = dict(config.write_keys)
        generated = None
        if not write_keys:
            key, project, made = load_or_create_write_key(data_dir)
            write_keys = {key: project}
            generated = key if made else None  # printed once, when made
        read_keys, new_read_keys = load_or_create_read_keys(
            data_dir, list(write_keys.values()), config.read_keys)
        parts = Parts(redis, clickhouse, geoip, WriteKeys(write_keys),
                      AdminToken(load_or_create_admin_token(data_dir)), wait_aof, generated, embedded,
                      WriteKeys(read_keys), new_read_keys, instance_name(data_dir))
        return await serve(config, parts, ready, reload_config)
    return EXIT_OK  # pragma: no cover (the ExitStack does not swallow)


def instance_name(data_dir: Path) -> str:
    """This instance's name, kept in the data dir: its shards' leases carry it, so its own
    restart takes them back at once (the data dir's lock proves the earlier run gone)."""
    path = DataDir(data_dir).instance
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        name = f"{socket.gethostname()}-{secrets.token_hex(4)}"
        path.write_text(name + "\n")
        return name


async def check_shards(redis: RedisIO, keys: Keys, shards: int) -> None:
    """Stored state is placed by shard, and on a cluster ingest entries by lane: neither
    count can change under existing data (an entry in a lane no one reads is stranded)."""
    for field, setting, count in [("session_shards", "pipeline.session_shards", shards),
                                  *([("ingest_lanes", "redis.ingest_lanes", len(keys.lanes))]
                                    if keys.clustered else [])]:
        stored = await redis.run(redis.client.hget, keys.meta, field)
        if stored is None:
            await redis.run(redis.client.hset, keys.meta, field, count)
        elif int(stored) != count:
            raise ConfigError(setting, f"the data in Redis was written with {int(stored)} ({field}); "
                              f"set it back to {int(stored)} (changing it needs an empty Redis)")


async def check_strict(redis: RedisIO) -> bool:
    """Whether strict needs WAITAOF after each write (True), or the server already fsyncs
    every write (False). Raises when the server can do neither."""
    fsyncs = [config_value(replies[0], "appendfsync")  # every master of a cluster
              for replies in await redis.on_each_master([["CONFIG", "GET", "appendfsync"]])]
    if all(fsync == "always" for fsync in fsyncs):
        return False
    try:  # numlocal 1, as every write will ask: refused when appendonly is off
        for (reply,) in await redis.on_each_master([["WAITAOF", 1, 0, 1000]]):
            if isinstance(reply, Exception):
                raise reply
        return True
    except Exception as e:
        text = str(e).lower()
        if "unknown command" not in text and "appendonly" not in text and "aof" not in text:
            raise
    raise StartupError("redis.durability = strict needs WAITAOF (Redis ≥ 7.2 / Valkey) with "
                       "appendonly yes, or appendfsync always on the server")
