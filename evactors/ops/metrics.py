"""Prometheus metrics of every actor, in one registry the service exposes on ``/metrics``."""

from __future__ import annotations

import sys

from prometheus_client import CollectorRegistry, Counter, Gauge, GCCollector, Histogram, ProcessCollector

from evactors.ops.malloc import mallinfo

REGISTRY = CollectorRegistry(auto_describe=True)


# process_resident_memory_bytes, process_cpu_seconds_total, open fds: of this process only
# (the session worker and an embedded Valkey are processes of their own).
ProcessCollector(registry=REGISTRY)


GCCollector(registry=REGISTRY)  # python_gc_collections_total{generation}, objects collected


EVENTS_ACCEPTED = Counter("evactors_events_accepted", "Events acknowledged to clients (durable in Redis)",
                          ["project"], registry=REGISTRY)


EVENTS_REJECTED = Counter("evactors_events_rejected", "Events refused at ingest, by reason",
                          ["reason"], registry=REGISTRY)


REQUESTS = Counter("evactors_http_requests", "HTTP requests by endpoint and status",
                   ["endpoint", "status"], registry=REGISTRY)


HTTP_LATENCY = Histogram("evactors_http_latency_seconds", "Time to answer an ingest request",
                         buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5),
                         registry=REGISTRY)


DUPLICATES = Counter("evactors_duplicates", "Events dropped as duplicates of a messageId",
                     registry=REGISTRY)


BOTS = Counter("evactors_bots", "Bot events, by reason", ["reason"], registry=REGISTRY)


STAGE_EVENTS = Counter("evactors_stage_events", "Events out of each stage", ["stage"],
                       registry=REGISTRY)


ROWS_INSERTED = Counter("evactors_rows_inserted", "Rows inserted into ClickHouse", ["table"],
                        registry=REGISTRY)


FLUSH_SECONDS = Histogram("evactors_flush_seconds", "Duration of one ClickHouse insert",
                          registry=REGISTRY)


CLICKHOUSE_ERRORS = Counter("evactors_clickhouse_errors", "Failed ClickHouse operations",
                            ["operation"], registry=REGISTRY)


REDIS_ERRORS = Counter("evactors_redis_errors", "Failed Redis operations (retried)", ["operation"],
                       registry=REGISTRY)


ACTOR_RESTARTS = Counter("evactors_actor_restarts", "Restarts of crashed actors", ["actor"],
                         registry=REGISTRY)


LATE_EVENTS = Counter("evactors_late_events", "Events older than their session's latest event, by "
                      "outcome: reordered (within the lateness window), beyond_window, closed_session",
                      ["outcome"], registry=REGISTRY)


REMAPS = Counter("evactors_remaps", "Anonymous ids re-mapped (bin/evactors remap)", registry=REGISTRY)


LEASES_TAKEN = Counter("evactors_shard_leases_taken", "Session shards taken by lease (at start, or again "
                       "after a lapse)", registry=REGISTRY)


LEASES_LOST = Counter("evactors_shard_leases_lost", "Session shards whose lease another owner took "
                      "(this one stopped writing them)", registry=REGISTRY)


FORWARDED = Counter("evactors_forwarded_events", "Events left in a shard's inbox for its owner (an "
                    "instance that does not hold the shard took them)", registry=REGISTRY)

COMMITS_LATE = Counter(
    "evactors_commits_late", "Requests whose answer waited for their commit (pipeline.answer) longer "
    "than pipeline.answer_wait_seconds: answered 503 commit_late, their events durable all the same",
    registry=REGISTRY)

LIVE_INSTANCES = Gauge("evactors_live_instances", "Live instances on this Redis (ingest or sessions "
                       "role), as this one last read them", registry=REGISTRY)


FENCED = Counter("evactors_fenced_commits", "Session commits refused by their shard's fence (nothing "
                 "written; retried under a new lease, or dropped with the lease)", registry=REGISTRY)


