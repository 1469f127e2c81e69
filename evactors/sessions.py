"""Session actors: one per shard of the (project, device) key space.

Each batch costs two Redis round trips: one reads the dedup markers and user states of
the whole batch, one commits everything in one Lua script (atomic, and one command however
large the batch) — dedup markers, new user states, the open-session index (derived from
each final state), the rows for ClickHouse (one buffer-stream entry). Because the commit
is atomic and a shard is processed by one task at a time, a
replayed batch (after a crash, before its ingest entry was deleted) finds its events
marked and adds nothing: no event is kept twice, none is marked without being kept.

Sessions follow event time: a gap of more than the timeout starts a new one. A sweep
closes sessions that have had no event for the timeout by wall clock, so a session ends
even when its user never comes back. The last ``screen_view`` of a session is held in the
session state until the next one (or the end) gives it a duration; events that are not
screen views take the path/origin of that held one and record its id in
``properties.__inherit_from``.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec
import trio

from . import metrics
from .messages import Enriched, Notice, Receipt, ShardBatch
from .model import BotRow, EventRow, Incoming, ProfileRow, SessionRow, event_id, flatten, session_id
from .redis_io import Keys, RedisIO, retrying

log = logging.getLogger("evactors.sessions")

YEAR = 365 * 24 * 3600
SWEEP_LIMIT = 500


class OpenSession(msgspec.Struct, array_like=True):
    id: str
    start: int  # event time, ms
    last: int  # event time of the latest event, ms
    seen: int  # wall clock of the latest event, ms
    pages: int
    events: int
    entry: str
    exit: str
    referrer: str
    utm_source: str
    utm_medium: str
    utm_campaign: str
    utm_term: str
    utm_content: str
    profile_id: str
    country: str
    city: str
    browser: str
    os: str
    device: str
    reason: str
    pending: EventRow | None  # the last screen_view, waiting for its duration


class UserState(msgspec.Struct, array_like=True):
    """Per (project, device): the session counter (kept a year) and the open session."""

    sessions: int
    session: OpenSession | None = None


_encode = msgspec.msgpack.Encoder().encode
_decode_state = msgspec.msgpack.Decoder(UserState).decode


class Block(msgspec.Struct, array_like=True):
    """One buffer-stream entry: the rows of one commit, per table."""

    events: list[EventRow]
    sessions: list[SessionRow]
    profiles: list[ProfileRow]
    bots: list[BotRow] = []


encode_block = _encode
decode_block = msgspec.msgpack.Decoder(Block).decode


# KEYS: buffer stream, buffer count, session index, dedup keys…, state keys…
# ARGV: dedup ttl, state ttl, number of dedup keys, rows, block, then per state key its
# value and its index score ("" when it has no open session: leave the index).
COMMIT = """
local nd = tonumber(ARGV[3])
for i = 1, nd do
  redis.call('SET', KEYS[3 + i], '1', 'EX', ARGV[1])
end
local a = 6
for i = 4 + nd, #KEYS do
  redis.call('SET', KEYS[i], ARGV[a], 'EX', ARGV[2])
  if ARGV[a + 1] == '' then
    redis.call('ZREM', KEYS[3], KEYS[i])
  else
    redis.call('ZADD', KEYS[3], ARGV[a + 1], KEYS[i])
  end
  a = a + 2
end
local rows = tonumber(ARGV[4])
if rows > 0 then
  redis.call('XADD', KEYS[1], '*', 'n', ARGV[4], 'd', ARGV[5])
  redis.call('INCRBY', KEYS[2], rows)
