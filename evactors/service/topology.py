"""The topology: every channel and every actor of the service, wired in one place.

::

    HTTP ─► ingest ─[IngestBatch]─► enricher ×N ─[ShardBatch]─► session ×S ─► Redis buffer
              ▲ replayer ─┘                  └───[receipts]──► acker  ◄──────┘
                                                 flusher ◄── Redis buffer ─► ClickHouse
              session/flusher ─[notices]─► publisher ─► pub/sub, live keys

Each channel has one name, used by every actor that holds an end of it: ``to_enrich``,
``to_shard[s]``, ``receipts``, ``notices``. With ``pipeline.session_workers`` (default 1)
the session actors run in child processes (``service.session_worker``): a link actor per
worker takes their place here, with their channels.

Channel ends belong to the topology, which closes an actor's outgoing ends only when the
actor is finished for good (``supervise(closes=…)``), so a restart keeps its channels and
a normal end cascades downstream.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import trio

from evactors.core.config import Config
from evactors.core.exits import EXIT_FATAL, EXIT_OK
from evactors.core.messages import IngestBatch, Notice, Receipt, ShardBatch
from evactors.core.openpanel import Clients
from evactors.enrichment.bots import BotDetector
from evactors.enrichment.enrich import Enricher
from evactors.enrichment.geoip import GeoIP
from evactors.enrichment.useragent import UserAgentParser
from evactors.ops.sdnotify import Notifier
from evactors.pipeline.acker import acker
from evactors.pipeline.backlog import Backlog, backlog_gauges
from evactors.pipeline.deadletters import DeadLetters
from evactors.pipeline.durable_log import DurableLog
from evactors.pipeline.enricher import enricher
from evactors.pipeline.flusher import Flusher, flusher
from evactors.pipeline.inflight import InFlight
from evactors.pipeline.live_hub import LiveHub
from evactors.pipeline.memory_watch import rewrite_aof
from evactors.pipeline.memory_watch import watch as watch_memory
from evactors.pipeline.publisher import Publisher, publisher
from evactors.pipeline.replayer import Replayer, replayer
from evactors.pipeline.session_link import WorkerParams, worker_link
from evactors.pipeline.sessions import start_shard_actors
from evactors.service.credentials import AdminToken, WriteKeys, load_or_create_read_keys
from evactors.service.http.admin import AdminApp, AdminRoutes, admin_bind, serve_admin
from evactors.service.http.app import App
from evactors.service.http.cors import Cors
from evactors.service.http.health import Health
from evactors.service.http.live import LiveRoutes
from evactors.service.http.protocols import OtherApis
from evactors.service.http.segment_api import SegmentApi
from evactors.service.http.server import serve_http
from evactors.service.signals import drain_deadline, reloader, watch_signals
from evactors.service.status import Status
from evactors.service.supervisor import ActorFailed, StartupError, Supervisor
from evactors.store import leases
from evactors.store.clickhouse import ClickHouse
from evactors.store.keys import keys_for
from evactors.store.paths import DataDir
from evactors.store.redis_io import TRANSIENT, RedisIO, retrying
from evactors.store.redis_memory import Memory
from evactors.store.valkey import EmbeddedValkey

log = logging.getLogger("evactors.supervisor")



@dataclass
class Parts:
    """The real parts start-up opened and checked, and the credentials it loaded."""

    redis: RedisIO
    clickhouse: ClickHouse
    geoip: GeoIP
    write_keys: WriteKeys
    admin: AdminToken
    wait_aof: bool  # strict durability on an external Redis: WAITAOF after each write
    generated_key: str | None  # the write key generated for a config without any
    embedded: EmbeddedValkey | None
    read_keys: WriteKeys = field(default_factory=lambda: WriteKeys({}))  # the live view's
    new_read_keys: dict[str, str] = field(default_factory=dict)  # generated now: printed once
    instance: str = "evactors"  # this instance's name (the data dir's): its shards' leases carry it


def worker_params(config: Config, redis_url: str, index: int, workers: int, instance: str) -> WorkerParams:
    pipe = config.pipeline
    return WorkerParams(
        redis_url=redis_url, redis_timeout=config.redis.timeout_seconds,
        key_prefix=config.redis.key_prefix, wait_replicas=config.redis.wait_replicas,
        ingest_lanes=keys_for(config).lane_count,
        shards=[s for s in range(pipe.session_shards) if s % workers == index],
        log_level=config.log.level, log_format=config.log.format, parent=os.getpid(), instance=instance,
        pipeline=msgspec.to_builtins(pipe), supervisor=msgspec.to_builtins(config.supervisor))


async def serve(config: Config, parts: Parts, ready: Callable[[dict[str, Any]], None] | None,
                reload_config: Callable[[], Config] | None) -> int:
    """Run every actor and the HTTP API until the service stops; the exit code."""
    pipe = config.pipeline
    redis, clickhouse, write_keys = parts.redis, parts.clickhouse, parts.write_keys
    keys = keys_for(config)
    data_dir = DataDir(config.data_path)
    sup = Supervisor(config)
    capacity = pipe.channel_batches
    shutdown, drained, replayed = trio.Event(), trio.Event(), trio.Event()
    in_flight = InFlight()
    startup_error: StartupError | None = None

    to_enrich_tx, to_enrich_rx = trio.open_memory_channel[IngestBatch](capacity)
    to_shard = [trio.open_memory_channel[ShardBatch](capacity) for _ in range(pipe.session_shards)]
    receipts_tx, receipts_rx = trio.open_memory_channel[list[Receipt]](capacity * 8)
    notices_tx, notices_rx = trio.open_memory_channel[Notice](capacity * 8)

    backlog = Backlog(redis, keys, pipe.session_shards)
    await backlog.exact()
    enrich = Enricher(pipe, parts.geoip, UserAgentParser(pipe.ua_cache_size), BotDetector(pipe.ua_cache_size),
                      max_user_agent=config.limits.max_user_agent_length)
    flush = Flusher(redis, keys, clickhouse, pipe.session_shards, config.flush.chunk_rows, config.flush.min_rows)

    def depths() -> dict[str, int]:
        out = {"to-enrich": to_enrich_rx.statistics().current_buffer_used,
               "receipts": receipts_rx.statistics().current_buffer_used,
               "notices": notices_rx.statistics().current_buffer_used}
        for i, (_tx, rx) in enumerate(to_shard):
            out[f"to-session-{i}"] = rx.statistics().current_buffer_used
        return out

    status = Status(sup, backlog, depths, redis, keys, clickhouse, write_keys)
    hub = LiveHub(redis.url, keys, config.server.live_viewers, config.server.live_viewers_per_project)
    memory = Memory(config.server.high_water_bytes)
    dead_letters = DeadLetters(redis, keys)
    http_to_enrich = to_enrich_tx.clone()  # closed when the HTTP API stops
    others = leases.Others(pipe.lease_seconds)
    durable = DurableLog(redis, keys, parts.wait_aof, http_to_enrich, in_flight, pipe.answer_wait_seconds,
                         lambda: pipe.answers_committed(others.live))
    server = config.server

    def projects(c: Config) -> set[str]:  # every project a key or client names (CORS)
        return set(write_keys.projects()) | set(c.openpanel.clients.values())

    cors, clients = Cors(config.cors, projects(config)), Clients(config.openpanel)
    segment_api = SegmentApi(server, write_keys, durable, backlog, cors, memory, config.limits)
    admin = AdminRoutes(parts.admin, status, clickhouse, write_keys, durable, in_flight,
                        server.retry_after_seconds)
    app = App(
        segment_api,
        Health(redis, clickhouse, backlog, server.high_water_events, memory),
        LiveRoutes(parts.read_keys, hub), server.retry_after_seconds, OtherApis(segment_api, clients))
    admin_app = AdminApp(admin)

    def reconfigure(fresh: Config) -> None:  # SIGHUP: origins, OpenPanel clients, read keys
        cors.replace(fresh.cors, projects(fresh))
        clients.replace(fresh.openpanel)
        keys_now, made = load_or_create_read_keys(data_dir.root, write_keys.projects(), fresh.read_keys)
        parts.read_keys.replace(keys_now)
        for project in made.values():
            log.warning("SIGHUP: read key of project %s generated, in %s", project,
                        data_dir.read_key(project))
    publish = Publisher(redis, keys)
    exit_code = EXIT_OK
    systemd = Notifier()
    # Everything built so far (modules, parsers, pattern tables, clients) lives as long as
    # the process: out of the collector's sight, a full collection scans only what the
    # pipeline made since (docs/benchmarks.md: GC).
    gc.freeze()

    admin_at: list[str] = []  # where the admin listener listens (unix:PATH or a URL)

    async def http(task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        with http_to_enrich:
            async with trio.open_nursery() as listeners:  # the admin listener ends with it
                admin_at.append(await listeners.start(functools.partial(
                    serve_admin, admin_app, admin_bind(config.admin.listen, data_dir),
                    shutdown, max(1.0, config.supervisor.drain_seconds / 3))))
                if "ingest" in config.roles:
                    await serve_http(app, config, shutdown, task_status=task_status)
                else:  # no public listener: the admin API and /metrics only
                    task_status.started([])
                    await shutdown.wait()

    try:
        async with trio.open_nursery() as root:
            root.start_soon(watch_signals, shutdown, root.cancel_scope,
                            reloader(write_keys, parts.geoip, reload_config, reconfigure, config.data_path))
            root.start_soon(systemd.watchdog)
            root.start_soon(drain_deadline, shutdown, config.supervisor.drain_seconds, root.cancel_scope)
            # Background actors: cancelled with the root once the pipeline has drained.
            root.start_soon(sup.supervise, "backlog", backlog_gauges, backlog, depths)
            root.start_soon(sup.supervise, "live-hub", hub.run, shutdown)
            root.start_soon(sup.supervise, "redis-memory", watch_memory, memory, redis, keys,
                            pipe.session_shards)
            if parts.embedded is not None:
                root.start_soon(sup.supervise, "valkey-keeper", parts.embedded.keep)
                if config.redis.aof_rewrite_seconds:
                    root.start_soon(sup.supervise, "aof-rewriter", rewrite_aof, redis,
                                    config.redis.aof_rewrite_seconds)
            root.start_soon(sup.supervise, "geoip-reloader", parts.geoip.watch,
                            config.geoip.reload_check_seconds)
            sessions = "sessions" in config.roles
            workers = min(pipe.session_workers, pipe.session_shards) if sessions else 0
            # Session shards are held by lease (store.leases): by each worker, or here; an
            # instance without the sessions role takes none, and forwards their events
            in_process = leases.hold(redis, keys, range(pipe.session_shards), parts.instance, pipe.lease_seconds,
                                     take=sessions)
            async with (contextlib.nullcontext() if workers else in_process) as held, \
                    trio.open_nursery() as actors:
                actors.start_soon(sup.supervise, "publisher", publisher, publish, notices_rx)

                async def acker_then_drained() -> None:
                    await sup.supervise("acker", acker, redis, keys, in_flight, receipts_rx)
                    drained.set()

                actors.start_soon(acker_then_drained)
                if "flusher" in config.roles:
                    flusher_notices = notices_tx.clone()
                    actors.start_soon(functools.partial(sup.supervise, "flusher", flusher, flush,
                                                        config.flush.interval_seconds, drained,
                                                        flusher_notices, closes=(flusher_notices,)))
                for w in range(workers):  # the shards in child processes, on other cores
                    params = worker_params(config, redis.url, w, workers, parts.instance)
                    inboxes = {s: to_shard[s][1] for s in params.shards}
                    receipts = receipts_tx.clone()
                    actors.start_soon(functools.partial(
                        sup.supervise, f"session-worker-{w}", worker_link, params, inboxes, receipts,
                        replayed, closes=(receipts,)))
                if held is not None:  # the shards in this process
                    start_shard_actors(actors, sup.supervise, pipe, redis, keys,
                                       {i: rx for i, (_tx, rx) in enumerate(to_shard)},
                                       receipts_tx, notices_tx, replayed, held)
                shard_txs = [tx for tx, _ in to_shard]
                for j in range(pipe.enrichers):
                    outs = [tx.clone() for tx in shard_txs]
                    receipts = receipts_tx.clone()
                    actors.start_soon(functools.partial(
                        sup.supervise, f"enricher-{j}", enricher, enrich, pipe.session_shards,
                        to_enrich_rx.clone(), outs, receipts, dead_letters, pipe.unit_events,
                        pipe.unit_linger_ms / 1000, closes=(*outs, receipts)))
                for tx in shard_txs:
                    tx.close()
                receipts_tx.close()
                notices_tx.close()
                to_enrich_rx.close()
                replay_tx = to_enrich_tx.clone()
                replay = Replayer(redis, keys, in_flight, replay_tx, pipe.replay_after_seconds, dead_letters)
                actors.start_soon(functools.partial(sup.supervise, "replayer", replayer, replay,
                                                    shutdown, replayed, closes=(replay_tx,)))
                to_enrich_tx.close()
                # What an earlier run accepted goes into the pipeline before anything new:
                # a visitor's events then reach their session in the order they came.
                await replayed.wait()
                # Instances that take requests or hold shards say they are alive: while there are
                # several, answers wait for commits. One that joins lets the others see it (each
                # looks every third of a lease) before it takes a request.
                if {"ingest", "sessions"} & set(config.roles):
                    others.seen(await retrying("instances", leases.announce_once, redis, keys, parts.instance,
                                               int(pipe.lease_seconds * 1000)), parts.instance)
                    if others.live:
                        await trio.sleep(2 * pipe.lease_seconds / 3)
                    root.start_soon(sup.supervise, "instances", leases.announce, redis, keys, parts.instance,
                                    pipe.lease_seconds, others)  # until the root ends
                binds = await actors.start(http)
                info: dict[str, Any] = {"pid": os.getpid(), "url": binds[0] if binds else "",
                                        "admin": admin_at[0],
                                        "data_dir": str(data_dir.root)}
                data_dir.service_json.write_text(json.dumps(info))  # no key in it
                info["write_key"] = parts.generated_key  # printed once, when generated
                info["read_keys"] = parts.new_read_keys
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
        data_dir.service_json.unlink(missing_ok=True)
    if startup_error is not None:
        raise startup_error
    with contextlib.suppress(*TRANSIENT), trio.move_on_after(2):
        left = await backlog.exact()
        log.info("stopped; %d events remain durable in Redis (plus screen views held "
                 "in open sessions)", left)
    return exit_code