SESSIONS_CLOSED = Counter("evactors_sessions_closed", "Sessions closed", registry=REGISTRY)


BACKLOG = Gauge("evactors_backlog_events", "Events durable in Redis, not yet in ClickHouse",
                registry=REGISTRY)


LAG = Gauge("evactors_lag_seconds", "Age of the oldest event waiting in Redis", registry=REGISTRY)


CHANNEL_DEPTH = Gauge("evactors_channel_depth_batches", "Batches waiting in a channel between actors",
                      ["channel"], registry=REGISTRY)


FLUSH_ROWS = Histogram("evactors_flush_rows", "Rows in one ClickHouse insert",
                       buckets=(1, 10, 100, 500, 1000, 5000, 10000, 20000, 50000), registry=REGISTRY)


GEOIP_RELOADS = Counter("evactors_geoip_reloads", "GeoIP database reloads", registry=REGISTRY)


PUBLISH_DROPPED = Counter("evactors_publish_dropped", "Notifications skipped (publisher behind)",
                          registry=REGISTRY)


DEAD_LETTERS = Counter("evactors_dead_letters", "Entries moved to the dead-letter stream",
                       registry=REGISTRY)


REPLAYED = Counter("evactors_replayed_entries", "Ingest entries re-fed after a crash or restart",
                   registry=REGISTRY)


PYTHON_BLOCKS = Gauge("evactors_python_allocated_blocks",
                      "Memory blocks Python's allocator holds (objects and buffers): with "
                      "process_resident_memory_bytes, tells Python's growth from the rest (chDB)",
                      registry=REGISTRY)


PYTHON_BLOCKS.set_function(sys.getallocatedblocks)


MALLOC = Gauge("evactors_malloc_bytes",
               "glibc's malloc in the main process: in_use (what C code and Python's buffers over "
               "512 bytes hold), free (freed, kept in its arenas, not returned to the system)",
               ["kind"], registry=REGISTRY)


_mallinfo = mallinfo()


if _mallinfo is not None:
    _info = _mallinfo

    def _malloc_in_use() -> float:
        info = _info()  # one snapshot: the heap's blocks and the mmapped ones together
        return float(info.uordblks + info.hblkhd)

    MALLOC.labels("in_use").set_function(_malloc_in_use)
    MALLOC.labels("free").set_function(lambda: float(_info().fordblks))

# Redis bounded by bytes (evactors/redis_memory.py)
REDIS_USED_MEMORY = Gauge("evactors_redis_used_memory_bytes", "Redis's used_memory", registry=REGISTRY)
REDIS_MAXMEMORY = Gauge("evactors_redis_maxmemory_bytes", "Redis's maxmemory (0: none)",
                        registry=REGISTRY)
BACKLOG_BYTES = Gauge("evactors_backlog_bytes", "Bytes of the ingest stream and the buffers "
                      "(MEMORY USAGE, sampled)", registry=REGISTRY)
REDIS_EVICTED = Counter("evactors_redis_evicted_keys", "Keys Redis evicted while the service ran "
                        "(each one may lose or double events: should stay 0)", registry=REGISTRY)
HELD_VIEWS_TRUNCATED = Counter("evactors_held_views_truncated", "Screen views whose properties were "
                               "cut to pipeline.max_held_view_bytes while held in a session's state",
                               registry=REGISTRY)
CONNECTIONS_OPEN = Gauge("evactors_http_connections", "Open HTTP connections", registry=REGISTRY)
CONNECTIONS_REFUSED = Counter("evactors_http_connections_refused", "Connections refused at accept, by "
                              "limit (total, per_ip, fd_limit)", ["limit"], registry=REGISTRY)
RATE_LIMITED = Counter("evactors_rate_limited", "Requests answered 429 by a rate limit (key, device) "
                       "or 408/503 by a request bound (body_timeout, body_memory)", ["limit"],
                       registry=REGISTRY)
