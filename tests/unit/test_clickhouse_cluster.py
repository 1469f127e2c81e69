"""The schema on a ClickHouse cluster (``migrate --cluster``), as far as one embedded engine
can prove it: every statement parses, every rule has a cluster form, and the cluster's local
tables, once their replication is taken out (and a Merge table stands in for each
Distributed one), are the single-node tables column for column,
key for key, with views that feed the local tables — run in a real chDB, beside the
single-node schema, in a process and a path of this test's own."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from evactors.store import clickhouse_cluster
from evactors.store.clickhouse import MIGRATIONS, schema_sql, schema_statements

CLUSTER = "two_by_two"

# Runs in its own process (one chDB engine per process, at this test's path): every statement
# parsed by the engine, the single-node schema in one database, the cluster's schema in
# another with what only a cluster has taken out (ON CLUSTER, replication, Distributed
# tables), and what the engine then holds.
SCRIPT = r"""
import json, re, sys
from evactors.store.clickhouse import connect, migrate, schema_sql, _quote
path, cluster = sys.argv[1], sys.argv[2]
client = connect(f"chdb://{path}")
statements = [s.strip() for s in schema_sql("clu", cluster).split(";\n") if s.strip() and not s.startswith("--")]
statements = [re.sub(r"^(--[^\n]*\n)+", "", s).strip() for s in statements]
for s in statements:  # parsed by ClickHouse's own parser
    client.command(f"SELECT formatQuery({_quote(s)})")
migrate(client, "single")
client.command("CREATE DATABASE clu")
for s in statements:
    if "schema_migrations" in s or s.startswith("CREATE DATABASE"):
        continue
    # one node: a Merge table over the local table stands in for the Distributed one
    s = re.sub(r"ENGINE = Distributed\('[^']*', 'clu', '(\w+)', [^)]*\)+$", r"ENGINE = Merge('clu', '^$')", s)
    s = s.replace(f" ON CLUSTER `{cluster}`", "")
    s = re.sub(r"ENGINE = Replicated(\w*)MergeTree\('[^']*', '\{replica\}'(?:, )?", r"ENGINE = \1MergeTree(", s)
    s = s.replace("MergeTree() ", "MergeTree ")
    s = s.replace("replicated_deduplication_window", "non_replicated_deduplication_window")
    client.command(s)
out = {}
for db in ("single", "clu"):
    tables = client.query(
        "SELECT name, engine, sorting_key, partition_key, create_table_query FROM system.tables "
        f"WHERE database = '{db}'"
    ).result_rows
    columns = client.query(
        f"SELECT table, name, type FROM system.columns WHERE database = '{db}' ORDER BY table, position"
    ).result_rows
    out[db] = {"tables": [list(r) for r in tables], "columns": [list(r) for r in columns]}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, list[list[str]]]]:
    path = tmp_path_factory.mktemp("chdb-cluster")
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(path), CLUSTER], capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, dict[str, list[list[str]]]] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_every_migration_statement_has_a_cluster_form() -> None:
    for _version, _name, statements in MIGRATIONS:
        for statement in statements:
            out = clickhouse_cluster.on_cluster(statement, CLUSTER)
            if statement.startswith("INSERT INTO"):
                assert out == []  # backfills: a cluster schema starts empty
            else:
                assert out and all(f"ON CLUSTER `{CLUSTER}`" in s for s in out), statement[:60]


def test_a_statement_without_a_rule_is_refused_loudly() -> None:
    with pytest.raises(ValueError, match="no cluster form"):
        clickhouse_cluster.on_cluster("RENAME TABLE {db}.events TO {db}.events2", CLUSTER)
    with pytest.raises(ValueError, match="sharding key"):
        clickhouse_cluster.on_cluster("CREATE TABLE IF NOT EXISTS {db}.new_table (a String) ENGINE = MergeTree "
                                      "ORDER BY a", CLUSTER)
    with pytest.raises(ValueError, match="cluster name"):
        clickhouse_cluster.on_cluster("DROP VIEW IF EXISTS {db}.v", "a`; DROP DATABASE x; --")


