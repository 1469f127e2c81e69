"""The ClickHouse tables as readers query them, on a real service: profiles merged per trait
(latest event time wins, whatever the arrival order), retried inserts counted once by the
views they feed, and versioned session rows read without double counting."""

from __future__ import annotations

import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import redis

from conftest import Service, message
from evactors.core.blocks import Block, encode_block
from evactors.core.model import SessionRow
from evactors.store.clickhouse import INSERT_SETTINGS
from evactors.store.keys import Keys

MERGED = ("SELECT traits, arraySort(anonymous_ids) AS devices, toUnixTimestamp64Milli(first_seen) AS first, "
          "toUnixTimestamp64Milli(last_seen) AS last FROM evactors.profiles_merged "
          "WHERE project_id = 'project-a' AND profile_id = 'ann'")


def _ms(when: datetime) -> int:
    return int(when.timestamp() * 1000)


def test_identify_traits_merge_per_trait_latest_event_time_wins(service: Service) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    newer, older, latest = now - timedelta(minutes=5), now - timedelta(minutes=50), now - timedelta(minutes=1)
    # the newer identify arrives (and is saved) first; the older one after it
    assert service.batch([message("identify", anonymousId="phone", userId="ann", timestamp=newer.isoformat(),
                                  traits={"plan": "pro", "email": "ann@new.example",
                                          "address": {"city": "Oslo"}})]).status_code == 200
    service.wait_rows(MERGED, 1)
    assert service.batch([message("identify", anonymousId="laptop", userId="ann", timestamp=older.isoformat(),
                                  traits={"plan": "free", "email": "ann@old.example", "company": "Acme",
                                          "address": {"city": "Bergen", "zip": "5003"}})]).status_code == 200
    service.wait_rows(MERGED + " AND length(anonymous_ids) = 2", 1)
    # a later identify with fewer traits changes only what it names
    assert service.batch([message("identify", anonymousId="phone", userId="ann", timestamp=latest.isoformat(),
                                  traits={"plan": "enterprise"})]).status_code == 200
    [merged] = service.wait_rows(MERGED + " AND traits['plan'] = 'enterprise'", 1)
    assert merged["traits"] == {"plan": "enterprise", "email": "ann@new.example", "address.city": "Oslo",
                                "company": "Acme", "address.zip": "5003"}
    assert merged["devices"] == ["laptop", "phone"]
    assert (merged["first"], merged["last"]) == (_ms(older), _ms(latest))
    # what `profiles` alone gives (its latest row): the traits of one identify only
    [final] = service.query("SELECT traits FROM evactors.profiles FINAL WHERE profile_id = 'ann'")
    assert final["traits"] == {"plan": "enterprise"}


def test_a_retried_profiles_insert_is_counted_once_by_the_views_it_feeds(service: Service) -> None:
    for table in ("profile_traits", "profile_summary"):  # so raw rows show what each insert added
        service.query(f"SYSTEM STOP MERGES evactors.{table}")
    settings = ", ".join(f"{k} = {v}" for k, v in INSERT_SETTINGS.items())

    def insert(token: str) -> None:  # as the flusher inserts a chunk: same settings, its token
        service.query(f"INSERT INTO evactors.profiles SETTINGS insert_deduplication_token = '{token}', "
                      f"{settings} VALUES ('project-a', 'bo', 'dev-1', {{'a': '1', 'b': '2'}}, "
                      "'2025-01-01 00:00:00', '2025-01-01 00:00:00')")

    def raw(table: str) -> int:
        return int(service.query(f"SELECT count() AS n FROM evactors.{table} WHERE profile_id = 'bo'")[0]["n"])

    insert("chunk-1")
    insert("chunk-1")  # a flusher that died after its insert: the successor repeats it
    assert (raw("profiles"), raw("profile_traits"), raw("profile_summary")) == (1, 2, 1)
    insert("chunk-2")  # the same content under another token is another insert
    assert (raw("profiles"), raw("profile_traits"), raw("profile_summary")) == (2, 4, 2)


