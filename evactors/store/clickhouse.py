"""ClickHouse: one client (HTTP server by DSN, or embedded chDB), the schema and its migrations.

clickhouse-connect's async client is asyncio-only, so under trio the sync client runs in a
worker thread behind a limiter of one. Inserts carry ``insert_deduplication_token``: the
same planned chunk inserted twice (a retry after a crash) lands once, at insert time.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import clickhouse_connect
import msgspec
import trio

from evactors.core.model import BotRow, EventRow, ProfileRow, SessionRow
from evactors.ops import metrics
from evactors.store import clickhouse_cluster
from evactors.store.paths import DataDir

log = logging.getLogger("evactors.clickhouse")


# Blocks remembered per table for insert deduplication. A chunk is retried within minutes
# of its first try; 100k blocks is > 3 h even at 8 inserts a second into one table.
DEDUP_WINDOW = 100_000


_EVENT_TYPES: dict[str, str] = {
    "id": "UUID",
    "project_id": "LowCardinality(String)",
    "name": "LowCardinality(String)",
    "device_id": "String",
    "profile_id": "String",
    "session_id": "String",
    "created_at": "DateTime64(3, 'UTC')",
    "received_at": "DateTime64(3, 'UTC')",
    "path": "String",
    "origin": "String",
    "referrer": "String",
    "referrer_name": "String",
    "duration": "UInt64",
    "properties": "Map(String, String)",
    "country": "LowCardinality(String)",
    "country_name": "LowCardinality(String)",
    "region": "LowCardinality(String)",
    "region_name": "LowCardinality(String)",
    "city": "String",
    "postal_code": "String",
    "latitude": "Nullable(Float32)",
    "longitude": "Nullable(Float32)",
    "timezone": "LowCardinality(String)",
    "browser": "LowCardinality(String)",
    "browser_version": "String",
    "os": "LowCardinality(String)",
    "os_version": "String",
    "device": "LowCardinality(String)",
    "brand": "LowCardinality(String)",
    "model": "String",
    "utm_source": "String",
    "utm_medium": "String",
    "utm_campaign": "String",
    "utm_term": "String",
    "utm_content": "String",
    "is_new_session": "UInt8",
    "session_number": "UInt32",
    "session_start": "DateTime64(3, 'UTC')",
    "message_id": "String",
    "type": "LowCardinality(String)",
    "is_bot": "UInt8",
    "bot_reason": "LowCardinality(String)",
    "sdk_name": "LowCardinality(String)",
    "sdk_version": "String",
    "ip": "String",
    "user_agent": "String",
}


_SESSION_TYPES: dict[str, str] = {
    "session_id": "String",
    "project_id": "LowCardinality(String)",
    "device_id": "String",
    "profile_id": "String",
    "session_start": "DateTime64(3, 'UTC')",
    "session_end": "DateTime64(3, 'UTC')",
    "duration_seconds": "UInt32",
    "page_count": "UInt32",
    "event_count": "UInt32",
    "session_number": "UInt32",
    "entry_page": "String",
    "exit_page": "String",
    "referrer": "String",
    "utm_source": "String",
    "utm_medium": "String",
    "utm_campaign": "String",
    "utm_term": "String",
    "utm_content": "String",
    "country": "LowCardinality(String)",
    "city": "String",
    "browser": "LowCardinality(String)",
    "os": "LowCardinality(String)",
    "device": "LowCardinality(String)",
    "reason": "LowCardinality(String)",
    "version": "UInt64",
}


_PROFILE_TYPES: dict[str, str] = {
    "project_id": "LowCardinality(String)",
    "profile_id": "String",
    "anonymous_id": "String",
    "traits": "Map(String, String)",
    "created_at": "DateTime64(3, 'UTC')",
    "updated_at": "DateTime64(3, 'UTC')",
}


_BOT_TYPES: dict[str, str] = {
    "id": "UUID",
    "project_id": "LowCardinality(String)",
    "name": "LowCardinality(String)",
    "device_id": "String",
    "path": "String",
    "reason": "LowCardinality(String)",
    "user_agent": "String",
    "created_at": "DateTime64(3, 'UTC')",
    "message_id": "String",
}


BOTS_RETENTION_DAYS = 90


def _columns(types: dict[str, str], struct: type[msgspec.Struct]) -> str:
    assert list(types) == list(struct.__struct_fields__), f"{struct.__name__} and its table differ"
    return ",\n  ".join(f"`{name}` {typ}" for name, typ in types.items())


# (view, target, SELECT over events): kept by ClickHouse at insert time, so no counter is
# lost in a crash; deduplicated with the insert that feeds them.
_AGGREGATES = [
    ("daily_events_mv", "daily_events",
     "SELECT project_id, toDate(created_at) AS day, name, count() AS events "
     "FROM {db}.events GROUP BY project_id, day, name"),
    ("daily_page_views_mv", "daily_page_views",
     "SELECT project_id, toDate(created_at) AS day, path, count() AS views FROM {db}.events "
     "WHERE name = 'screen_view' GROUP BY project_id, day, path"),
    ("daily_active_users_mv", "daily_active_users",
     "SELECT project_id, toDate(created_at) AS day, "
     "uniqState(if(profile_id != '', profile_id, device_id)) AS users FROM {db}.events "
     "WHERE name != 'session_end' GROUP BY project_id, day"),
]


# (view, target, SELECT over profiles): what identify calls leave per trait and per profile.
# Both targets are idempotent (latest per trait; min / max / set), so a row seen twice
# (a backfill racing a live insert) changes nothing.
_PROFILE_VIEWS = [
    ("profile_traits_mv", "profile_traits",
     "SELECT project_id, profile_id, key, value, updated_at FROM {db}.profiles "
     "ARRAY JOIN mapKeys(traits) AS key, mapValues(traits) AS value"),
    ("profile_summary_mv", "profile_summary",
     "SELECT project_id, profile_id, groupUniqArrayState(1000)(anonymous_id) AS anonymous_ids, "
     "min(created_at) AS first_seen, max(updated_at) AS last_seen FROM {db}.profiles "
     "GROUP BY project_id, profile_id"),
]


# Daily active users as migration 5 keeps them: exact (read with uniqExactMerge).
_EXACT_DAU = ("SELECT project_id, toDate(created_at) AS day, "
              "uniqExactState(if(profile_id != '', profile_id, device_id)) AS users FROM {db}.events "
              "WHERE name != 'session_end' GROUP BY project_id, day")


TABLES: dict[str, tuple[type[msgspec.Struct], list[str]]] = {
    "events": (EventRow, list(_EVENT_TYPES)),
    "sessions": (SessionRow, list(_SESSION_TYPES)),
    "profiles": (ProfileRow, list(_PROFILE_TYPES)),
    "events_bots": (BotRow, list(_BOT_TYPES)),
}


# Ordered, append-only. A migration is one or more statements; {db} is the database.
# A table created after migration 6 carries ``SETTINGS concurrent_part_removal_threshold``
# in its CREATE (a test checks every MergeTree table of ours).
MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (1, "events, sessions, profiles", [
        f"""CREATE TABLE IF NOT EXISTS {{db}}.events (
  {_columns(_EVENT_TYPES, EventRow)}
) ENGINE = MergeTree
PARTITION BY toYYYYMM(created_at)
ORDER BY (project_id, toDate(created_at), name, created_at)
SETTINGS non_replicated_deduplication_window = {DEDUP_WINDOW}""",
        f"""CREATE TABLE IF NOT EXISTS {{db}}.sessions (
  {_columns(_SESSION_TYPES, SessionRow)}
) ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(session_start)
ORDER BY (project_id, session_id)
SETTINGS non_replicated_deduplication_window = {DEDUP_WINDOW}""",
        f"""CREATE TABLE IF NOT EXISTS {{db}}.profiles (
  {_columns(_PROFILE_TYPES, ProfileRow)}
) ENGINE = ReplacingMergeTree(updated_at)
ORDER BY (project_id, profile_id)
SETTINGS non_replicated_deduplication_window = {DEDUP_WINDOW}""",
    ]),
    (2, "events_bots: filtered bot events, kept for a while", [
        f"""CREATE TABLE IF NOT EXISTS {{db}}.events_bots (
  {_columns(_BOT_TYPES, BotRow)}
) ENGINE = MergeTree
PARTITION BY toYYYYMM(created_at)
ORDER BY (project_id, toDate(created_at), reason, name)
TTL toDateTime(created_at) + INTERVAL {BOTS_RETENTION_DAYS} DAY
SETTINGS non_replicated_deduplication_window = {DEDUP_WINDOW}""",
    ]),
    (3, "daily pre-aggregates kept by ClickHouse: events by name, page views, active users", [
        f"""CREATE TABLE IF NOT EXISTS {{db}}.daily_events (
  project_id LowCardinality(String), day Date, name LowCardinality(String), events UInt64
) ENGINE = SummingMergeTree ORDER BY (project_id, day, name)
SETTINGS non_replicated_deduplication_window = {DEDUP_WINDOW}""",
        f"""CREATE TABLE IF NOT EXISTS {{db}}.daily_page_views (
  project_id LowCardinality(String), day Date, path String, views UInt64
) ENGINE = SummingMergeTree ORDER BY (project_id, day, path)
SETTINGS non_replicated_deduplication_window = {DEDUP_WINDOW}""",
        f"""CREATE TABLE IF NOT EXISTS {{db}}.daily_active_users (
  project_id LowCardinality(String), day Date, users AggregateFunction(uniq, String)
) ENGINE = AggregatingMergeTree ORDER BY (project_id, day)
SETTINGS non_replicated_deduplication_window = {DEDUP_WINDOW}""",
        *[f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {{db}}.{view} TO {{db}}.{target} AS {select}"""
          for view, target, select in _AGGREGATES],
        # what the events table held before the views existed; a token makes a rerun of an
        # interrupted migration a no-op instead of a second count
        *[f"INSERT INTO {{db}}.{target} SETTINGS insert_deduplicate = 1, "
          f"insert_deduplication_token = 'migration-3-{target}' {select}"
          for _view, target, select in _AGGREGATES],
    ]),
    (4, "profiles merged per trait (latest event time wins): profile_traits, profile_summary, "
        "profiles_merged", [
        # one row per (profile, trait): a later identify with fewer traits keeps the others
        f"""CREATE TABLE IF NOT EXISTS {{db}}.profile_traits (
  project_id LowCardinality(String), profile_id String, key String, value String,
  updated_at DateTime64(3, 'UTC')
) ENGINE = ReplacingMergeTree(updated_at) ORDER BY (project_id, profile_id, key)
SETTINGS non_replicated_deduplication_window = {DEDUP_WINDOW}""",
        f"""CREATE TABLE IF NOT EXISTS {{db}}.profile_summary (
  project_id LowCardinality(String), profile_id String,
  anonymous_ids AggregateFunction(groupUniqArray(1000), String),
  first_seen SimpleAggregateFunction(min, DateTime64(3, 'UTC')),
  last_seen SimpleAggregateFunction(max, DateTime64(3, 'UTC'))
) ENGINE = AggregatingMergeTree ORDER BY (project_id, profile_id)
SETTINGS non_replicated_deduplication_window = {DEDUP_WINDOW}""",
        *[f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {{db}}.{view} TO {{db}}.{target} AS {select}"""
          for view, target, select in _PROFILE_VIEWS],
        # what profiles held before (only the latest row of a profile whose rows were merged)
        *[f"INSERT INTO {{db}}.{target} SETTINGS insert_deduplicate = 1, "
          f"insert_deduplication_token = 'migration-4-{target}' {select}"
          for _view, target, select in _PROFILE_VIEWS],
        # read-time merge, independent of background merges and of arrival order: per trait
        # the value of the latest event time (ties: the greater value, so it is deterministic)
        """CREATE VIEW IF NOT EXISTS {db}.profiles_merged AS
SELECT s.project_id AS project_id, s.profile_id AS profile_id, t.traits AS traits,
  s.anonymous_ids AS anonymous_ids, s.first_seen AS first_seen, s.last_seen AS last_seen
FROM (SELECT project_id, profile_id, groupUniqArrayMerge(1000)(anonymous_ids) AS anonymous_ids,
        min(first_seen) AS first_seen, max(last_seen) AS last_seen
      FROM {db}.profile_summary GROUP BY project_id, profile_id) AS s
LEFT JOIN (SELECT project_id, profile_id, mapFromArrays(groupArray(key), groupArray(value)) AS traits
           FROM (SELECT project_id, profile_id, key, argMax(value, (updated_at, value)) AS value
                 FROM {db}.profile_traits GROUP BY project_id, profile_id, key)
           GROUP BY project_id, profile_id) AS t
ON s.project_id = t.project_id AND s.profile_id = t.profile_id""",
    ]),
    (5, "daily_active_users exact (uniqExact): uniq's estimate is off by ~1% past 65,536 users a day", [
        "DROP VIEW IF EXISTS {db}.daily_active_users_mv",
        "DROP TABLE IF EXISTS {db}.daily_active_users",
        f"""CREATE TABLE IF NOT EXISTS {{db}}.daily_active_users (
  project_id LowCardinality(String), day Date, users AggregateFunction(uniqExact, String)
) ENGINE = AggregatingMergeTree ORDER BY (project_id, day)
SETTINGS non_replicated_deduplication_window = {DEDUP_WINDOW}""",
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {{db}}.daily_active_users_mv TO {{db}}.daily_active_users "
        f"AS {_EXACT_DAU}",
        # rebuilt from events (the migration runs before the flusher starts)
        f"INSERT INTO {{db}}.daily_active_users SETTINGS insert_deduplicate = 1, "
        f"insert_deduplication_token = 'migration-5-daily_active_users' {_EXACT_DAU}",
    ]),
    # More than 100 outdated parts (chDB drops them as soon as they are merged) are removed
    # by up to 128 threads at once, which then stay idle in ClickHouse's global pool, holding
    # memory for the life of the process (docs/benchmarks.md, RSS). One thread removes our
    # tables' small parts in milliseconds. (On a server: removal from local disks is one
    # thread; remote disks have their own threshold.)
    (6, "outdated parts removed by one thread (no burst of 128 threads that stay)", [
        f"ALTER TABLE {{db}}.{table} MODIFY SETTING concurrent_part_removal_threshold = 1000000000"
        for table in ("events", "sessions", "profiles", "events_bots", "daily_events", "daily_page_views",
                      "daily_active_users", "profile_traits", "profile_summary")
    ]),
]


SCHEMA_VERSION = MIGRATIONS[-1][0]


# Types the flusher declares for its inserts: the tables' own, except LowCardinality(String)
# sent as String, which ClickHouse converts on insert. clickhouse-connect builds a
# LowCardinality column's dictionary in Python (a third of an events insert's GIL time);
# the engine does it in C++ with the GIL released. Declared types also spare a DESCRIBE.
INSERT_TYPES: dict[str, list[str]] = {
    table: ["String" if t == "LowCardinality(String)" else t for t in types.values()]
    for table, types in (("events", _EVENT_TYPES), ("sessions", _SESSION_TYPES),
                         ("profiles", _PROFILE_TYPES), ("events_bots", _BOT_TYPES))
}


# Every insert of the flusher: deduplicated by its token, and so are the materialized views
# it feeds (pre-aggregates, profile traits), which would otherwise count a retried chunk twice.
INSERT_SETTINGS: dict[str, int] = {
    "insert_deduplicate": 1,
    "deduplicate_blocks_in_dependent_materialized_views": 1,
    "max_partitions_per_insert_block": 0,  # an import may span years of monthly partitions
}


# The embedded engine's inserts: rows as JSONCompactEachRow (msgspec encodes a row in ~1 µs;
# clickhouse-connect's Native encoder took ~12 µs per events row in Python, the GIL held),
# read by the engine from a file with ``file()`` and converted in C++. Times travel as
# integer milliseconds (a JSON integer would be read as seconds), coordinates as Float64 cast
# to Float32 by the engine as clickhouse-connect did, so stored values are identical.
# docs/benchmarks.md: "Inserts: JSON through file()".
_JSON_SLICE = 2_000
_encode_json = msgspec.json.Encoder().encode
JSON_READ_SETTINGS: dict[str, int] = {
    "input_format_parallel_parsing": 0,  # one reader: the same blocks (and tokens) on a retry
    "max_threads": 1,
}


def _insert_json_sql(table: str, types: dict[str, str]) -> str:
    read, select = [], []
    for name, typ in types.items():
        if typ.startswith("DateTime64(3"):
            read.append(f"{name} Int64")
            select.append(f"fromUnixTimestamp64Milli({name}, 'UTC')")
        elif typ == "Nullable(Float32)":
            read.append(f"{name} Nullable(Float64)")
            select.append(name)
        else:
            read.append(f"{name} {'String' if typ == 'LowCardinality(String)' else typ}")
            select.append(name)
    structure = ", ".join(read)
    return (f"INSERT INTO {{db}}.{table} ({', '.join(types)}) SETTINGS {{settings}} "
            f"SELECT {', '.join(select)} "
            f"FROM file('{{path}}', JSONCompactEachRow, '{structure}')")


def _quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


INSERT_JSON: dict[str, str] = {
    table: _insert_json_sql(table, types)
    for table, types in (("events", _EVENT_TYPES), ("sessions", _SESSION_TYPES),
                         ("profiles", _PROFILE_TYPES), ("events_bots", _BOT_TYPES))
}


def embedded_dsn(data_dir: Path) -> str:
    return f"chdb://{DataDir(data_dir).clickhouse.resolve()}"


# chDB's allocator (jemalloc, inside its library) keeps freed pages 5 s before it returns them,
# and inserts and merges free a lot at a time: returned after 1 s, resident memory stays close
# to what is allocated (docs/benchmarks.md, RSS). Read once, when the library starts;
# ``JE_MALLOC_CONF`` in the environment wins.
EMBEDDED_MALLOC_CONF = "dirty_decay_ms:1000"


_ENGINE_START = threading.Lock()


def connect(dsn: str) -> Any:
    """A sync clickhouse-connect client (chDB when the DSN is ``chdb://…``)."""
    if not dsn.startswith("chdb://"):
        return clickhouse_connect.get_client(dsn=dsn)
    Path(dsn.removeprefix("chdb://")).mkdir(parents=True, exist_ok=True)
    if "JE_MALLOC_CONF" in os.environ or "chdb" in sys.modules:  # the user's, or started already
        return clickhouse_connect.get_client(dsn=dsn)
    with _ENGINE_START:
        # Only while the engine starts: processes started later keep their own defaults.
        os.environ["JE_MALLOC_CONF"] = EMBEDDED_MALLOC_CONF
        try:
            return clickhouse_connect.get_client(dsn=dsn)
        finally:
            os.environ.pop("JE_MALLOC_CONF", None)


def schema_statements(statements: list[str], cluster: str = "") -> list[str]:
    """A migration's statements, as one node runs them or, with ``cluster``, on that cluster
    (``clickhouse_cluster``); ``{db}`` still in them."""
    if not cluster:
        return statements
    return [out for statement in statements for out in clickhouse_cluster.on_cluster(statement, cluster)]


def _schema_head(database: str, cluster: str) -> list[str]:
    """The database and the table of applied versions, before any migration."""
    if cluster:
        return [clickhouse_cluster.database(database, cluster), clickhouse_cluster.migrations_table(database, cluster)]
    return [f"CREATE DATABASE IF NOT EXISTS {database}",
            f"CREATE TABLE IF NOT EXISTS {database}.schema_migrations "
            "(version UInt32, name String, applied_at DateTime('UTC') DEFAULT now()) "
            "ENGINE = ReplacingMergeTree ORDER BY version"]


def migrate(client: Any, database: str, cluster: str = "") -> list[int]:
    """Create the database and apply missing migrations, idempotently. Returns what ran.
    With ``cluster``, the schema of that ClickHouse cluster (every node, ``ON CLUSTER``)."""
    for statement in _schema_head(database, cluster):
        client.command(statement)
    done = {row[0] for row in client.query(
        f"SELECT version FROM {database}.schema_migrations").result_rows}
    applied = []
    for version, name, statements in MIGRATIONS:
        if version in done:
            continue
        for statement in schema_statements(statements, cluster):
            client.command(statement.replace("{db}", database))
        client.insert("schema_migrations", [[version, name]], column_names=["version", "name"],
                      database=database)
        log.info("schema migration %d applied: %s", version, name)
        applied.append(version)
    return applied


def schema_sql(database: str, cluster: str = "") -> str:
    """Every statement ``migrate`` runs on an empty database, as SQL text."""
    out = [f"{statement};\n" for statement in _schema_head(database, cluster)]
    for version, name, statements in MIGRATIONS:
        out.append(f"\n-- migration {version}: {name}\n")
        out += [f"{statement.replace('{db}', database)};\n" for statement in schema_statements(statements, cluster)]
    return "".join(out)


def schema_version(client: Any, database: str) -> int:
    rows = client.query(f"SELECT max(version) FROM {database}.schema_migrations").result_rows
    return int(rows[0][0] or 0)


class ClickHouse:
    """The service's ClickHouse: a sync client used from one worker thread at a time."""

    def __init__(self, dsn: str, database: str, timeout: float, cluster: str = "") -> None:
        self.dsn = dsn
        self.database = database
        self.timeout = timeout
        self.cluster = cluster  # a ClickHouse cluster's name: its schema, its insert settings
        self.insert_settings = {**INSERT_SETTINGS, **(clickhouse_cluster.INSERT_SETTINGS if cluster else {})}
        self.client: Any = None
        self.limiter = trio.CapacityLimiter(1)
        self._retry_at = 0.0
        self._retry_delay = 0.0

    def open(self) -> None:
        self.client = connect(self.dsn)
        migrate(self.client, self.database, self.cluster)

    async def ensure_open(self) -> bool:
        """Connect (and migrate) if not yet connected; False while ClickHouse is away."""
        if self.client is not None:
            return True
        if trio.current_time() < self._retry_at:
            return False
        try:
            await trio.to_thread.run_sync(self.open, limiter=self.limiter)
            return True
        except Exception as e:
            self.client = None
            self._retry_delay = min(max(self._retry_delay * 2, 0.5), 30.0)
            self._retry_at = trio.current_time() + self._retry_delay
            metrics.CLICKHOUSE_ERRORS.labels("connect").inc()
            log.warning("ClickHouse unreachable (%s); retrying in %.1fs",
                        str(e).splitlines()[0][:200] if str(e) else type(e).__name__, self._retry_delay)
            return False

    async def healthy(self) -> bool:
        """Connected, and (for a server) answering its ping; never waits behind an insert."""
        if not await self.ensure_open():
            return False
        if self.dsn.startswith("chdb://"):
            return True  # in-process: connected is answering
        try:
            with trio.fail_after(2):
                return bool(await trio.to_thread.run_sync(self.client.ping, abandon_on_cancel=True))
        except Exception:
            return False

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def insert_sync(self, table: str, rows: Sequence[msgspec.Struct], token: str) -> None:
        started = time.perf_counter()
        if self.dsn.startswith("chdb://"):
            self._insert_json(table, rows, token)
        else:
            self._insert_native(table, rows, token)
        log.debug("inserted %d rows into %s in %.1f ms", len(rows), table,
                  (time.perf_counter() - started) * 1000)

    def _insert_json(self, table: str, rows: Sequence[msgspec.Struct], token: str) -> None:
        """The rows as JSONCompactEachRow, encoded by msgspec a slice at a time (each call
        lets go of the GIL between slices) into a file the engine reads and converts in C++."""
        with tempfile.NamedTemporaryFile(prefix="evactors-insert-", suffix=".json") as f:
            for i in range(0, len(rows), _JSON_SLICE):
                if i:
                    f.write(b",")
                f.write(_encode_json(rows[i:i + _JSON_SLICE])[1:-1])
            f.flush()
            # settings inline: as ``command`` settings, chDB's client would SET and restore
            # each one around the insert (a dozen more queries)
            settings = {"insert_deduplication_token": token, **self.insert_settings, **JSON_READ_SETTINGS}
            clause = ", ".join(f"{k} = {_quote(v) if isinstance(v, str) else v}" for k, v in settings.items())
            self.client.command(INSERT_JSON[table].format(db=self.database, path=_quote(f.name)[1:-1],
                                                          settings=clause))

    def _insert_native(self, table: str, rows: Sequence[msgspec.Struct], token: str) -> None:
        """clickhouse-connect's Native format (a ClickHouse server over HTTP)."""
        _struct, columns = TABLES[table]
        # Transposed a slice at a time: a slice's row tuples die (by refcount) before the
        # collector sees them. ``zip(*all_rows)`` kept a whole chunk's alive at once, which the
        # collector then promoted and rescanned, every thread held (docs/benchmarks.md).
        data: list[list[Any]] = [[] for _ in columns]
        for i in range(0, len(rows), 256):
            part = zip(*(msgspec.structs.astuple(r) for r in rows[i:i + 256]), strict=False)
            for column, values in zip(data, part, strict=False):
                column.extend(values)
        self.client.insert(
            table, data, column_names=columns, column_type_names=INSERT_TYPES[table],
            database=self.database, column_oriented=True,
            settings={"insert_deduplication_token": token, **self.insert_settings},
        )

    async def insert(self, table: str, rows: Sequence[msgspec.Struct], token: str) -> None:
        with trio.fail_after(self.timeout):
            # Not abandoned on cancel: the client must not be closed under a running insert.
            await trio.to_thread.run_sync(self.insert_sync, table, rows, token,
                                          limiter=self.limiter)

    def query_sync(self, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
        result = self.client.query(sql)
        return list(result.column_names), result.result_rows

    async def query(self, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
        if not await self.ensure_open():
            raise ConnectionError("ClickHouse is not reachable")
        with trio.fail_after(self.timeout):
            return await trio.to_thread.run_sync(self.query_sync, sql, limiter=self.limiter)