end
return rows
"""


class Commit:
    """What one unit of work writes, gathered before the script runs."""

    def __init__(self) -> None:
        self.events: list[EventRow] = []
        self.sessions: list[SessionRow] = []
        self.profiles: list[ProfileRow] = []
        self.bots: list[BotRow] = []
        self.dedup_keys: list[str] = []
        self.states: dict[str, UserState] = {}  # the index follows each final state

    @property
    def rows(self) -> int:
        return len(self.events) + len(self.sessions) + len(self.profiles) + len(self.bots)


class SessionShard:
    def __init__(self, shard: int, redis: RedisIO, keys: Keys, timeout_s: int, dedup_s: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.shard = shard
        self.redis = redis
        self.keys = keys
        self.timeout_ms = timeout_s * 1000
        self.dedup_s = dedup_s
        self.clock = clock
        self.commit_script = redis.client.register_script(COMMIT)

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def state_key(self, project: str, device: str) -> str:
        return self.keys.user_state(self.shard, project, device)

    # --- reading ---------------------------------------------------------------------

    async def _load(self, dedup_keys: list[str], state_keys: list[str]) -> tuple[list[bool], dict[str, UserState]]:
        def build(pipe: object) -> None:
            if dedup_keys:
                pipe.mget(dedup_keys)  # type: ignore[attr-defined]
            if state_keys:
                pipe.mget(state_keys)  # type: ignore[attr-defined]

        results = await self.redis.pipeline(build) if dedup_keys or state_keys else []
        seen = [v is not None for v in results[0]] if dedup_keys else []
        raw_states = results[-1] if state_keys else []
        states = {k: _decode_state(v) if v else UserState(0) for k, v in zip(state_keys, raw_states, strict=False)}
        return seen, states

    # --- sessionizing ----------------------------------------------------------------

    def _close(self, key: str, state: UserState, commit: Commit, now: int) -> None:
        s = state.session
        assert s is not None
        project, device = key.split(":u:", 1)[1].split(":", 1)
        end = s.last
        if s.pending is not None:
            s.pending.duration = max(0, end - s.pending.created_at)
            commit.events.append(s.pending)
        commit.events.append(EventRow(
            id=event_id(project, f"session_end:{s.id}"), project_id=project, name="session_end",
            device_id=device, profile_id=s.profile_id, session_id=s.id, created_at=end,
            received_at=now, path=s.exit, origin="", referrer=s.referrer, referrer_name="",
            duration=end - s.start, properties={}, country=s.country, country_name="", region="",
            region_name="", city=s.city, postal_code="", latitude=None, longitude=None,
            timezone="", browser=s.browser, browser_version="", os=s.os, os_version="",
            device=s.device, brand="", model="", utm_source=s.utm_source,
            utm_medium=s.utm_medium, utm_campaign=s.utm_campaign, utm_term=s.utm_term,
            utm_content=s.utm_content, is_new_session=0, session_number=state.sessions,
            session_start=s.start, message_id="", type="session_end", is_bot=0, bot_reason="",
            sdk_name="", sdk_version="", ip="", user_agent=""))
        commit.sessions.append(SessionRow(
            session_id=s.id, project_id=project, device_id=device, profile_id=s.profile_id,
            session_start=s.start, session_end=end, duration_seconds=(end - s.start) // 1000,
            page_count=s.pages, event_count=s.events, session_number=state.sessions,
            entry_page=s.entry, exit_page=s.exit, referrer=s.referrer, utm_source=s.utm_source,
            utm_medium=s.utm_medium, utm_campaign=s.utm_campaign, utm_term=s.utm_term,
            utm_content=s.utm_content, country=s.country, city=s.city, browser=s.browser,
            os=s.os, device=s.device, reason=s.reason, version=now))
        state.session = None
        commit.states[key] = state
        metrics.SESSIONS_CLOSED.inc()

    def _apply(self, key: str, state: UserState, enriched: EventRow, incoming: Incoming,
               commit: Commit, now: int) -> None:
        # A copy: a failed attempt must not leave its session fields on the event.
        row = msgspec.structs.replace(enriched, properties=dict(enriched.properties))
        s = state.session
        if s is not None and row.created_at - s.last > self.timeout_ms:
            self._close(key, state, commit, now)
            s = None
        if s is None:
            state.sessions += 1
            s = OpenSession(
                id=session_id(row.project_id, row.device_id, row.created_at),
                start=row.created_at, last=row.created_at, seen=now, pages=0, events=0,
                entry="", exit="", referrer=row.referrer, utm_source=row.utm_source,
                utm_medium=row.utm_medium, utm_campaign=row.utm_campaign, utm_term=row.utm_term,
                utm_content=row.utm_content, profile_id="", country=row.country, city=row.city,
                browser=row.browser, os=row.os, device=row.device, reason="", pending=None)
            state.session = s
            row.is_new_session = 1
        s.last = max(s.last, row.created_at)
        s.seen = now
        s.events += 1
        s.profile_id = row.profile_id or s.profile_id
        row.profile_id = row.profile_id or s.profile_id
        row.session_id, row.session_number, row.session_start = s.id, state.sessions, s.start
        if row.name == "screen_view":
            s.pages += 1
            s.entry = s.entry or row.path
            held = s.pending
            if held is not None and row.created_at < held.created_at:
                # a late view: it ends where the held (later) one begins; that one stays held
                row.duration = held.created_at - row.created_at
                commit.events.append(row)
            else:
                s.exit = row.path or s.exit
                if held is not None:
                    held.duration = row.created_at - held.created_at
                    commit.events.append(held)
                s.pending = row
        else:
            held = s.pending
            if held is not None and held.created_at <= row.created_at:
                row.path, row.origin = held.path, held.origin
                row.properties["__inherit_from"] = held.id
            commit.events.append(row)
        if row.type == "identify" and row.profile_id:
            commit.profiles.append(ProfileRow(
                project_id=row.project_id, profile_id=row.profile_id, anonymous_id=row.device_id,
                traits=flatten(incoming.traits), created_at=row.created_at,
                updated_at=row.created_at))
        commit.states[key] = state

    # --- committing ------------------------------------------------------------------

    async def _commit(self, commit: Commit) -> None:
        keys, shard = self.keys, self.shard
        block = (encode_block(Block(commit.events, commit.sessions, commit.profiles, commit.bots))
                 if commit.rows else b"")
        script_keys = [keys.buffer(shard), keys.buffer_count(shard), keys.session_index(shard),
                       *commit.dedup_keys, *commit.states]
        args: list[bytes | int | str] = [self.dedup_s, YEAR, len(commit.dedup_keys), commit.rows, block]
        for state in commit.states.values():
            args += [_encode(state), state.session.seen if state.session is not None else ""]
        await self.redis.run(functools.partial(self.commit_script, keys=script_keys, args=args))

    async def process(self, items: list[Enriched]) -> Commit:
        """Dedup, sessionize and commit one unit. Safe to re-run after a failure."""
        now = self._now_ms()
        items = sorted(items, key=lambda e: e.row.created_at)
        dedup_keys = [self.keys.dedup(self.shard, e.row.project_id, e.row.message_id) for e in items]
        state_keys = list(dict.fromkeys(self.state_key(e.row.project_id, e.row.device_id)
                                        for e in items if type(e.row) is EventRow))
        seen, states = await self._load(dedup_keys, state_keys)
        commit = Commit()
        fresh: set[str] = set()
        duplicates = 0
        for item, dedup_key, was_seen in zip(items, dedup_keys, seen, strict=True):
            if was_seen or dedup_key in fresh:
                duplicates += 1
                continue
            fresh.add(dedup_key)
            commit.dedup_keys.append(dedup_key)
            row = item.row
            if isinstance(row, BotRow):  # kept aside: deduplicated, not sessionized
                commit.bots.append(row)
                continue
            key = self.state_key(row.project_id, row.device_id)
            self._apply(key, states[key], row, item.incoming, commit, now)
        await self._commit(commit)
        metrics.DUPLICATES.inc(duplicates)
        metrics.STAGE_EVENTS.labels("session").inc(len(commit.dedup_keys))
        return commit

    async def sweep(self) -> Commit | None:
        """Close sessions idle (wall clock) for longer than the timeout."""
        now = self._now_ms()
        index = self.keys.session_index(self.shard)
        expired: Any = await self.redis.run(
            lambda: self.redis.client.zrangebyscore(index, "-inf", now - self.timeout_ms,
                                                    start=0, num=SWEEP_LIMIT))
        if not expired:
            return None
        keys = [k.decode() for k in expired]
        _, states = await self._load([], keys)
        commit = Commit()
        for key in keys:
            state = states[key]
            if state.session is not None and state.session.seen <= now - self.timeout_ms:
                self._close(key, state, commit, now)
            elif state.session is None:
                commit.states[key] = state  # already closed: the commit drops it from the index
        await self._commit(commit)
        return commit


async def session_actor(shard: SessionShard, inbox: trio.MemoryReceiveChannel[ShardBatch],
                        done: trio.MemorySendChannel[list[Receipt]],
                        notices: trio.MemorySendChannel[Notice], sweep_every: float,
                        replayed: trio.Event, max_events: int = 2000) -> None:
    """Receive shard batches (coalescing what is queued), commit them, report receipts.
    Sweeps wait for the start-up replay: events a previous run accepted may continue
    sessions that look idle by the wall clock."""
    next_sweep = trio.current_time() + sweep_every
    while True:
        batch: ShardBatch | None = None
        with trio.move_on_after(max(0.0, next_sweep - trio.current_time())):
            try:
                batch = await inbox.receive()
            except trio.EndOfChannel:
                return
        if trio.current_time() >= next_sweep and replayed.is_set():
            commit = await retrying(f"session-{shard.shard} sweep", shard.sweep)
            while commit is not None and len(commit.states) >= SWEEP_LIMIT:
                commit = await retrying(f"session-{shard.shard} sweep", shard.sweep)
            next_sweep = trio.current_time() + sweep_every
        if batch is None:
            continue
        items, receipts = list(batch.events), list(batch.receipts)
        while len(items) < max_events:
            try:
                more = inbox.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            items.extend(more.events)
            receipts.extend(more.receipts)
        commit = await retrying(f"session-{shard.shard} commit", shard.process, items)
        finished = []
        for receipt in receipts:
            receipt.remaining -= 1
            if receipt.remaining == 0:
                finished.append(receipt)
        if finished:
            await done.send(finished)
        if commit.events:
            try:
                notices.send_nowait(Notice("event:received", commit.events))
            except trio.WouldBlock:
                metrics.PUBLISH_DROPPED.inc()
