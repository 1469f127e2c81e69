"""``bin/evactors``: run the service and work with its data.

Exit codes: 0 clean stop, 1 fatal fault (an actor kept crashing, a part would not start),
2 configuration error (the message names the setting).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import string
import sys
from pathlib import Path
from typing import Any

import msgspec

from evactors.core import config as cfg
from evactors.core.exits import EXIT_CONFIG, EXIT_FATAL, EXIT_NO_SERVICE, EXIT_OK
from evactors.store import admin_client
from evactors.store.admin_client import AdminError
from evactors.store.paths import DataDir


def setup_logging(c: cfg.Config) -> None:
    from evactors.ops import logs

    logs.setup(c.log.level, c.log.format)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if getattr(args, "data_dir", None):
        out["data_dir"] = args.data_dir
    if getattr(args, "listen", None):
        out["server"] = {"listen": args.listen}
    if getattr(args, "write_key", None):
        out["write_keys"] = cfg.parse_write_keys(args.write_key)
    if getattr(args, "redis_url", None):
        out["redis"] = {"url": args.redis_url}
    if getattr(args, "clickhouse_dsn", None):
        out["clickhouse"] = {"dsn": args.clickhouse_dsn}
    if getattr(args, "role", None):
        out["roles"] = cfg.parse_roles(args.role)
    if getattr(args, "cluster", None) and not getattr(args, "print_sql", False):
        out.setdefault("clickhouse", {})["cluster"] = args.cluster
    return out


def load_config(args: argparse.Namespace) -> cfg.Config:
    return cfg.load(getattr(args, "config", None), _overrides(args))


def cmd_run(args: argparse.Namespace) -> int:
    import trio

    from evactors.ops.malloc import limit_arenas
    from evactors.service.startup import run
    from evactors.service.supervisor import StartupError

    limit_arenas()  # before any thread starts: see evactors/malloc.py
    os.umask(0o077)  # every file of the service (Valkey's AOF, chDB's parts) private to its user
    config = load_config(args)
    setup_logging(config)

    def ready(info: dict[str, Any]) -> None:
        print(f"evactors listening on {info['url']} (data in {info['data_dir']})", flush=True)
        if info.get("write_key"):  # only when generated now: it is not printed again
            print(f"write key: {info['write_key']}  (project 'default'; kept in "
                  f"{info['data_dir']}/write_key)", flush=True)
        for key, project in (info.get("read_keys") or {}).items():
            print(f"read key of project {project!r} (the live view, /live?key=…): {key}  "
                  f"(kept in {info['data_dir']}/read_key.{project})", flush=True)
        print(f"admin API and /metrics on {info['admin']}", flush=True)

    try:
        return trio.run(run, config, ready, lambda: load_config(args))
    except StartupError as e:
        logging.getLogger("evactors").critical("cannot start: %s", e)
        return EXIT_FATAL


def _print_table(columns: list[str], rows: list[list[Any]], fmt: str) -> None:
    if fmt == "json":
        for row in rows:
            print(json.dumps(dict(zip(columns, row, strict=False)), default=str))
        return
    if fmt == "tsv":
        for row in rows:
            print("\t".join("" if v is None else str(v) for v in row))
        return
    text = [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in text]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=False)))
    print("  ".join("-" * w for w in widths))
    for r in text:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=False)))


def _running_service(data_dir: Path) -> dict[str, Any] | None:
    try:
        info = json.loads(DataDir(data_dir).service_json.read_text())
        os.kill(int(info["pid"]), 0)
        return info
    except (OSError, ValueError, KeyError):
        return None


def query_sql(config: cfg.Config, sql: str) -> tuple[list[str], list[list[Any]]]:
    """Run SQL on the configured ClickHouse. With embedded chDB owned by a running
    service, the query goes through that service (chDB allows one owner)."""
    from evactors.store.clickhouse import connect, embedded_dsn

    data_dir = config.data_path
    if not config.clickhouse.dsn:
        info = _running_service(data_dir)
        if info is not None:
            try:
                body = _admin(info, data_dir, "/admin/query", sql.encode(), timeout=120)
            except AdminError as e:
                message = e.body.get("message", str(e)) if isinstance(e.body, dict) else str(e)
                raise RuntimeError(message) from None
            return body["columns"], body["rows"]
        dsn = embedded_dsn(data_dir)
        if not DataDir(data_dir).clickhouse.exists():
            raise RuntimeError(f"no data in {data_dir} (has the service run with this --data-dir?)")
    else:
        dsn = config.clickhouse.dsn
    client = connect(dsn)
    try:
        result = client.query(sql)
        return list(result.column_names), [list(r) for r in result.result_rows]
    finally:
        client.close()


def cmd_query(args: argparse.Namespace) -> int:
    config = load_config(args)
    try:
        columns, rows = query_sql(config, args.sql)
    except Exception as e:
        print(f"query failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return EXIT_FATAL
    _print_table(columns, rows, args.format)
    return EXIT_OK


def _admin(info: dict[str, Any], data_dir: Path, path: str, data: bytes | None = None,
           timeout: float = 30) -> Any:
    """A call to the running service's admin listener (GET, or POST with ``data``): its
    JSON (AdminError on an error status)."""
    token = DataDir(data_dir).admin_token.read_text().strip()
    return admin_client.call(info["admin"], token, path, data, timeout)


def _running_or_say(config: cfg.Config, hint: str = "") -> dict[str, Any] | None:
    """The running service of this data dir, or None, said on stderr (the caller exits 3,
    as ``systemctl status`` does for an inactive unit)."""
    info = _running_service(config.data_path)
    if info is None:
        print(f"evactors is not running on {config.data_path}{hint}", file=sys.stderr)
    return info


def cmd_remap(args: argparse.Namespace) -> int:
    """Re-map anonymous ids (old → new) through the running service: each pair becomes an
    entry of the ingest stream, so it is durable and ordered with the traffic. Sessions
    that start only because of it carry reason 're-anonymized'."""
    config = load_config(args)
    info = _running_or_say(config, ": start it first")
    if info is None:
        return EXIT_NO_SERVICE
    try:
        source = sys.stdin if args.file == "-" else open(args.file, newline="")
    except OSError as e:
        print(f"cannot read {args.file}: {e.strerror}", file=sys.stderr)
        return EXIT_CONFIG
    pairs: list[list[str]] = []
    with source:
        for n, row in enumerate(csv.reader(source), 1):
            if not row or row[0].startswith("#") or (n == 1 and row[:2] == ["old", "new"]):
                continue
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                print(f"{args.file}:{n}: expected 'old,new', got {row!r}", file=sys.stderr)
                return EXIT_CONFIG
            pairs.append([row[0].strip(), row[1].strip()])
    body = json.dumps({"project": args.project, "pairs": pairs}).encode()
    try:
        result = _admin(info, config.data_path, "/admin/remap", body, timeout=120)
    except AdminError as e:
        print(f"remap refused: {e}", file=sys.stderr)
        return EXIT_FATAL
    except OSError as e:  # it stopped meanwhile: nothing was (or all was) taken, say so
        print(f"evactors (pid {info['pid']}) does not answer: {e}; run the remap again "
              "(a pair applied twice changes nothing)", file=sys.stderr)
        return EXIT_FATAL
    print(f"{result['remapped']} id(s) re-mapped in {args.project}"
          + (f", {result['skipped']} skipped (empty or unchanged)" if result["skipped"] else ""))
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    """Exit 0 with the state of a running service; 3 when none runs on this data dir
    (as ``systemctl status`` does for an inactive unit)."""
    config = load_config(args)
    info = _running_or_say(config)
    if info is None:
        return EXIT_NO_SERVICE
    try:
        status = _admin(info, config.data_path, "/admin/status")
    except (OSError, ValueError, AdminError) as e:
        print(f"evactors (pid {info['pid']}) does not answer: {e}", file=sys.stderr)
        return EXIT_FATAL
    if args.json:
        print(json.dumps(status, indent=2))
        return EXIT_OK
    print(f"evactors pid {status['pid']}, up {status['uptime_seconds']}s, {info['url']}")
    print(f"backlog {status['backlog_events']} events in Redis, lag {status['lag_seconds']}s, "
          f"ClickHouse {'connected' if status['clickhouse_connected'] else 'NOT connected'}")
    print("actors:")
    _print_table(["actor", "state", "restarts"],
                 [[n, a["state"], a["restarts"]] for n, a in status["actors"].items()], "table")
    print("channels (batches waiting): " + ", ".join(f"{k} {v}" for k, v in status["channels"].items()))
    print("live visitors (5 min): " + (", ".join(f"{k} {v}" for k, v in status["live_visitors"].items())
                                        or "no projects"))
    return EXIT_OK


def _redis_client(config: cfg.Config) -> Any:
    """The service's Redis: its URL, or the embedded server's socket while it runs."""
    import redis

    from evactors.store.redis_io import sync_client

    if config.redis.url:
        return sync_client(config.redis.url, 10)
    socket_path = DataDir(config.data_path).valkey_socket
    client = redis.Redis(unix_socket_path=str(socket_path), socket_timeout=10)
    try:
        client.ping()
    except (redis.ConnectionError, OSError):
        raise RuntimeError(f"the embedded Redis of {config.data_path} is not running; "
                           "start the service (bin/evactors run) first") from None
    return client


def _service_redis(args: argparse.Namespace) -> tuple[cfg.Config, Any, Any] | None:
    """The configuration, its Redis keys and a client of the service's Redis (None, said on
    stderr, when that Redis is not there)."""
    from evactors.store.keys import keys_for

    config = load_config(args)
    try:
        return config, keys_for(config), _redis_client(config)
    except RuntimeError as e:
        print(f"evactors: {e}", file=sys.stderr)
        return None


def cmd_dead_letter(args: argparse.Namespace) -> int:
    from evactors.pipeline.deadletters import list_entries, replay

    found = _service_redis(args)
    if found is None:
        return EXIT_FATAL
    config, keys, client = found
    if args.action == "list":
        shards = int(client.hget(keys.meta, "session_shards") or config.pipeline.session_shards)
        entries = list_entries(client, keys, shards, args.limit)
        if args.format == "json":
            for entry in entries:
                print(json.dumps(entry))
        else:
            _print_table(["id", "source", "project", "message_id", "error"],
                         [[e["id"], e.get("source", ""), e.get("project", ""),
                           e.get("message_id", e.get("id", "")), e.get("error", "")] for e in entries],
                         "table")
            print(f"{len(entries)} dead letter(s)", file=sys.stderr)
        return EXIT_OK
    moved = replay(client, keys, None if args.all else args.ids)
    print(f"{moved} dead letter(s) put back into the ingest stream; a running service picks "
          "them up within two minutes (or at its next start)")
    return EXIT_OK


def cmd_live(args: argparse.Namespace) -> int:
    """The live state the publisher and the backlog actor keep in Redis, as they keep it."""
    from datetime import UTC, datetime

    from evactors.pipeline.backlog import backlog_sizes
    from evactors.store.live import last_screen_view, live_visitors

    found = _service_redis(args)
    if found is None:
        return EXIT_FATAL
    config, keys, client = found
    shards = int(client.hget(keys.meta, "session_shards") or config.pipeline.session_shards)
    out: dict[str, Any] = {"project": args.project,
                           "live_visitors": live_visitors(client, keys, args.project),
                           "backlog": backlog_sizes(client, keys, shards)}
    if args.profile is not None:
        out["profile"] = args.profile
        out["last_screen_view"] = last_screen_view(client, keys, args.project, args.profile)
        ttl = client.ttl(keys.last_screen_view(args.project, args.profile))
        out["last_screen_view_ttl_seconds"] = ttl if ttl >= 0 else None
    if args.json:
        print(json.dumps(out, indent=2))
        return EXIT_OK
    backlog = out["backlog"]
    print(f"project {args.project}: {out['live_visitors']} live visitor(s) in the last 5 minutes")
    cached = ("expired (is the service running?)" if backlog["cached"] is None else
              f"{backlog['cached']} (refreshed each second, expires in {backlog['cached_ttl_seconds']}s)")
    print(f"backlog (all projects): {backlog['exact']} exact (ingest {backlog['ingest']}, buffers "
          f"{'+'.join(map(str, backlog['buffers']))}); cached {cached}")
    if args.profile is not None:
        view = out["last_screen_view"]
        if view is None:
            print(f"profile {args.profile}: no screen view in the last 31 minutes")
        else:
            at = datetime.fromtimestamp(view["created_at"] / 1000, UTC).isoformat(timespec="seconds")
            print(f"profile {args.profile}: last screen view {view['path'] or '-'} "
                  f"({view['properties'].get('name', '')}) at {at}, session {view['session_id']}, "
                  f"kept {out['last_screen_view_ttl_seconds']}s more")
    return EXIT_OK


REPORT_SQL = """
SELECT day, users AS active_users, events, page_views FROM
  (SELECT day, uniqExactMerge(users) AS users FROM {db}.daily_active_users
   WHERE project_id = {project:String} AND day > today() - {days:UInt32} GROUP BY day) AS u
