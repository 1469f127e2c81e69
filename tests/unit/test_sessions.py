"""Session actors against a real Valkey: splits, sweep, dedup, held screen views."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import redis as redis_py
import trio

from evactors.core.blocks import decode_block
from evactors.core.messages import Enriched
from evactors.core.model import Context, Incoming, event_id
from evactors.enrichment.enrich import Enricher, remap_row
from evactors.pipeline.sessions import SessionShard
from evactors.store.keys import Keys
from evactors.store.redis_io import RedisIO

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
                    timestamp_ms=at, received_ms=at, ip="", user_agent="",
                    previous_id=kw.pop("previous_id", ""), group_id="")


@pytest.fixture
def shard(valkey: Any) -> SessionShard:
    redis = RedisIO(f"unix://{valkey.unix_socket_path}", 5)
    s = SessionShard(0, redis, Keys("t"), timeout_s=1800, dedup_s=3600, clock=Clock())
    s.enricher = _enricher()  # type: ignore[attr-defined]
    return s


def _enricher() -> Enricher:
    from evactors.core.config import PipelineConfig
    from evactors.enrichment.bots import BotDetector
    from evactors.enrichment.geoip import GeoIP
    from evactors.enrichment.useragent import UserAgentParser

    return Enricher(PipelineConfig(), GeoIP(None, 10), UserAgentParser(10), BotDetector(10))


async def feed(shard: SessionShard, *events: Incoming) -> list[Any]:
    items = [Enriched(remap_row(e) if e.type == "remap" else shard.enricher.enrich(e), e, 0)  # type: ignore[attr-defined]
             for e in events]
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


async def test_a_late_screen_view_within_the_window_takes_its_place(shard: SessionShard) -> None:
    await feed(shard, incoming("page", T0, properties={"path": "/a"}),
               incoming("page", T0 + 20_000, properties={"path": "/c"}))
    await feed(shard, incoming("page", T0 + 10_000, properties={"path": "/b"}))  # 10 s late
    shard.clock.now += 31 * 60  # type: ignore[attr-defined]
    await shard.sweep()
    views = {e.path: e for e in rows(buffered(shard)) if e.name == "screen_view"}
    assert {p: v.duration for p, v in views.items()} == {"/a": 10_000, "/b": 10_000, "/c": 0}
    assert views["/c"].properties["__duration_from"] == "session_end"
    assert "__duration_from" not in views["/a"].properties
    session = rows(buffered(shard), "sessions")[0]
    assert (session.entry_page, session.exit_page, session.page_count) == ("/a", "/c", 3)


async def test_views_are_saved_once_the_next_is_past_the_window(shard: SessionShard) -> None:
    await feed(shard, incoming("page", T0, properties={"path": "/a"}),
               incoming("page", T0 + 30_000, properties={"path": "/b"}))
    assert rows(buffered(shard)) == []  # /b is within 60 s of the latest event: /a may still change
    await feed(shard, incoming("page", T0 + 5 * MIN, properties={"path": "/c"}))
    saved = [(e.path, e.duration) for e in rows(buffered(shard))]
    assert saved == [("/a", 30_000)]  # a view at 4–5 min could still come before /c
    await feed(shard, incoming("track", T0 + 6 * MIN + 1, name="Later"))
    saved = [e for e in rows(buffered(shard)) if e.name == "screen_view"]
    assert [(e.path, e.duration) for e in saved] == [("/a", 30_000), ("/b", 5 * MIN - 30_000)]
    for view in saved:  # held compactly, saved whole
        assert (view.project_id, view.device_id) == ("p", "d1")
        assert view.id == event_id("p", view.message_id) and view.session_id and view.session_start == T0


async def test_a_straggler_beyond_the_window_joins_its_open_session(shard: SessionShard) -> None:
    from evactors.ops import metrics

    before = metrics.LATE_EVENTS.labels("beyond_window")._value.get()
    await feed(shard, incoming("page", T0, properties={"path": "/a"}),
               incoming("page", T0 + 5 * MIN, properties={"path": "/c"}),
               incoming("track", T0 + 10 * MIN, name="Later"))
    await feed(shard, incoming("page", T0 + 2 * MIN, properties={"path": "/b"}))  # 8 min late
    assert metrics.LATE_EVENTS.labels("beyond_window")._value.get() == before + 1
    events = {e.path if e.name == "screen_view" else e.name: e for e in rows(buffered(shard))}
    # /a was saved before /b came; /b ends where the next known view begins
    assert events["/a"].duration == 5 * MIN and events["/b"].duration == 3 * MIN
    assert events["/b"].session_id == events["/a"].session_id


async def test_a_late_track_inherits_from_the_view_before_it(shard: SessionShard) -> None:
    await feed(shard, incoming("page", T0, properties={"path": "/a"}),
               incoming("page", T0 + 2 * MIN, properties={"path": "/b"}),
               incoming("page", T0 + 4 * MIN, properties={"path": "/c"}))
    await feed(shard, incoming("track", T0 + 3 * MIN, name="Late"),  # after /b, before /c
               incoming("track", T0 + 1 * MIN, name="Later"))  # after /a (already saved)
    await shard.sweep(close_all=True)
    by_path = {e.path: e for e in rows(buffered(shard)) if e.name == "screen_view"}
    tracks = {e.name: e for e in rows(buffered(shard)) if e.type == "track"}
    assert tracks["Late"].path == "/b" and tracks["Late"].properties["__inherit_from"] == by_path["/b"].id
    assert tracks["Later"].path == "/a" and tracks["Later"].properties["__inherit_from"] == by_path["/a"].id


async def test_a_gap_of_exactly_the_timeout_stays_in_the_session(shard: SessionShard) -> None:
    await feed(shard, incoming("track", T0), incoming("track", T0 + 30 * MIN),
               incoming("track", T0 + 60 * MIN + 1))
    events = sorted(rows(buffered(shard)), key=lambda e: (e.created_at, e.name))
    tracks = [e for e in events if e.type == "track"]
    assert tracks[0].session_id == tracks[1].session_id != tracks[2].session_id
    assert [e.is_new_session for e in tracks] == [1, 0, 1]
    assert [e.session_number for e in tracks] == [1, 1, 2]


async def test_a_straggler_of_a_closed_session_keeps_its_id_and_is_counted(shard: SessionShard) -> None:
    from evactors.ops import metrics

    before = metrics.LATE_EVENTS.labels("closed_session")._value.get()
    await feed(shard, incoming("track", T0, name="A"), incoming("track", T0 + 5 * MIN, name="B"))
    shard.clock.now += 31 * 60  # type: ignore[attr-defined]
    await shard.sweep()
    await feed(shard, incoming("track", T0 + 2 * MIN, name="Straggler"))
    events = {e.name: e for e in rows(buffered(shard))}
    assert events["Straggler"].session_id == events["A"].session_id
    assert metrics.LATE_EVENTS.labels("closed_session")._value.get() == before + 1
    assert len(rows(buffered(shard), "sessions")) == 1  # the closed session is not re-opened


async def test_a_straggler_between_two_sessions_continues_the_earlier(shard: SessionShard) -> None:
    """Within the timeout of both: the event before it in time is the closed session's."""
    await feed(shard, incoming("track", T0, name="First"))
    await feed(shard, incoming("track", T0 + 40 * MIN, name="Second"))  # closes the first
    await feed(shard, incoming("track", T0 + 25 * MIN, name="Between"))  # 15 min before Second
    events = {e.name: e for e in rows(buffered(shard))}
    assert events["Between"].session_id == events["First"].session_id != events["Second"].session_id


