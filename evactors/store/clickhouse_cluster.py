"""The schema on a ClickHouse cluster: the single-node migrations, rewritten statement by
statement.

Each table becomes two: ``T_local``, a ``Replicated*MergeTree`` on every node (its replicas
share one Keeper path per shard), and ``T``, a ``Distributed`` table over them with the name
the service and its readers already use. So the flusher inserts into ``events`` as on one
node, and a query reads the whole cluster.

Why inserts go through the Distributed tables, synchronously
(``distributed_foreground_insert``), and not to local tables:

- The sharding key is deterministic, so a retried insert (the same recorded plan, the same
  rows in the same order) splits into the same blocks per shard, each carrying the plan's
  ``insert_deduplication_token``: every shard drops what it already has, on whichever
  replica the retry lands (``replicated_deduplication_window``, kept in Keeper).
- ``events`` and ``sessions`` are sharded by (project, session): a session's versions meet
  on one shard, so ``FINAL`` stays correct there, and its events too. Profiles and their
  traits are sharded by (project, profile), so the views that fold them stay per shard.
- The materialized views are on the local tables, feeding local targets: each shard
  aggregates what it holds, and the aggregates are read through their Distributed tables,
  which merge the shards' states (``sum``, ``uniqExactMerge``: exact across shards).

A cluster schema starts empty: the backfills of migrations 3–5 (``INSERT … SELECT`` over
data the single-node tables held) are left out. Every statement of the migrations must have
a rule here; a new kind fails loudly (``tests/unit/test_clickhouse_cluster.py``).
"""

from __future__ import annotations

import re

# Rows of a table reach the shard of this key (a Distributed table's sharding key). The
# aggregate tables are written only by their views, on the local tables.
SHARDING_KEYS: dict[str, str] = {
    "events": "cityHash64(project_id, session_id)",
    "sessions": "cityHash64(project_id, session_id)",
    "profiles": "cityHash64(project_id, profile_id)",
    "profile_traits": "cityHash64(project_id, profile_id)",
    "profile_summary": "cityHash64(project_id, profile_id)",
    "events_bots": "cityHash64(project_id, device_id)",
    "daily_events": "rand()",
    "daily_page_views": "rand()",
    "daily_active_users": "rand()",
}

# Keeper paths: one per shard and table; {shard} and {replica} are each node's macros.
REPLICA_PATH = "/clickhouse/tables/{{shard}}/{db}/{table}"
MIGRATIONS_PATH = "/clickhouse/tables/all/{db}/schema_migrations"  # one table on every node

# The inserts' settings on a cluster: the Distributed table writes each shard's block before
# it answers, so a failed insert is retried whole (and deduplicated per shard).
INSERT_SETTINGS: dict[str, int] = {"distributed_foreground_insert": 1}

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_CREATE_TABLE = re.compile(
    r"CREATE TABLE IF NOT EXISTS \{db\}\.(\w+) \((.*)\) ENGINE = (\w*)MergeTree(?:\(([^)]*)\))?(.*)", re.S)
_CREATE_MV = re.compile(r"CREATE MATERIALIZED VIEW IF NOT EXISTS \{db\}\.(\w+) TO \{db\}\.(\w+) AS (.*)", re.S)
_CREATE_VIEW = re.compile(r"CREATE VIEW IF NOT EXISTS \{db\}\.(\w+) AS\s+(.*)", re.S)
_DROP = re.compile(r"DROP (VIEW|TABLE) IF EXISTS \{db\}\.(\w+)")
_ALTER = re.compile(r"ALTER TABLE \{db\}\.(\w+) (MODIFY SETTING .*)", re.S)
_FROM = re.compile(r"\bFROM \{db\}\.(\w+)")


def check_name(cluster: str) -> str:
    """A cluster name as ``remote_servers`` spells it; refused if it would need quoting."""
    if not _NAME.fullmatch(cluster):
        raise ValueError(f"not a cluster name: {cluster!r}")
    return cluster


def database(db: str, cluster: str) -> str:
    return f"CREATE DATABASE IF NOT EXISTS {db} ON CLUSTER `{check_name(cluster)}`"


def migrations_table(db: str, cluster: str) -> str:
    """The applied versions, one replicated table shared by every node of the cluster."""
    path = MIGRATIONS_PATH.format(db=db)
    return (f"CREATE TABLE IF NOT EXISTS {db}.schema_migrations ON CLUSTER `{check_name(cluster)}` "
            "(version UInt32, name String, applied_at DateTime('UTC') DEFAULT now()) "
            f"ENGINE = ReplicatedReplacingMergeTree('{path}', '{{replica}}') ORDER BY version")


def on_cluster(statement: str, cluster: str) -> list[str]:
    """A single-node migration statement (``{db}`` still in it) as the statements that do
    the same on ``cluster``: none for a backfill, two for a table (local and Distributed)."""
    on = f"ON CLUSTER `{check_name(cluster)}`"
    text = statement.strip()
    if m := _CREATE_TABLE.fullmatch(text):
        table, body, kind, args, rest = m.groups()
        if table not in SHARDING_KEYS:
            raise ValueError(f"table {table} has no sharding key (clickhouse_cluster.SHARDING_KEYS)")
        local = f"{table}_local"
        engine_args = [f"'{REPLICA_PATH.format(db='{db}', table=local)}'", "'{replica}'"]
        if args:
            engine_args.append(args)
        rest = rest.replace("non_replicated_deduplication_window", "replicated_deduplication_window")
        return [
            f"CREATE TABLE IF NOT EXISTS {{db}}.{local} {on} ({body}) "
            f"ENGINE = Replicated{kind}MergeTree({', '.join(engine_args)}){rest}",
            f"CREATE TABLE IF NOT EXISTS {{db}}.{table} {on} AS {{db}}.{local} "
            f"ENGINE = Distributed('{cluster}', '{{db}}', '{local}', {SHARDING_KEYS[table]})",
        ]
    if m := _CREATE_MV.fullmatch(text):
        view, target, select = m.groups()
        select = _FROM.sub(lambda f: f"FROM {{db}}.{f.group(1)}_local", select)
        return [f"CREATE MATERIALIZED VIEW IF NOT EXISTS {{db}}.{view} {on} TO {{db}}.{target}_local AS {select}"]
    if m := _CREATE_VIEW.fullmatch(text):
        view, select = m.groups()  # a plain view reads the Distributed tables: the whole cluster
        return [f"CREATE VIEW IF NOT EXISTS {{db}}.{view} {on} AS {select}"]
    if m := _DROP.fullmatch(text):
        kind, name = m.groups()
        if kind == "VIEW":
            return [f"DROP VIEW IF EXISTS {{db}}.{name} {on} SYNC"]
        return [f"DROP TABLE IF EXISTS {{db}}.{name} {on} SYNC",
                f"DROP TABLE IF EXISTS {{db}}.{name}_local {on} SYNC"]
    if m := _ALTER.fullmatch(text):
        table, change = m.groups()
        return [f"ALTER TABLE {{db}}.{table}_local {on} {change}"]
    if text.startswith("INSERT INTO"):
        return []  # a backfill: a cluster schema starts empty
    raise ValueError(f"no cluster form for this migration statement: {text[:80]!r}")
