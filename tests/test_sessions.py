"""Session actors against a real Valkey: splits, sweep, dedup, held screen views."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import trio

from evactors.enrich import Enricher
from evactors.messages import Enriched
from evactors.model import Context, Incoming
from evactors.redis_io import Keys, RedisIO
from evactors.sessions import SessionShard, decode_block

MIN = 60_000
T0 = 1_760_000_000_000


class Clock:
    def __init__(self) -> None:
        self.now = T0 / 1000

    def __call__(self) -> float:
        return self.now


def incoming(kind: str, at: int, device: str = "d1", **kw: Any) -> Incoming:
    return Incoming(project_id="p", type=kind, message_id=kw.pop("message_id", str(uuid.uuid4())),
                    anonymous_id=device, user_id=kw.pop("user_id", ""), name=kw.pop("name", "E"),
                    properties=kw.pop("properties", {}), traits={}, context=Context(),
                    timestamp_ms=at, received_ms=at, ip="", user_agent="", previous_id="",
                    group_id="")


@pytest.fixture
def shard(valkey: Any) -> SessionShard:
    from evactors.bots import BotDetector
    from evactors.config import PipelineConfig
    from evactors.geoip import GeoIP
    from evactors.useragent import UserAgentParser

    redis = RedisIO(f"unix://{valkey.unix_socket_path}", 5)
    s = SessionShard(0, redis, Keys("t"), timeout_s=1800, dedup_s=3600, clock=Clock())
    s.enricher = Enricher(PipelineConfig(), GeoIP(None, 10), UserAgentParser(10), BotDetector(10))  # type: ignore[attr-defined]
    return s


async def feed(shard: SessionShard, *events: Incoming) -> list[Any]:
    items = [Enriched(shard.enricher.enrich(e), e, 0) for e in events]  # type: ignore[attr-defined]
    await shard.process(items)
    return buffered(shard)


def buffered(shard: SessionShard) -> list[Any]:
    entries = shard.redis.client.xrange(shard.keys.buffer(0))
    return [decode_block(f[b"d"]) for _i, f in entries]


def rows(blocks: list[Any], table: str = "events") -> list[Any]:
    return [r for b in blocks for r in getattr(b, table)]


async def test_idle_gap_starts_a_new_session_and_closes_the_old(shard: SessionShard) -> None:
    await feed(shard, incoming("page", T0, properties={"path": "/a"}),
               incoming("track", T0 + 10_000), incoming("page", T0 + 20_000, properties={"path": "/b"}))
    blocks = await feed(shard, incoming("track", T0 + 20_000 + 31 * MIN, name="Later"))
    events = sorted(rows(blocks), key=lambda e: e.created_at)  # buffer order: as they resolve
    names = [e.name for e in events]
    assert names == ["screen_view", "E", "screen_view", "session_end", "Later"]
    first, later = events[0], events[-1]
    assert first.session_id != later.session_id and later.is_new_session == 1
    assert later.session_number == 2 and first.session_number == 1
    assert first.duration == 20_000  # to the next screen_view
    assert events[2].duration == 0 and events[2].path == "/b"  # last view: closed at its own time
    end = events[3]
    assert end.session_id == first.session_id and end.duration == 20_000
    session = rows(blocks, "sessions")[0]
    assert (session.page_count, session.event_count, session.entry_page, session.exit_page) == (2, 3, "/a", "/b")
    assert session.duration_seconds == 20 and session.session_number == 1


async def test_sweep_closes_idle_sessions_by_wall_clock(shard: SessionShard) -> None:
    await feed(shard, incoming("page", T0, properties={"path": "/only"}))
    assert await shard.sweep() is None or not rows(buffered(shard), "sessions")
    shard.clock.now += 31 * 60  # type: ignore[attr-defined]
    commit = await shard.sweep()
    assert commit is not None and len(commit.sessions) == 1
    events = rows(buffered(shard))
    assert [e.name for e in events] == ["screen_view", "session_end"]
    assert shard.redis.client.zcard(shard.keys.session_index(0)) == 0
    assert await shard.sweep() is None  # closed exactly once


async def test_dedup_within_and_across_batches(shard: SessionShard) -> None:
    a = incoming("track", T0, message_id="same")
    await feed(shard, a, a)
    await feed(shard, incoming("track", T0 + 5, message_id="same"))
    events = rows(buffered(shard))
    assert len(events) == 1 and events[0].message_id == "same"


async def test_replaying_a_committed_batch_adds_nothing(shard: SessionShard) -> None:
    batch = [incoming("track", T0 + i, device=f"d{i % 3}") for i in range(30)]
    await feed(shard, *batch)
    before = rows(buffered(shard))
    await feed(shard, *batch)  # a replay after a crash: same messages again
    assert rows(buffered(shard)) == before
    assert len(before) == 30


async def test_session_state_survives_a_new_actor(shard: SessionShard) -> None:
    await feed(shard, incoming("track", T0, name="One"))
    again = SessionShard(0, shard.redis, shard.keys, 1800, 3600, clock=shard.clock)
    again.enricher = shard.enricher  # type: ignore[attr-defined]
    events = rows(await feed(again, incoming("track", T0 + MIN, name="Two")))
    assert events[0].session_id == events[1].session_id and events[1].is_new_session == 0


async def test_identify_writes_a_profile(shard: SessionShard) -> None:
    e = incoming("identify", T0, user_id="u1", name="")
    e.traits = {"email": "x@y.z", "address": {"city": "Oslo"}}
    blocks = await feed(shard, e)
    profile = rows(blocks, "profiles")[0]
    assert profile.profile_id == "u1" and profile.traits == {"email": "x@y.z", "address.city": "Oslo"}


async def test_trio_is_used(autojump_clock: trio.abc.Clock) -> None:
    await trio.sleep(1)


async def test_a_session_split_inside_one_batch_stays_in_the_sweep_index(shard: SessionShard) -> None:
    """Close and reopen of one device in a single commit: the new session must remain
    indexed, or its held screen view would never be flushed."""
    await feed(shard, incoming("page", T0, properties={"path": "/first"}),
               incoming("page", T0 + 60 * MIN, properties={"path": "/second"}))
    index = shard.keys.session_index(0)
    assert shard.redis.client.zcard(index) == 1
    shard.clock.now += 31 * 60  # type: ignore[attr-defined]
    await shard.sweep()
    events = sorted(rows(buffered(shard)), key=lambda e: e.created_at)
    assert [(e.name, e.path) for e in events] == [
        ("screen_view", "/first"), ("session_end", "/first"),
        ("screen_view", "/second"), ("session_end", "/second")]
    assert len(rows(buffered(shard), "sessions")) == 2


async def test_a_late_screen_view_does_not_take_the_held_slot(shard: SessionShard) -> None:
    await feed(shard, incoming("page", T0, properties={"path": "/a"}),
               incoming("page", T0 + 20_000, properties={"path": "/c"}))
    await feed(shard, incoming("page", T0 + 10_000, properties={"path": "/b"}))  # arrives late
    shard.clock.now += 31 * 60  # type: ignore[attr-defined]
    await shard.sweep()
    views = {e.path: e.duration for e in rows(buffered(shard)) if e.name == "screen_view"}
    assert views == {"/a": 20_000, "/b": 10_000, "/c": 0}
    session = rows(buffered(shard), "sessions")[0]
    assert session.exit_page == "/c" and session.page_count == 3


async def test_a_commit_waits_out_a_redis_restart(shard: SessionShard, valkey: Any) -> None:
    from evactors.redis_io import retrying

    event = incoming("track", T0, name="Patient")
    items = [Enriched(shard.enricher.enrich(event), event, 0)]  # type: ignore[attr-defined]
    await trio.to_thread.run_sync(valkey.stop)  # the real server goes away
    async with trio.open_nursery() as nursery:
        nursery.start_soon(retrying, "test commit", shard.process, items)
        await trio.sleep(0.5)  # the commit is failing and backing off meanwhile
        await trio.to_thread.run_sync(valkey.start)
    assert [e.name for e in rows(buffered(shard))] == ["Patient"]