async def test_alias_and_identify_resolve_later_events_to_one_profile(shard: SessionShard) -> None:
    await feed(shard, incoming("track", T0, name="Anon"),
               incoming("identify", T0 + 1000, user_id="old-user"))
    await feed(shard, incoming("alias", T0 + 2000, user_id="new-user", previous_id="old-user"))
    await feed(shard, incoming("track", T0 + 3000, name="Device"),  # known device, no userId
               incoming("track", T0 + 4000, device="d2", name="Other", user_id="old-user"))
    events = {e.name: e for e in rows(buffered(shard))}
    assert events["Anon"].profile_id == ""  # before anyone knew
    assert events["identify"].profile_id == "old-user"
    assert events["Device"].profile_id == "new-user"
    assert events["Other"].profile_id == "new-user"  # through the alias link
    # a chain: new-user → newest-user resolves old ids to the newest
    await feed(shard, incoming("alias", T0 + 5000, user_id="newest-user", previous_id="new-user"))
    await feed(shard, incoming("track", T0 + 6000, device="d3", name="Chain", user_id="old-user"))
    assert {e.name: e for e in rows(buffered(shard))}["Chain"].profile_id == "newest-user"


async def test_a_remap_continues_the_count_and_marks_the_session(shard: SessionShard) -> None:
    await feed(shard, incoming("track", T0, device="old", name="Before"),
               incoming("track", T0 + 60 * MIN, device="old", name="Again"))  # two sessions
    await feed(shard, incoming("remap", T0 + 61 * MIN, device="new", previous_id="old"))
    await feed(shard, incoming("track", T0 + 62 * MIN, device="new", name="After"),
               incoming("track", T0 + 120 * MIN, device="new", name="Later"))
    events = {e.name: e for e in rows(buffered(shard))}
    assert "$remap" not in events
    assert events["After"].session_number == 3 and events["After"].is_new_session == 1
    assert events["Later"].session_number == 4
    sessions = {s.session_id: s for s in rows(buffered(shard), "sessions")}
    assert sessions[events["After"].session_id].reason == "re-anonymized"
    shard.clock.now += 200 * 60  # type: ignore[attr-defined]
    await shard.sweep()
    sessions = {s.session_id: s for s in rows(buffered(shard), "sessions")}
    assert sessions[events["Later"].session_id].reason == ""  # only the one the re-map started