def test_a_session_rewritten_with_a_higher_version_counts_once(service: Service) -> None:
    """Two versions of one session through the real flush path (buffer → flusher → insert
    with its token), the newer one first: FINAL and argMax read the newer, once."""
    service.query("SYSTEM STOP MERGES evactors.sessions")  # keep both rows as parts
    client = redis.Redis(unix_socket_path=str(service.data_dir / "redis" / "valkey.sock"))
    keys = Keys("evx")
    sid, start = str(uuid.uuid4()), 1_760_000_000_000

    def session(version: int, pages: int, exit_page: str) -> SessionRow:
        return SessionRow(
            session_id=sid, project_id="project-a", device_id="dev", profile_id="", session_start=start,
            session_end=start + pages * 60_000, duration_seconds=pages * 60, page_count=pages,
            event_count=pages, session_number=1, entry_page="/", exit_page=exit_page, referrer="",
            utm_source="", utm_medium="", utm_campaign="", utm_term="", utm_content="", country="",
            city="", browser="", os="", device="", reason="", version=version)

    for row in (session(start + 10_000_000, 5, "/checkout"), session(start + 5_000_000, 2, "/cart")):
        pipe = client.pipeline(transaction=True)
        pipe.xadd(keys.buffer(0), {"n": 1, "d": encode_block(Block(events=[], sessions=[row], profiles=[]))})
        pipe.incrby(keys.buffer_count(0), 1)
        pipe.execute()
        service.wait_rows(f"SELECT 1 FROM evactors.sessions WHERE session_id = '{sid}' "
                          f"AND version = {row.version}", 1)
    where = f"WHERE session_id = '{sid}'"
    assert service.query(f"SELECT count() AS n FROM evactors.sessions {where}")[0]["n"] == 2  # naive: doubled
    final = service.query(f"SELECT count() AS n, sum(page_count) AS pages, any(exit_page) AS exit "
                          f"FROM evactors.sessions FINAL {where}")
    assert final == [{"n": 1, "pages": 5, "exit": "/checkout"}]
    latest = service.query(f"SELECT session_id, argMax(page_count, version) AS pages, "
                           f"argMax(exit_page, version) AS exit FROM evactors.sessions {where} GROUP BY session_id")
    assert latest == [{"session_id": sid, "pages": 5, "exit": "/checkout"}]
    service.query("SYSTEM START MERGES evactors.sessions")
    service.query("OPTIMIZE TABLE evactors.sessions FINAL")  # merges converge on the same row
    assert service.query(f"SELECT count() AS n, any(page_count) AS pages FROM evactors.sessions {where}") == [
        {"n": 1, "pages": 5}]


_PART_REMOVAL = """
import os, sys, time
from evactors.store.clickhouse import connect, migrate

def threads() -> int:
    return len(os.listdir(f"/proc/{os.getpid()}/task"))

client = connect(f"chdb://{sys.argv[1]}")
migrate(client, "db")
engines = dict(client.query("SELECT name, engine FROM system.tables WHERE database = 'db'").result_rows)
merge_trees = sorted(n for n, e in engines.items() if e.endswith("MergeTree") and n != "schema_migrations")
assert len(merge_trees) >= 9 and "events" in merge_trees, merge_trees
for table in merge_trees:
    ddl = client.query(f"SHOW CREATE TABLE db.{table}").result_rows[0][0]
    assert "concurrent_part_removal_threshold = 1000000000" in ddl, ddl
before = threads()
client.command("SYSTEM STOP MERGES db.events")
for i in range(150):  # 150 parts (over the default threshold of 100), outdated by one merge
    client.command(f"INSERT INTO db.events (project_id, id, name) VALUES ('p', generateUUIDv4(), 'E{i}')")
client.command("SYSTEM START MERGES db.events")
client.command("OPTIMIZE TABLE db.events FINAL")
outdated = -1
for _ in range(120):
    outdated = client.query("SELECT count() FROM system.parts WHERE database = 'db' AND table = 'events' "
                            "AND NOT active").result_rows[0][0]
    if outdated == 0:
        break
    time.sleep(0.5)
print(outdated, threads() - before)
"""


def test_outdated_parts_are_removed_without_a_burst_of_threads(tmp_path: Path) -> None:
    """150 parts outdated at once: ClickHouse's default removes them with up to 128 threads,
    which then stay idle in its pool (~100 MB resident). Every table of ours removes them with
    one thread, so the engine's thread count stays where it was."""
    proc = subprocess.run([sys.executable, "-c", _PART_REMOVAL, str(tmp_path / "clickhouse")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outdated, new_threads = map(int, proc.stdout.split())
    assert outdated == 0 and new_threads < 20, proc.stdout
