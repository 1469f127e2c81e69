"""The live state, read as a user reads it (``bin/evactors live``, pub/sub) from a real
service: live visitors in a 5-minute window, a profile's last screen view (31 minutes),
the backlog exact and cached (15 s), and ``event:saved`` rows equal to ClickHouse's."""

from __future__ import annotations

import json
import math
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
import redis

from conftest import CHROME, GB_IP, Service, message, run_cli
from evactors.core.config import PipelineConfig
from evactors.core.messages import Notice
from evactors.core.model import Context, EventRow, Incoming
from evactors.enrichment.bots import BotDetector
from evactors.enrichment.enrich import Enricher
from evactors.enrichment.geoip import GeoIP
from evactors.enrichment.useragent import UserAgentParser
from evactors.pipeline.publisher import Publisher
from evactors.store.clickhouse import TABLES
from evactors.store.keys import Keys
from evactors.store.live import LAST_SCREEN_VIEW_TTL, last_screen_view, live_visitors
from evactors.store.redis_io import RedisIO


def _redis(service: Service) -> Any:
    return redis.Redis(unix_socket_path=str(service.data_dir / "redis" / "valkey.sock"))


def live(service: Service, *args: str) -> dict[str, Any]:
    result = run_cli("live", "--data-dir", str(service.data_dir), "--project", "project-a", "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def wait_for(check: Any, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_live_visitors_and_last_screen_view_readable(service: Service) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    at = [(now - timedelta(minutes=m)).isoformat() for m in (40, 35, 0)]
    views = {"properties": {"path": "/home"}, "context": {"userAgent": CHROME, "ip": GB_IP}}
    msgs = [message("page", anonymousId="dev-1", userId="ann", name="Home", timestamp=at[0], **views),
            message("page", anonymousId="dev-1", userId="ann", name="Pricing", timestamp=at[1],
                    properties={"path": "/pricing"}),
            # 35 minutes later in event time: ann's session closes, its last view is final
            message("track", anonymousId="dev-1", userId="ann", event="Back", timestamp=at[2]),
            message("track", anonymousId="dev-2", userId="bob", event="Clicked"),
            message("track", anonymousId="dev-3", event="Clicked")]  # no profile: the device counts
    assert service.batch(msgs).status_code == 200
    client = _redis(service)
    wait_for(lambda: client.exists("evx:lastsv:{project-a}:ann")
             and live_visitors(client, Keys("evx"), "project-a") == 3)
    # a visitor last seen 6 minutes ago is out of the window
    client.zadd("evx:live:project-a", {"gone": int(time.time() * 1000) - 6 * 60_000})
    state = live(service, "--profile", "ann")
    assert state["live_visitors"] == 3
    assert 0 < client.pttl("evx:live:project-a") <= 5 * 60_000  # the set itself goes after 5 minutes
    view = state["last_screen_view"]
    assert view["path"] == "/pricing" and view["properties"]["name"] == "Pricing"
    assert view["profile_id"] == "ann" and view["name"] == "screen_view"
    ttl = client.ttl("evx:lastsv:{project-a}:ann")  # the real key: 31 minutes from when it was set
    assert 30 * 60 < ttl <= 31 * 60 and 30 * 60 < state["last_screen_view_ttl_seconds"] <= 31 * 60
    assert live(service, "--profile", "nobody")["last_screen_view"] is None
    text = run_cli("live", "--data-dir", str(service.data_dir), "--project", "project-a", "--profile", "ann")
    assert text.returncode == 0 and "3 live visitor(s)" in text.stdout and "/pricing (Pricing)" in text.stdout


def test_backlog_exact_and_cached(service: Service) -> None:
    assert service.batch([message("track", event="Warmup")]).status_code == 200
    service.wait_rows("SELECT 1 FROM evactors.events", 1)
    service.query("DETACH TABLE evactors.events")  # rows now stay in the buffers
    client = _redis(service)
    sent = 0
    for i in range(3):
        msgs = [message("track", event="Held", anonymousId=f"b-{i}-{j % 5}") for j in range(40)]
        assert service.batch(msgs).status_code == 200
        sent += len(msgs)
    state = wait_for(lambda: (s := live(service))["backlog"]["exact"] == sent and s["backlog"]["cached"] == sent and s)
    backlog = state["backlog"]
    assert backlog["ingest"] == 0 and sum(backlog["buffers"]) == sent
    # the counters agree with what the buffer streams really hold
    shards = int(client.hget("evx:meta", "session_shards"))
    held = sum(int(fields[b"n"]) for s in range(shards) for _id, fields in client.xrange(f"evx:{{s{s}}}:buf"))
    assert held == sent
    assert 0 < backlog["cached_ttl_seconds"] <= 15 and 0 < client.ttl("evx:bufsize") <= 15
    service.query("ATTACH TABLE evactors.events")
    wait_for(lambda: (b := live(service)["backlog"])["exact"] == 0 and b["cached"] == 0, timeout=60)
    assert service.query("SELECT count() AS n FROM evactors.events WHERE name = 'Held'") == [{"n": sent}]


def test_event_saved_carries_the_row_clickhouse_holds(service: Service) -> None:
    client = _redis(service)
    pubsub = client.pubsub()
    pubsub.subscribe("event:saved")
    time.sleep(1.2)  # the publisher re-reads subscriber counts every second
    msgs = [message("track", anonymousId="s-1", userId="sue", event="Bought",
                    properties={"price": 9.5, "cart": {"items": 2}, "tags": ["a", "b"]},
                    context={"userAgent": CHROME, "ip": GB_IP,
                             "page": {"path": "/cart", "url": "https://x.io/cart?utm_source=mail"}}),
            message("identify", anonymousId="s-1", userId="sue", traits={"plan": "pro"})]
    assert service.batch(msgs).status_code == 200
    saved: list[dict[str, Any]] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(saved) < 2:
        m = pubsub.get_message(timeout=0.5)
        if m and m["type"] == "message":
            body = json.loads(m["data"])
            saved += [dict(zip(body["columns"], row, strict=True)) for row in body["rows"]]
    assert sorted(r["name"] for r in saved) == ["Bought", "identify"]
    columns = TABLES["events"][1]
    assert list(saved[0]) == columns
    times = {"created_at", "received_at", "session_start"}
    select = ", ".join(f"toUnixTimestamp64Milli({c}) AS {c}" if c in times else
                       "toString(id) AS id" if c == "id" else c for c in columns)
    stored = {r["id"]: r for r in service.query(f"SELECT {select} FROM evactors.events WHERE device_id = 's-1'")}
    assert len(stored) == 2
    for row in saved:
        held = stored[row["id"]]
        for column in columns:
            if column in ("latitude", "longitude"):  # Float32 in ClickHouse
                assert row[column] == pytest.approx(held[column], abs=1e-4), column
            else:
                assert row[column] == held[column], column
    bought = next(r for r in saved if r["name"] == "Bought")
    assert bought["properties"] == {"price": "9.5", "cart.items": "2", "tags.0": "a", "tags.1": "b"}
    assert bought["country"] == "GB" and bought["utm_source"] == "mail" and bought["profile_id"] == "sue"
    assert not math.isnan(bought["latitude"])


T0 = 1_760_000_000_000


def _view(enricher: Enricher, at: int, path: str) -> EventRow:
    incoming = Incoming(project_id="p", type="page", message_id=str(uuid.uuid4()), anonymous_id="dev",
                        user_id="ann", name=path, properties={"path": path}, traits={}, context=Context(),
                        timestamp_ms=at, received_ms=at, ip="", user_agent="", previous_id="", group_id="")
    row = enricher.enrich(incoming)
    assert isinstance(row, EventRow) and row.name == "screen_view"
    return row


async def test_the_last_screen_view_is_the_newest_and_held_views_count(valkey: Any) -> None:
    """On a real Valkey: a held view (not yet saved) makes its visitor live and is the last
    screen view; a late (older) view saved afterwards does not replace it; the held view
    saved later with its duration does."""
    redis_io = RedisIO(f"unix://{valkey.unix_socket_path}", 5)
    keys = Keys("t")
    pub = Publisher(redis_io, keys)
    enricher = Enricher(PipelineConfig(), GeoIP(None, 10), UserAgentParser(10), BotDetector(10))
    pubsub = redis_io.client.pubsub()
    pubsub.subscribe("event:received")
    pub._checked = -10.0  # re-read the subscriber count now
    pricing, late = _view(enricher, T0 + 60_000, "/pricing"), _view(enricher, T0 + 30_000, "/late")

    def last_path() -> str | None:
        view = last_screen_view(redis_io.client, keys, "p", "ann")
        return None if view is None else f"{view['path']} {view['duration']}"

    await pub.publish([Notice("event:received", [], held=[pricing])])
    await pub.write_live()  # the live keys: gathered, written once a second by its actor
    assert live_visitors(redis_io.client, keys, "p") == 1  # seen now (wall clock), whatever its event time
    assert last_path() == "/pricing 0"
    await pub.publish([Notice("event:received", [late])])
    await pub.write_live()  # the live keys: gathered, written once a second by its actor
    assert last_path() == "/pricing 0"
    pricing.duration = 45_000
    await pub.publish([Notice("event:received", [pricing])])
    await pub.write_live()  # the live keys: gathered, written once a second by its actor
    assert last_path() == "/pricing 45000"
    assert LAST_SCREEN_VIEW_TTL - 5 < redis_io.client.ttl(keys.last_screen_view("p", "ann")) <= LAST_SCREEN_VIEW_TTL
    published: list[str] = []
    while (m := pubsub.get_message(timeout=0.5)) is not None:
        if m["type"] == "message":
            published += [row[0] for row in json.loads(m["data"])["rows"]]  # the id column
    assert published == [late.id, pricing.id]  # the held view went out only once saved
    redis_io.close()


async def test_live_keys_are_written_at_most_once_a_second_with_plain_commands(valkey: Any) -> None:
    """On a real Valkey: views of 40 visitors arriving over 2 s are gathered and written in
    at most one round of plain commands a second (the first at once), no Lua; then every
    visitor is live and every last view readable."""
    import itertools

    import trio

    redis_io = RedisIO(f"unix://{valkey.unix_socket_path}", 5)
    keys = Keys("t")
    pub = Publisher(redis_io, keys)
    enricher = Enricher(PipelineConfig(), GeoIP(None, 10), UserAgentParser(10), BotDetector(10))

    def calls(command: str) -> int:
        return int(redis_io.client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))

    writes = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pub.keep_live)
        for i in range(40):
            view = msgspec.structs.replace(_view(enricher, T0 + i, f"/p{i}"), profile_id=f"v{i}")
            await pub.publish([Notice("event:received", [view])])
            await trio.sleep(0.05)
            writes.append(calls("zadd"))
        await trio.sleep(1.1)
        nursery.cancel_scope.cancel()
    assert writes[0] == 1  # the first at once (within 50 ms)
    assert 2 <= calls("zadd") <= 4  # ~2.2 s of arrivals: once a second
    assert all(b - a <= 1 for a, b in itertools.pairwise(writes))
    assert calls("evalsha") == calls("eval") == 0
    assert live_visitors(redis_io.client, keys, "p") == 40
    for i in range(40):
        view = last_screen_view(redis_io.client, keys, "p", f"v{i}")
        assert view is not None and view["path"] == f"/p{i}" and view["created_at"] == T0 + i
    redis_io.close()