async def test_a_remap_in_a_unit_splits_it_where_it_came(shard: SessionShard) -> None:
    """A re-map carries the wall clock of the command, later than the events around it: in
    one unit it still applies after what came before it and before what came after it."""
    await feed(shard, incoming("identify", T0, device="old", user_id="u3"))
    await feed(shard, incoming("track", T0 + MIN, device="old", name="Before"),
               incoming("remap", T0 + 500 * MIN, device="new", previous_id="old"),
               incoming("track", T0 + 2 * MIN, device="new", name="After"))
    events = {e.name: e for e in rows(buffered(shard))}
    assert events["Before"].profile_id == "u3" and events["Before"].session_number == 1
    assert events["After"].profile_id == "u3"  # the re-map came first: "new" is "old" now
    assert events["After"].session_number == 2 and events["After"].is_new_session == 1


async def test_close_all_closes_every_open_session(shard: SessionShard) -> None:
    await feed(shard, *[incoming("page", T0 + i, device=f"v{i}", properties={"path": "/p"}) for i in range(7)])
    await shard.sweep(close_all=True)
    assert len(rows(buffered(shard), "sessions")) == 7
    assert sum(e.name == "session_end" for e in rows(buffered(shard))) == 7
    assert shard.redis.client.zcard(shard.keys.session_index(0)) == 0


async def test_the_actor_closes_an_idle_session_after_the_timeout(valkey: Any, autojump_clock: trio.abc.Clock) -> None:
    """The real actor loop on trio's clock: 30 idle minutes pass at once."""
    from evactors.core.messages import ShardBatch
    from evactors.pipeline.sessions import session_actor

    start = trio.current_time()
    redis = RedisIO(f"unix://{valkey.unix_socket_path}", 5)
    shard = SessionShard(0, redis, Keys("t"), timeout_s=1800, dedup_s=3600,
                         clock=lambda: T0 / 1000 + trio.current_time() - start)
    shard.enricher = _enricher()  # type: ignore[attr-defined]
    inbox_tx, inbox_rx = trio.open_memory_channel[ShardBatch](4)
    done_tx, _ = trio.open_memory_channel[Any](100)
    notice_tx, _ = trio.open_memory_channel[Any](100)
    replayed = trio.Event()
    replayed.set()
    event = incoming("page", T0, properties={"path": "/only"})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session_actor, shard, inbox_rx, done_tx, notice_tx, 10.0, replayed)
        await inbox_tx.send(ShardBatch([Enriched(shard.enricher.enrich(event), event, 0)], []))  # type: ignore[attr-defined]
        while not shard.redis.client.zcard(shard.keys.session_index(0)):  # until committed
            await trio.sleep(0.01)
        committed = trio.current_time()
        while not rows(buffered(shard), "sessions") and trio.current_time() - committed < 3600:
            await trio.sleep(5)
        idle = trio.current_time() - committed
        # the timeout, plus a sweep interval or so (the clock jumps while Redis answers in a thread)
        assert 30 * 60 <= idle <= 30 * 60 + 60
        assert len(rows(buffered(shard), "sessions")) == 1
        assert [e.name for e in rows(buffered(shard))] == ["screen_view", "session_end"]
        nursery.cancel_scope.cancel()