FULL OUTER JOIN
  (SELECT day, sum(events) AS events FROM {db}.daily_events
   WHERE project_id = {project:String} AND day > today() - {days:UInt32} AND name != 'session_end'
   GROUP BY day) AS e USING day
FULL OUTER JOIN
  (SELECT day, sum(views) AS page_views FROM {db}.daily_page_views
   WHERE project_id = {project:String} AND day > today() - {days:UInt32} GROUP BY day) AS p USING day
ORDER BY day
"""


TOP_SQL = """
SELECT $column AS $label, sum($measure) AS total FROM {db}.$table
WHERE project_id = {project:String} AND day > today() - {days:UInt32} $extra
GROUP BY $column ORDER BY total DESC, $column LIMIT 10
"""


def _bind(sql: str, db: str, project: str, days: int) -> str:
    """Fill the project and days in as SQL literals (the query may run through the service)."""
    quoted = "'" + project.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return (sql.replace("{db}", db).replace("{project:String}", quoted)
            .replace("{days:UInt32}", str(int(days))))


def cmd_report(args: argparse.Namespace) -> int:
    config = load_config(args)
    db = config.clickhouse.database
    try:
        columns, rows = query_sql(config, _bind(REPORT_SQL, db, args.project, args.days))
        print(f"project {args.project}, last {args.days} day(s), from the daily pre-aggregates")
        _print_table(columns, rows, args.format)
        for label, table, column, measure, extra in (
                ("event", "daily_events", "name", "events", "AND name != 'session_end'"),
                ("page", "daily_page_views", "path", "views", "")):
            sql = string.Template(TOP_SQL).substitute(column=column, label=label, measure=measure,
                                                      table=table, extra=extra)
            columns, rows = query_sql(config, _bind(sql, db, args.project, args.days))
            print(f"\ntop {label}s")
            _print_table(columns, rows, args.format)
    except Exception as e:
        print(f"report failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return EXIT_FATAL
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args)
    print(msgspec.json.format(msgspec.json.encode(config)).decode())
    print("config ok", file=sys.stderr)
    return EXIT_OK


def cmd_config_reference(args: argparse.Namespace) -> int:
    from evactors.cli import reference

    print(reference.toml() if args.toml else reference.markdown(), end="")
    return EXIT_OK


def cmd_migrate(args: argparse.Namespace) -> int:
    from evactors.store.clickhouse import connect, embedded_dsn, migrate, schema_sql, schema_version

    config = load_config(args)
    if args.print_sql:  # for a reader or a DBA: nothing is connected to
        print(schema_sql(config.clickhouse.database, args.cluster or config.clickhouse.cluster), end="")
        return EXIT_OK
    if not config.clickhouse.dsn and _running_service(config.data_path):
        print("the running service owns the embedded ClickHouse and migrates it at start",
              file=sys.stderr)
        return EXIT_OK
    client = connect(config.clickhouse.dsn or embedded_dsn(config.data_path))
    try:
        applied = migrate(client, config.clickhouse.database, config.clickhouse.cluster)
        print(f"schema version {schema_version(client, config.clickhouse.database)}"
              f" (applied now: {applied or 'none'})")
    finally:
        client.close()
    return EXIT_OK


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evactors", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", help="TOML config file (default: $EVACTORS_CONFIG, else none)")
        sp.add_argument("--data-dir", help="data directory (default ./data)")

    run = sub.add_parser("run", help="run the service (embedded Valkey + chDB unless configured)")
    common(run)
    run.add_argument("--listen", help="HOST:PORT of the HTTP API (default 127.0.0.1:8080)")
    run.add_argument("--write-key", action="append", metavar="KEY=PROJECT",
                     help="a write key and its project (repeatable); replaces the config's keys")
    run.add_argument("--redis-url", help="Redis/Valkey URL instead of the embedded server")
    run.add_argument("--clickhouse-dsn", help="ClickHouse DSN instead of the embedded chDB")
    run.add_argument("--role", metavar="ROLE,…", help="what this instance does: ingest, sessions, flusher "
                     "(default: all three; docs/operations.md, Scale)")
    run.set_defaults(func=cmd_run)

    q = sub.add_parser("query", help="run SQL on the service's ClickHouse and print the result")
    common(q)
    q.add_argument("--clickhouse-dsn", help="ClickHouse DSN (default: the configured one)")
    q.add_argument("--format", choices=["table", "json", "tsv"], default="table")
    q.add_argument("sql")
    q.set_defaults(func=cmd_query)

    st = sub.add_parser("status", help="state of the running service: backlog, lag, actors, "
                        "live visitors (exit 3 when it is not running)")
    common(st)
    st.add_argument("--json", action="store_true", help="print the raw status document")
    st.set_defaults(func=cmd_status)

    dl = sub.add_parser("dead-letter", help="list, or replay, what could not be processed")
    common(dl)
    dl_sub = dl.add_subparsers(dest="action", required=True)
    dl_list = dl_sub.add_parser("list", help="show dead letters with their errors")
    dl_list.add_argument("--limit", type=int, default=100)
    dl_list.add_argument("--format", choices=["table", "json"], default="table")
    dl_replay = dl_sub.add_parser("replay", help="put dead letters back into the ingest stream")
    dl_replay.add_argument("ids", nargs="*", help="dead-letter ids (see list)")
    dl_replay.add_argument("--all", action="store_true")
    for sp in (dl_list, dl_replay):
        common(sp)
    dl.set_defaults(func=cmd_dead_letter)

    rm = sub.add_parser("remap", help="re-map anonymous ids (a CSV of old,new) through the running "
                        "service; sessions it starts carry reason 're-anonymized'")
    common(rm)
    rm.add_argument("--project", required=True)
    rm.add_argument("file", help="CSV file of old,new pairs ('-': standard input)")
    rm.set_defaults(func=cmd_remap)

    rp = sub.add_parser("report", help="daily active users, events by name and page views of a "
                        "project, from the pre-aggregates ClickHouse keeps")
    common(rp)
    rp.add_argument("--project", required=True)
    rp.add_argument("--days", type=int, default=7)
    rp.add_argument("--format", choices=["table", "json", "tsv"], default="table")
    rp.set_defaults(func=cmd_report)

    lv = sub.add_parser("live", help="live state of a project from Redis: live visitors (5 min), "
                        "backlog exact and cached, a profile's last screen view (31 min)")
    common(lv)
    lv.add_argument("--project", required=True)
    lv.add_argument("--profile", help="also show this profile's last screen view")
    lv.add_argument("--redis-url", help="Redis/Valkey URL (default: the configured one)")
    lv.add_argument("--json", action="store_true")
    lv.set_defaults(func=cmd_live)

    c = sub.add_parser("check-config", help="validate the configuration and print it in full")
    common(c)
    c.set_defaults(func=cmd_check_config)

    sub.add_parser("bench-enrich", add_help=False,
                   help="benchmark the enricher pool on a realistic mix (--help for options)")
    sub.add_parser("loadtest", add_help=False,
                   help="send realistic Segment traffic to a running service, measure it, verify exactly-once "
                   "(--help for options)")
    sub.add_parser("bench", add_help=False,
                   help="start a service on embedded defaults, load-test it, verify, write the report "
                   "(--help for options)")
    sub.add_parser("bench-sessions", add_help=False,
                   help="Redis memory per active session, by key type (--help for options)")

    r = sub.add_parser("config-reference", help="print the configuration reference (markdown) "
                       "or, with --toml, the example config file")
    r.add_argument("--toml", action="store_true")
    r.set_defaults(func=cmd_config_reference)

    m = sub.add_parser("migrate", help="create or migrate the ClickHouse schema")
    common(m)
    m.add_argument("--clickhouse-dsn", help="ClickHouse DSN (default: the configured one)")
    m.add_argument("--cluster", metavar="NAME", help="create the schema on this ClickHouse cluster "
                   "(Replicated tables, Distributed on top, ON CLUSTER; default: clickhouse.cluster)")
    m.add_argument("--print-sql", action="store_true",
                   help="print the statements of every migration instead (with --cluster, the cluster's)")
    m.set_defaults(func=cmd_migrate)
    return p


HARNESS_EXTRA = ("{command} needs the load harness's libraries, an extra the service does "
                 "not install: bin/setup harness (or pip install -e '.[harness]')")


def harness_command(command: str, argv: list[str]) -> int:
    """Run a harness command; without the ``[harness]`` extra, say how to get it."""
    try:
        if command in ("loadtest", "bench"):
            from evactors.harness.commands import main_bench, main_loadtest

            return (main_loadtest if command == "loadtest" else main_bench)(argv)
        if command == "bench-enrich":
            from evactors.harness.bench_enrich import main as bench_enrich

            return bench_enrich(argv)
        from evactors.harness.bench_sessions import main as bench_sessions

        return bench_sessions(argv)
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] == "evactors":
            raise
        print(f"evactors: {HARNESS_EXTRA.format(command=command)} (missing: {e.name})", file=sys.stderr)
        return EXIT_CONFIG


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["loadtest"], ["bench"], ["bench-enrich"], ["bench-sessions"]):
        return harness_command(argv[0], argv[1:])  # the load harness parses its own options
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except cfg.ConfigError as e:
        print(f"evactors: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_OK