def test_every_table_is_replicated_with_a_distributed_table_of_its_name() -> None:
    sql = schema_sql("evactors", CLUSTER)
    single = "\n".join(s for _v, _n, statements in MIGRATIONS for s in schema_statements(statements))
    created = set(re.findall(r"CREATE TABLE IF NOT EXISTS \{db\}\.(\w+) \(", single))
    assert created == set(clickhouse_cluster.SHARDING_KEYS)
    for table in created:
        assert re.search(rf"evactors\.{table}_local ON CLUSTER `{CLUSTER}` \(.*?ENGINE = Replicated\w*MergeTree\("
                         rf"'/clickhouse/tables/{{shard}}/evactors/{table}_local', '{{replica}}'", sql, re.S), table
        assert (f"CREATE TABLE IF NOT EXISTS evactors.{table} ON CLUSTER `{CLUSTER}` AS evactors.{table}_local "
                f"ENGINE = Distributed('{CLUSTER}', 'evactors', '{table}_local', "
                f"{clickhouse_cluster.SHARDING_KEYS[table]})") in sql
    # the insert dedup window is kept in Keeper, so it holds across replicas
    assert "non_replicated_deduplication_window" not in sql
    assert sql.count("replicated_deduplication_window = ") == single.count("non_replicated_deduplication_window = ")
    assert "INSERT INTO" not in sql


def test_sessions_and_their_events_share_a_shard_and_profiles_theirs() -> None:
    keys = clickhouse_cluster.SHARDING_KEYS
    # FINAL on sessions (ReplacingMergeTree) merges a session's versions only within a shard
    assert keys["sessions"] == keys["events"] == "cityHash64(project_id, session_id)"
    assert keys["profiles"] == keys["profile_traits"] == keys["profile_summary"]


def test_local_tables_are_the_single_node_tables_and_views_feed_local_tables(
        engines: dict[str, dict[str, list[list[str]]]]) -> None:
    single = {r[0]: r for r in engines["single"]["tables"]}
    clu = {r[0]: r for r in engines["clu"]["tables"]}
    columns: dict[str, dict[str, list[list[str]]]] = {"single": {}, "clu": {}}
    for db in columns:
        for table, name, typ in engines[db]["columns"]:
            columns[db].setdefault(table, []).append([name, typ])
    for name, (_n, engine, sorting, partition, create) in single.items():
        if name == "schema_migrations":
            continue
        if engine == "MaterializedView":
            assert clu[name][1] == "MaterializedView"
            # the same view, over and into the shard's local tables
            assert re.sub(r"clu\.(\w+)_local", r"clu.\1", clu[name][4]) == create.replace("single.", "clu."), name
            assert re.search(r" TO clu\.\w+_local ", clu[name][4]) and re.search(r"FROM clu\.\w+_local", clu[name][4])
            continue
        if engine == "View":
            assert clu[name][1] == "View"  # reads the Distributed tables: the whole cluster
            continue
        local = clu[f"{name}_local"]
        assert (local[1], local[2], local[3]) == (engine, sorting, partition), name
        assert columns["clu"][f"{name}_local"] == columns["single"][name], name


def test_migrate_prints_the_cluster_sql_and_refuses_a_cluster_on_the_embedded_engine(tmp_path: Path) -> None:
    from conftest import run_cli

    printed = run_cli("migrate", "--data-dir", str(tmp_path), "--cluster", CLUSTER, "--print-sql")
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == schema_sql("evactors", CLUSTER)
    assert not (tmp_path / "clickhouse").exists()  # printing connects to nothing
    refused = run_cli("migrate", "--data-dir", str(tmp_path), "--cluster", CLUSTER)
    assert refused.returncode == 2 and "clickhouse.cluster" in refused.stderr, refused.stderr
    assert "needs clickhouse.dsn" in refused.stderr