async def test_a_commit_waits_out_a_redis_restart(shard: SessionShard, valkey: Any) -> None:
    from evactors.store.redis_io import retrying

    event = incoming("track", T0, name="Patient")
    items = [Enriched(shard.enricher.enrich(event), event, 0)]  # type: ignore[attr-defined]
    await trio.to_thread.run_sync(valkey.stop)  # the real server goes away
    async with trio.open_nursery() as nursery:
        nursery.start_soon(retrying, "test commit", shard.process, items)
        await trio.sleep(0.5)  # the commit is failing and backing off meanwhile
        await trio.to_thread.run_sync(valkey.start)
    assert [e.name for e in rows(buffered(shard))] == ["Patient"]


async def test_a_straggling_identify_still_upserts_its_profile(shard: SessionShard) -> None:
    await feed(shard, incoming("track", T0, name="A"), incoming("track", T0 + 40 * MIN, name="B"))
    await feed(shard, incoming("identify", T0 + 1 * MIN, user_id="u-late"))  # a closed session's
    profiles = rows(buffered(shard), "profiles")
    assert [(p.profile_id, p.anonymous_id, p.updated_at) for p in profiles] == [("u-late", "d1", T0 + MIN)]


async def test_a_burst_of_views_holds_at_most_eight(shard: SessionShard) -> None:
    from evactors.pipeline.sessions import MAX_HELD_VIEWS, _decode_state

    await feed(shard, *[incoming("page", T0 + i * 1000, properties={"path": f"/{i}"}) for i in range(12)])
    saved = [(e.path, e.duration) for e in rows(buffered(shard))]
    assert saved == [(f"/{i}", 1000) for i in range(12 - MAX_HELD_VIEWS)]
    state = _decode_state(shard.redis.client.get(shard.state_key("p", "d1")))
    assert len(state.session.held()) == MAX_HELD_VIEWS == 8


