"""The supervisor: starts the real parts, wires the actors and owns their channels.

::

    HTTP ─► ingest ─[IngestBatch]─► enricher ×N ─[ShardBatch]─► session ×S ─► Redis buffer
              ▲ replayer ─┘                  └───[receipts]──► acker  ◄──────┘
                                                 flusher ◄── Redis buffer ─► ClickHouse
              session/flusher ─[Notice]─► publisher ─► pub/sub, live keys

With ``pipeline.session_workers`` (default 1) the session actors run in child processes
(``session_worker``): a link actor per worker takes their place here, with their channels.

Every actor runs under ``supervise``: an exception restarts it with exponential backoff,
too many within a window stops the service (exit 1). Channel ends belong to the
supervisor, which closes an actor's outgoing ends only when the actor is finished for
good, so a restart keeps its channels and a normal end cascades downstream.

Graceful stop (SIGTERM/SIGINT): ingest stops accepting and finishes its requests; each
actor ends when its inbox closes; the flusher flushes the rest; all of it under the drain
deadline. What does not make it stays durable in Redis for the next start. A second
signal cancels at once.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import os
import secrets
import signal
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import hypercorn.config
import hypercorn.trio
import msgspec
import trio

from . import logs, metrics
from .acker import acker
from .bots import BotDetector
from .cleanup import Backlog, cleanup
from .clickhouse import ClickHouse, embedded_dsn
from .config import Config, ConfigError
from .deadletter import DeadLetters
from .enrich import Enricher, enricher
from .flusher import Flusher, flusher
from .geoip import GeoIP
from .ingest import AdminToken, DurableLog, Ingest, WriteKeys
from .live import LiveHub
from .messages import IngestBatch, Notice, Receipt, ShardBatch
from .publisher import LIVE_WINDOW_MS, Publisher, publisher
from .redis_io import TRANSIENT, DataDirLock, EmbeddedValkey, Keys, RedisIO
from .replay import InFlight, Replayer, replayer
from .sdnotify import Notifier
from .session_worker import WorkerParams, worker_link
from .sessions import start_shard_actors
from .useragent import UserAgentParser

log = logging.getLogger("evactors.supervisor")

EXIT_OK, EXIT_FATAL, EXIT_CONFIG = 0, 1, 2


class StartupError(Exception):
    """The service cannot start (data dir in use, a part will not come up)."""


class ActorFailed(Exception):
    """An actor crashed too often: the service stops (exit 1)."""


class Supervisor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.failures: dict[str, list[float]] = {}
        self.states: dict[str, str] = {}  # actor → running | restarting | finished | failed
        self.restarts: dict[str, int] = {}

    async def supervise(self, name: str, actor: Callable[..., Awaitable[None]], *args: Any,
                        closes: tuple[Any, ...] = ()) -> None:
        """Run ``actor(*args)`` until it returns; restart it when it raises."""
        sup = self.config.supervisor
        delay = sup.backoff_initial_seconds
        logs.actor.set(name)  # this task's context: everything the actor logs names it
        self.states[name] = "running"
        try:
            while True:
                started = time.monotonic()
                try:
                    await actor(*args)
                    self.states[name] = "finished"
                    return
                except Exception as e:
                    now = time.monotonic()
                    if now - started > sup.restart_window_seconds:
                        delay = sup.backoff_initial_seconds  # it ran well for a while
                    recent = [t for t in self.failures.get(name, []) if now - t < sup.restart_window_seconds]
                    recent.append(now)
                    self.failures[name] = recent
                    metrics.ACTOR_RESTARTS.labels(name).inc()
                    self.restarts[name] = self.restarts.get(name, 0) + 1
                    if len(recent) > sup.max_restarts:
                        self.states[name] = "failed"
                        log.critical("actor %s crashed %d times in %.0fs; stopping the service",
                                     name, len(recent), sup.restart_window_seconds, exc_info=e)
                        raise ActorFailed(name) from e
                    log.error("actor %s crashed (%s: %s); restarting in %.2fs", name,
                              type(e).__name__, e, delay, exc_info=e)
                    self.states[name] = "restarting"
                    await trio.sleep(delay)
                    self.states[name] = "running"
                    delay = min(delay * 2, sup.backoff_max_seconds)
        finally:
            for channel in closes:
                channel.close()


def load_or_create_write_key(data_dir: Path) -> tuple[str, str]:
    """The generated write key of a config without any, kept in the data dir."""
    path = data_dir / "write_key"
    if path.exists():
        key, _, project = path.read_text().strip().partition("=")
        if key and project:
            return key, project
    key = secrets.token_urlsafe(24)
    path.write_text(f"{key}=default\n")
    path.chmod(0o600)
    return key, "default"


def load_or_create_admin_token(data_dir: Path) -> str:
    path = data_dir / "admin.token"
    if path.exists() and len(path.read_text().strip()) >= 16:  # an empty token opens nothing
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    path.write_text(token + "\n")
    path.chmod(0o600)
    return token


async def _watch_signals(shutdown: trio.Event, hard_stop: trio.CancelScope,
                         reload: Callable[[], Awaitable[None]]) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                await reload()
            elif not shutdown.is_set():
                log.info("%s: stopping; draining in-flight events", signal.Signals(signum).name)
                shutdown.set()
            else:
                log.warning("second signal: stopping at once (unflushed events stay in Redis)")
                hard_stop.cancel()
                return


async def run(config: Config, ready: Callable[[dict[str, Any]], None] | None = None,
              reload_config: Callable[[], Config] | None = None) -> int:
    """Run the service until stopped. Returns the process exit code. ``reload_config``
    re-reads the configuration on SIGHUP (write keys and GeoIP are applied live)."""
    data_dir = config.data_path
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = DataDirLock(data_dir)
    if not lock.acquire():
        raise StartupError(f"another evactors owns {data_dir} (lock {lock.path})")
    with ExitStack() as stack:
        stack.callback(lock.release)
        # Real parts: Redis (embedded Valkey unless a URL is set), ClickHouse, GeoIP.
        redis_url = config.redis.url
        embedded = None
        if not redis_url:
            embedded = EmbeddedValkey(data_dir, config.redis.durability)
            await trio.to_thread.run_sync(embedded.start)
            stack.callback(embedded.stop)
            redis_url = embedded.url
        redis = RedisIO(redis_url, config.redis.timeout_seconds)
        stack.callback(redis.close)
        await trio.to_thread.run_sync(redis.client.ping)
        # strict on an external server: WAITAOF after each write, unless the server fsyncs
        # every write itself (appendfsync always); embedded: appendfsync always.
        wait_aof = False
        if config.redis.durability == "strict" and embedded is None:
            wait_aof = await _check_strict(redis)
        await _check_shards(redis, Keys(config.redis.key_prefix), config.pipeline.session_shards)
        dsn = config.clickhouse.dsn or embedded_dsn(data_dir)
        clickhouse = ClickHouse(dsn, config.clickhouse.database, config.clickhouse.timeout_seconds)
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
            key, project = load_or_create_write_key(data_dir)
            write_keys = {key: project}
            generated = key
        admin = AdminToken(load_or_create_admin_token(data_dir))
        code = await _serve(config, redis, clickhouse, geoip, WriteKeys(write_keys), admin,
                            wait_aof, generated, data_dir, ready, reload_config, embedded)
        return code
    return EXIT_OK  # pragma: no cover (the ExitStack does not swallow)


def _worker_params(config: Config, redis_url: str, index: int, workers: int) -> WorkerParams:
    pipe = config.pipeline
    return WorkerParams(
        redis_url=redis_url, redis_timeout=config.redis.timeout_seconds,
        key_prefix=config.redis.key_prefix,
        shards=[s for s in range(pipe.session_shards) if s % workers == index],
        log_level=config.log.level, log_format=config.log.format, parent=os.getpid(),
        pipeline=msgspec.to_builtins(pipe), supervisor=msgspec.to_builtins(config.supervisor))


async def _check_shards(redis: RedisIO, keys: Keys, shards: int) -> None:
    """Stored state is placed by shard: the count cannot change under existing data."""
    stored = await redis.run(redis.client.hget, keys.meta, "session_shards")
    if stored is None:
        await redis.run(redis.client.hset, keys.meta, "session_shards", shards)
    elif int(stored) != shards:
        raise ConfigError("pipeline.session_shards",
                          f"the data in Redis was written with {int(stored)} shards; "
                          f"set it back to {int(stored)} (changing it needs an empty Redis)")


async def _check_strict(redis: RedisIO) -> bool:
    """Whether strict needs WAITAOF after each write (True), or the server already fsyncs
    every write (False). Raises when the server can do neither."""
    fsync = await redis.run(lambda: redis.client.config_get("appendfsync"))
    if fsync.get("appendfsync") == "always":
        return False
    try:  # numlocal 1, as every write will ask: refused when appendonly is off
        await redis.run(lambda: redis.client.execute_command("WAITAOF", 1, 0, 1000))
        return True
    except Exception as e:
        text = str(e).lower()
        if "unknown command" not in text and "appendonly" not in text and "aof" not in text:
            raise
    raise StartupError("redis.durability = strict needs WAITAOF (Redis ≥ 7.2 / Valkey) with "
                       "appendonly yes, or appendfsync always on the server")


async def _serve(config: Config, redis: RedisIO, clickhouse: ClickHouse, geoip: GeoIP,
                 write_keys: WriteKeys, admin: AdminToken, wait_aof: bool,
                 generated_key: str | None, data_dir: Path,
                 ready: Callable[[dict[str, Any]], None] | None,
                 reload_config: Callable[[], Config] | None,
                 embedded: EmbeddedValkey | None = None) -> int:
    pipe = config.pipeline
    keys = Keys(config.redis.key_prefix)
    sup = Supervisor(config)
    capacity = pipe.channel_batches
    shutdown, drained, replayed = trio.Event(), trio.Event(), trio.Event()
    in_flight = InFlight()
    startup_error: StartupError | None = None

    to_enrich_tx, to_enrich_rx = trio.open_memory_channel[IngestBatch](capacity)
    shard_channels = [trio.open_memory_channel[ShardBatch](capacity) for _ in range(pipe.session_shards)]
    done_tx, done_rx = trio.open_memory_channel[list[Receipt]](capacity * 8)
    notice_tx, notice_rx = trio.open_memory_channel[Notice](capacity * 8)

    backlog = Backlog(redis, keys, pipe.session_shards)
    await backlog.exact()
    enrich = Enricher(pipe, geoip, UserAgentParser(pipe.ua_cache_size), BotDetector(pipe.ua_cache_size))
    flush = Flusher(redis, keys, clickhouse, pipe.session_shards, config.flush.chunk_rows)
    started_at = time.time()

    def depths() -> dict[str, int]:
        out = {"to-enrich": ingest.outbox.statistics().current_buffer_used,
               "receipts": done_rx.statistics().current_buffer_used,
               "notices": notice_rx.statistics().current_buffer_used}
        for i, (_tx, rx) in enumerate(shard_channels):
            out[f"to-session-{i}"] = rx.statistics().current_buffer_used
        return out

    async def status() -> dict[str, Any]:
        projects = sorted(set(write_keys.projects()))
        def build(pipe: Any) -> None:
            now_ms = int(time.time() * 1000)
            for project in projects:
                pipe.zcount(keys.live(project), now_ms - LIVE_WINDOW_MS, "+inf")
        counts = await redis.pipeline(build) if projects else []
        return {
            "pid": os.getpid(), "uptime_seconds": round(time.time() - started_at, 1),
            "backlog_events": await backlog.exact(), "lag_seconds": round(await backlog.lag(), 3),
            "actors": {name: {"state": state, "restarts": sup.restarts.get(name, 0)}
                       for name, state in sorted(sup.states.items())},
            "channels": depths(),
            "live_visitors": dict(zip(projects, counts, strict=True)),
            "clickhouse_connected": clickhouse.client is not None,
        }

    hub = LiveHub(redis.url, keys)
    dead_letters = DeadLetters(redis, keys)
    ingest = Ingest(config, write_keys, DurableLog(redis, keys, wait_aof), to_enrich_tx.clone(),
                    backlog, clickhouse, admin, redis, in_flight, status, hub)
    publish = Publisher(redis, keys)
    exit_code = EXIT_OK
    systemd = Notifier()
    # Everything built so far (modules, parsers, pattern tables, clients) lives as long as
    # the process: out of the collector's sight, a full collection scans only what the
    # pipeline made since. Measured under load: GC time 2.6 s → 1.3 s per 15 s, the
    # longest pause 160 ms → 70 ms, 10–15% less CPU per event.
    gc.freeze()

    async def reload() -> None:
        """SIGHUP: new write keys from the configuration, and a changed GeoIP file."""
        if reload_config is not None:
            try:
                fresh = reload_config()
            except Exception as e:  # a bad file (or unreadable, …): keep running as we are
                log.error("SIGHUP: configuration not reloaded, the running one stays: %s", e)
                return
            if fresh.write_keys:
                write_keys.replace(fresh.write_keys)
                log.info("SIGHUP: %d write keys loaded", len(fresh.write_keys))
        reloaded = await geoip.reload_if_changed()
        log.info("SIGHUP: geoip database %s", "reloaded" if reloaded else "unchanged")

    async def serve_http(task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        hconfig = hypercorn.config.Config()
        hconfig.bind = [config.server.listen]
        hconfig.accesslog = None
        hconfig.errorlog = logging.getLogger("evactors.http")
        hconfig.graceful_timeout = max(1.0, config.supervisor.drain_seconds / 3)
        # One rule for slow and idle clients: nothing received for this long closes it.
        hconfig.keep_alive_timeout = config.server.read_timeout_seconds
        hconfig.read_timeout = config.server.read_timeout_seconds  # type: ignore[assignment]
        hconfig.h11_max_incomplete_size = 64 * 1024
        listening = False

        def started(binds: list[str]) -> None:
            nonlocal listening
            listening = True
            task_status.started(binds)

        try:
            app: Any = ingest  # an ASGI callable; hypercorn's types want its TypedDicts
            status: Any = SimpleNamespace(started=started)
            await hypercorn.trio.serve(app, hconfig, shutdown_trigger=shutdown.wait,
                                       task_status=status)
        except* OSError as group:  # hypercorn reports a failed bind inside a group
            if listening:
                raise
            e = group.exceptions[0]
            reason = getattr(e, "strerror", None) or e
            raise StartupError(f"cannot listen on {config.server.listen}: {reason}") from None
        finally:
            ingest.outbox.close()

    async def drain_deadline(cancel: trio.CancelScope) -> None:
        await shutdown.wait()
        await trio.sleep(config.supervisor.drain_seconds)
        log.warning("drain deadline (%.0fs) reached; what is left stays durable in Redis",
                    config.supervisor.drain_seconds)
        cancel.cancel()

    try:
        async with trio.open_nursery() as root:
            root.start_soon(_watch_signals, shutdown, root.cancel_scope, reload)
            root.start_soon(systemd.watchdog)
            root.start_soon(drain_deadline, root.cancel_scope)
            # Background actors: cancelled with the root once the pipeline has drained.
            root.start_soon(sup.supervise, "cleanup", cleanup, backlog, depths)
            root.start_soon(sup.supervise, "live-hub", hub.run, shutdown)
            if embedded is not None:
                root.start_soon(sup.supervise, "valkey-keeper", embedded.keep)
            root.start_soon(sup.supervise, "geoip-reloader", geoip.watch,
                            config.geoip.reload_check_seconds)
            async with trio.open_nursery() as actors:
                actors.start_soon(sup.supervise, "publisher", publisher, publish, notice_rx)

                async def acker_then_drained() -> None:
                    await sup.supervise("acker", acker, redis, keys, in_flight, done_rx)
                    drained.set()

                actors.start_soon(acker_then_drained)
                flusher_notices = notice_tx.clone()
                actors.start_soon(functools.partial(sup.supervise, "flusher", flusher, flush,
                                                    config.flush.interval_seconds, drained,
                                                    flusher_notices, closes=(flusher_notices,)))
                workers = min(pipe.session_workers, pipe.session_shards)
                for w in range(workers):  # the shards in child processes, on other cores
                    params = _worker_params(config, redis.url, w, workers)
                    inboxes = {s: shard_channels[s][1] for s in params.shards}
                    d = done_tx.clone()
                    actors.start_soon(functools.partial(
                        sup.supervise, f"session-worker-{w}", worker_link, params, inboxes, d,
                        replayed, closes=(d,)))
                if not workers:  # the shards in this process
                    start_shard_actors(actors, sup.supervise, pipe, redis, keys,
                                       {i: rx for i, (_tx, rx) in enumerate(shard_channels)},
                                       done_tx, notice_tx, replayed)
                shard_txs = [tx for tx, _ in shard_channels]
                for j in range(pipe.enrichers):
                    outs = [tx.clone() for tx in shard_txs]
                    d = done_tx.clone()
                    actors.start_soon(functools.partial(
                        sup.supervise, f"enricher-{j}", enricher, enrich, pipe.session_shards,
                        to_enrich_rx.clone(), outs, d, dead_letters, closes=(*outs, d)))
                for tx in shard_txs:
                    tx.close()
                done_tx.close()
                notice_tx.close()
                to_enrich_rx.close()
                replay_tx = to_enrich_tx.clone()
                replay = Replayer(redis, keys, in_flight, replay_tx, 120.0, dead_letters)
                actors.start_soon(functools.partial(sup.supervise, "replayer", replayer, replay,
                                                    shutdown, replayed, closes=(replay_tx,)))
                to_enrich_tx.close()
                # What an earlier run accepted goes into the pipeline before anything new:
                # a visitor's events then reach their session in the order they came.
                await replayed.wait()
                binds = await actors.start(serve_http)
                info = {"pid": os.getpid(), "url": binds[0] if binds else "",
                        "data_dir": str(data_dir), "write_key": generated_key}
                (data_dir / "service.json").write_text(json.dumps(info))
                log.info("listening on %s", ", ".join(binds))
                systemd.notify("READY=1", f"STATUS=listening on {info['url']}")
                if ready is not None:
                    ready(info)
                await shutdown.wait()
                systemd.notify("STOPPING=1", "STATUS=draining in-flight events")
            root.cancel_scope.cancel()
    except* ActorFailed:
        exit_code = EXIT_FATAL
    except* StartupError as group:
        startup_error = group.exceptions[0]  # type: ignore[assignment]
    finally:
        (data_dir / "service.json").unlink(missing_ok=True)
    if startup_error is not None:
        raise startup_error
    with contextlib.suppress(*TRANSIENT), trio.move_on_after(2):
        left = await backlog.exact()
        log.info("stopped; %d events remain durable in Redis (plus screen views held "
                 "in open sessions)", left)
    return exit_code

