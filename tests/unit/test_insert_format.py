"""The embedded engine's inserts (JSONCompactEachRow through ``file()``) store exactly what
clickhouse-connect's Native inserts stored, for every column of every table and for the
tables the materialized views keep: the same rows written both ways into two databases of
one real chDB, read back and compared value for value (floats bit for bit)."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError

from evactors.core.model import BotRow, EventRow, ProfileRow, SessionRow, event_id
from evactors.store.clickhouse import TABLES, ClickHouse

T0 = 1_760_000_000_000
NOW = int(time.time() * 1000)
TEXTS = ["", "plain", "ünïcödé ✓ 漢字 😀", "quote ' and \" and \\ back", "tab\tnew\nline\r", "nul\x00byte",
         "{\"json\": [1, 2]}", "x" * 3000]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ClickHouse, ClickHouse]]:
    path = tmp_path_factory.mktemp("chdb-format")
    native = ClickHouse(f"chdb://{path}", f"n_{uuid.uuid4().hex[:8]}", 60)
    native.open()
    as_json = ClickHouse(f"chdb://{path}", f"j_{uuid.uuid4().hex[:8]}", 60)
    as_json.client = native.client  # one engine per process: the same client, another database
    from evactors.store.clickhouse import migrate

    migrate(as_json.client, as_json.database)
    yield native, as_json
    for ch in (native, as_json):
        native.client.command(f"DROP DATABASE IF EXISTS {ch.database}")


def _text(rnd: random.Random) -> str:
    return rnd.choice([*TEXTS, f"t{rnd.randrange(10**6)}"])


def _when(rnd: random.Random) -> int:
    return rnd.choice([0, 1, T0, T0 + rnd.randrange(10**9), 4_102_444_800_000 - 1, 946_684_800_123])


def _coordinate(rnd: random.Random, bound: float) -> float | None:
    return rnd.choice([None, 0.0, -0.0, bound, -bound, 51.5142, rnd.uniform(-bound, bound), 1e-40, 123.456789012345])


def _map(rnd: random.Random) -> dict[str, str]:
    return {_text(rnd) + str(i): _text(rnd) for i in range(rnd.randrange(4))}


def _rows(n: int) -> dict[str, list[msgspec.Struct]]:
    rnd = random.Random(17)
    events, sessions, profiles, bots = [], [], [], []
    for i in range(n):
        events.append(EventRow(
            event_id("p", str(i)), rnd.choice(["p", "project-ü"]), rnd.choice(["screen_view", "Bought", "É"]),
            _text(rnd), _text(rnd), _text(rnd), _when(rnd), _when(rnd), _text(rnd), _text(rnd), _text(rnd),
            _text(rnd), rnd.choice([0, 1, 2**32, 2**64 - 1]), _map(rnd), "GB", _text(rnd), _text(rnd), _text(rnd),
            _text(rnd), _text(rnd), _coordinate(rnd, 90.0), _coordinate(rnd, 180.0), _text(rnd), _text(rnd),
            _text(rnd), _text(rnd), _text(rnd), "desktop", _text(rnd), _text(rnd), _text(rnd), _text(rnd),
            _text(rnd), _text(rnd), _text(rnd), rnd.choice([0, 1]), rnd.choice([0, 1, 2**32 - 1]), _when(rnd),
            _text(rnd), "track", rnd.choice([0, 1]), _text(rnd), _text(rnd), _text(rnd), _text(rnd), _text(rnd)))
        sessions.append(SessionRow(
            f"s{i}", "p", _text(rnd), _text(rnd), _when(rnd), _when(rnd), rnd.choice([0, 2**32 - 1]), i, i, i,
            _text(rnd), _text(rnd), _text(rnd), _text(rnd), _text(rnd), _text(rnd), _text(rnd), _text(rnd),
            _text(rnd), _text(rnd), _text(rnd), _text(rnd), _text(rnd), _text(rnd), rnd.choice([0, 2**64 - 1])))
        profiles.append(ProfileRow("p", f"u{i}", _text(rnd), _map(rnd), _when(rnd), _when(rnd)))
        bots.append(BotRow(event_id("b", str(i)), "p", _text(rnd), _text(rnd), _text(rnd), "crawler-list",
                           _text(rnd), NOW + rnd.randrange(-10**9, 10**9), _text(rnd)))  # kept 90 days
    return {"events": events, "sessions": sessions, "profiles": profiles, "events_bots": bots}


def _stored(ch: ClickHouse, table: str) -> list[tuple[Any, ...]]:
    columns = TABLES[table][1]
    order = ", ".join(columns[:6])
    # every value as ClickHouse's own text of it, and floats by their bits: nothing rounds
    select = ", ".join(f"reinterpretAsUInt32({c})" if c in ("latitude", "longitude") else f"toString({c})"
                       for c in columns)
    return ch.client.query(f"SELECT {select}, toTypeName(tuple(*)) FROM {ch.database}.{table} "
                           f"ORDER BY {order}").result_rows


def test_every_column_is_stored_as_the_native_insert_stored_it(engine: tuple[ClickHouse, ClickHouse]) -> None:
    native, as_json = engine
    rows = _rows(600)
    for table, table_rows in rows.items():
        native._insert_native(table, table_rows, f"fmt:{table}")
        as_json._insert_json(table, table_rows, f"fmt:{table}")
    for table in rows:
        old, new = _stored(native, table), _stored(as_json, table)
        assert len(old) == len(rows[table]) and old == new, table
    events = _stored(as_json, "events")
    assert any(r[20] is None for r in events) and any(r[20] is not None for r in events)  # Nullable kept
    for target in ("daily_events", "daily_page_views", "profile_traits"):
        query = f"SELECT * FROM {{db}}.{target} FINAL ORDER BY ALL"
        assert (native.client.query(query.format(db=native.database)).result_rows
                == as_json.client.query(query.format(db=as_json.database)).result_rows), target
    users = "SELECT project_id, day, uniqExactMerge(users) FROM {db}.daily_active_users GROUP BY ALL ORDER BY ALL"
    assert (native.client.query(users.format(db=native.database)).result_rows
            == as_json.client.query(users.format(db=as_json.database)).result_rows)


def test_a_repeated_json_insert_is_discarded_with_its_views(engine: tuple[ClickHouse, ClickHouse]) -> None:
    _native, as_json = engine
    rows = _rows(50)["events"]
    before = as_json.client.query(f"SELECT count() FROM {as_json.database}.events").result_rows[0][0]
    for _ in range(2):
        as_json._insert_json("events", rows, "fmt:repeat")
    as_json._insert_json("events", rows[:20], "fmt:repeat")  # a repeat holds fewer rows at most
    after = as_json.client.query(f"SELECT count() FROM {as_json.database}.events").result_rows[0][0]
    assert after - before == 50


def test_no_file_is_left_behind(engine: tuple[ClickHouse, ClickHouse], tmp_path: Path) -> None:
    import tempfile

    _native, as_json = engine
    before = {p.name for p in Path(tempfile.gettempdir()).glob("evactors-insert-*")}
    as_json._insert_json("events_bots", _rows(5)["events_bots"], "fmt:files")
    with pytest.raises(DatabaseError):
        as_json._insert_json("events_bots", [EventRow(*([""] * 46))], "fmt:bad")  # type: ignore[arg-type]
    assert {p.name for p in Path(tempfile.gettempdir()).glob("evactors-insert-*")} == before