class ReplyCutter:
    """A TCP relay in front of the real server that, when armed, lets one transaction reach
    the server and cuts the connection before its reply comes back: a commit that happened
    with an outcome the client cannot know."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.armed = False
        self.cut = 0

    async def serve(self, nursery: trio.Nursery) -> int:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        nursery.start_soon(trio.serve_listeners, self._relay, listeners)
        return int(listeners[0].socket.getsockname()[1])

    async def _relay(self, client: trio.SocketStream) -> None:
        server = await trio.open_unix_socket(self.socket_path)
        async with client, server, trio.open_nursery() as nursery:
            async def up() -> None:
                while data := await client.receive_some(1 << 16):
                    await server.send_all(data)
                nursery.cancel_scope.cancel()

            async def down() -> None:
                while data := await server.receive_some(1 << 16):
                    if self.armed and data.startswith(b"+OK\r\n+QUEUED"):  # MULTI's replies: a commit
                        self.armed = False
                        self.cut += 1
                        nursery.cancel_scope.cancel()
                        return
                    await client.send_all(data)
                nursery.cancel_scope.cancel()

            nursery.start_soon(up)
            nursery.start_soon(down)


async def test_a_commit_whose_reply_is_lost_is_retried_exactly_once(valkey: Any) -> None:
    """The commit reaches Redis and is applied, the reply never comes back: the shard must
    not keep the states it changed for that attempt, nor miss the dedup it wrote."""
    from evactors.pipeline.sessions import _decode_state
    from evactors.store.redis_io import retrying

    cutter = ReplyCutter(str(valkey.unix_socket_path))
    async with trio.open_nursery() as nursery:
        port = await cutter.serve(nursery)
        redis = RedisIO(f"redis://127.0.0.1:{port}/0", 5)  # the shard's commands go through the relay
        redis.client.close()
        redis.client = redis_py.Redis(unix_socket_path=str(valkey.unix_socket_path))  # the test's reads do not
        shard = SessionShard(0, redis, Keys("t"), timeout_s=1800, dedup_s=3600, clock=Clock())
        shard.enricher = _enricher()  # type: ignore[attr-defined]
        await feed(shard, *[incoming("track", T0 + i, name="First") for i in range(5)])
        second = [incoming("track", T0 + MIN + i, name="Second") for i in range(7)]
        items = [Enriched(shard.enricher.enrich(e), e, 0) for e in second]  # type: ignore[attr-defined]
        cutter.armed = True
        await retrying("test commit", shard.process, items)
        assert cutter.cut == 1  # the first attempt did commit, unknown to the shard
        names = [e.name for e in rows(buffered(shard))]
        assert names == ["First"] * 5 + ["Second"] * 7  # the retry found its events committed
        state = _decode_state(shard.redis.client.get(shard.state_key("p", "d1")))
        assert state.session is not None and state.session.events == 12
        await feed(shard, incoming("track", T0 + 2 * MIN, name="Third"))  # and it goes on from there
        state = _decode_state(shard.redis.client.get(shard.state_key("p", "d1")))
        assert state.session is not None and state.session.events == 13 and state.sessions == 1
        redis.close()
        nursery.cancel_scope.cancel()


async def test_a_refused_commit_leaves_no_state_behind_in_memory(shard: SessionShard) -> None:
    """Redis refuses the whole transaction (full: OOM): the retry must start from the
    committed states, not from what the failed attempt did to them in memory."""
    from evactors.pipeline.sessions import _decode_state
    from evactors.store.redis_io import retrying

    await feed(shard, *[incoming("page", T0 + i, properties={"path": f"/{i}"}) for i in range(3)])
    items = [Enriched(shard.enricher.enrich(e), e, 0)  # type: ignore[attr-defined]
             for e in [incoming("track", T0 + 10 + i, name="Later") for i in range(4)]]
    client = shard.redis.client
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", 1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(retrying, "test commit", shard.process, items)
        await trio.sleep(0.3)  # refused (OOM), backing off
        assert not any(e.name == "Later" for e in rows(buffered(shard)))
        client.config_set("maxmemory", 0)
    state = _decode_state(client.get(shard.state_key("p", "d1")))
    assert state.session is not None and (state.session.events, state.session.pages) == (7, 3)
    assert [e.name for e in rows(buffered(shard))].count("Later") == 4


async def test_states_come_from_memory_after_first_sight(shard: SessionShard) -> None:
    """A known visitor's state is not read again: a unit reads only the alias links."""
    await feed(shard, incoming("track", T0, name="One"))
    shard.redis.client.delete(shard.state_key("p", "d1"))  # memory is the truth while the actor lives
    events = rows(await feed(shard, incoming("track", T0 + MIN, name="Two")))
    assert events[0].session_id == events[1].session_id and events[1].is_new_session == 0
    assert shard.redis.client.exists(shard.state_key("p", "d1"))  # written through again


async def test_the_state_cache_is_bounded(valkey: Any) -> None:
    redis = RedisIO(f"unix://{valkey.unix_socket_path}", 5)
    shard = SessionShard(0, redis, Keys("t"), timeout_s=1800, dedup_s=3600, clock=Clock(), state_cache=10)
    shard.enricher = _enricher()  # type: ignore[attr-defined]
    await feed(shard, *[incoming("track", T0 + i, device=f"v{i}") for i in range(25)])
    assert len(shard.cache) == 10
    assert list(shard.cache) == [shard.state_key("p", f"v{i}") for i in range(15, 25)]  # the most recent
    events = rows(await feed(shard, incoming("track", T0 + MIN, device="v0")))  # read back from Redis
    assert events[-1].session_number == 1 and events[-1].is_new_session == 0


async def test_a_redis_that_lost_writes_is_read_again(shard: SessionShard) -> None:
    """Redis comes back without the last commits (here: emptied): the commit count tells the
    shard, which drops its memory, so the replay of the lost events is kept, not taken for
    duplicates by a dedup window that Redis no longer has."""
    lost = [incoming("track", T0 + i, name="Lost", device=f"d{i}") for i in range(3)]
    await feed(shard, *lost)
    shard.redis.client.flushdb()  # the buffer rows and their dedup went with it
    await feed(shard, incoming("track", T0 + MIN, name="After"))  # the count does not follow
    assert shard.commits == 1 and not shard.cache and not shard.dedup.loaded
    await feed(shard, *lost)  # their ingest entry is replayed
    assert sorted(e.name for e in rows(buffered(shard))) == ["After", "Lost", "Lost", "Lost"]
