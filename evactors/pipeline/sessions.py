"""Session actors: one per shard of the (project, device) key space.

A shard is processed by one task at a time, so the actor owns its state in memory: the
user states it has seen (an LRU of ``pipeline.session_state_cache`` entries, read from Redis
on first sight) and its dedup window (``dedup.ShardDedup``). Each unit of work costs two Redis round trips
(a third only to follow alias chains): one reads the alias links (cross-shard) and the
states not in memory, one commits everything in one MULTI/EXEC — the unit's dedup
fingerprints, new user states, alias links, the open-session index (derived from each final
state), the rows for ClickHouse (one buffer-stream entry), the buffer count and the
shard's commit count (one that does not follow drops the memory). Because the
commit is atomic, a replayed unit (after a crash, before its ingest entry was deleted) finds
its events deduplicated and adds nothing: no event is kept twice, none is marked without
being kept. A commit that fails or whose outcome is unknown (an error, a timeout, a lost
connection) drops what is in memory: the retry reads the states and the dedup bucket again,
and finds its events there if the first attempt did commit.

The rules (docs/sessions.md) in short: sessions follow event time, a gap of more than the
timeout starts a new one, and a sweep closes sessions idle for the timeout by wall clock.
Screen views are held in the session state until their duration is final: until the next
view is older than the lateness window, so a view arriving late (within the window) still
takes its place. Other events take path/origin of the view before them and record its id in
``properties.__inherit_from``. Saved rows are never rewritten: that is what keeps them
exactly once.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import itertools
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
import trio

from evactors.core.blocks import Block, encode_block
from evactors.core.channels import take_queued
from evactors.core.messages import Enriched, Notice, Receipt, ShardBatch, count_down
from evactors.core.model import BotRow, EventRow, Incoming, ProfileRow, SessionRow, event_id, flatten, session_id
from evactors.core.sharding import shard_of
from evactors.ops import metrics
from evactors.store.dedup import ShardDedup, fingerprint
from evactors.store.inbox import READ_UNITS, Inbox, stream_id
from evactors.store.keys import Keys
from evactors.store.leases import Lease, LeaseLost, ShardLeases
from evactors.store.redis_io import RedisIO, as_dict, retrying
from evactors.store.resp import Command, FenceMoved

if TYPE_CHECKING:
    from evactors.core.config import PipelineConfig


log = logging.getLogger("evactors.sessions")

T = TypeVar("T")


YEAR = 365 * 24 * 3600


SWEEP_LIMIT = 500


ALIAS_HOPS = 4  # alias chains longer than this resolve to where the walk stopped


# Held screen views per session at most: past it the oldest is saved although a late view
# could still fall before its successor (a burst of views keeps the state bounded).
MAX_HELD_VIEWS = 8


REANONYMIZED = "re-anonymized"


# How often a held shard looks into its inbox (events other instances took for it): the delay
# such an event may wait at most. Alone (no other live instance), only for what was left there
# before the shard was taken (a start, a restarted worker), so seldom.
INBOX_POLL_SECONDS = 0.05
INBOX_POLL_ALONE_SECONDS = 1.0


class ViewRef(msgspec.Struct, array_like=True):
    """The latest screen view already saved: what a late event still inherits from."""

    id: str
    path: str
    origin: str
    at: int


class OpenSession(msgspec.Struct, array_like=True):
    # Field order is the stored encoding: new fields go at the end, with a default.
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
    pending: EventRow | None  # the latest screen view: its duration waits for the next one
    earlier: list[EventRow] = []  # held views before `pending`, within the lateness window
    released: ViewRef | None = None
    entry_at: int = 0
    exit_at: int = 0

    def held(self) -> list[EventRow]:
        """The held views, as stored: without what the session and its key give back."""
        return [*self.earlier, self.pending] if self.pending is not None else list(self.earlier)

    def hold(self, views: list[EventRow]) -> None:
        for view in views:  # compact: ~130 bytes less per held view (see restore)
            view.id = view.project_id = view.device_id = view.session_id = ""
        self.earlier, self.pending = views[:-1], (views[-1] if views else None)

    def restore(self, view: EventRow, project: str, device: str) -> EventRow:
        """A held view as it is saved: its id (derived from its messageId), project,
        device and session."""
        view.id = event_id(project, view.message_id)
        view.project_id, view.device_id, view.session_id, view.session_start = project, device, self.id, self.start
        return view


class ClosedRef(msgspec.Struct, array_like=True):
    """The last closed session of a device: where a straggler of it still belongs."""

    id: str
    start: int
    last: int
    number: int


class UserState(msgspec.Struct, array_like=True):
    """Per (project, device): the session counter (kept a year), the open session, the
    profile the device is known as, and what the next session must carry (a re-map)."""

    sessions: int
    session: OpenSession | None = None
    profile: str = ""
    next_reason: str = ""
    closed: ClosedRef | None = None


_encode = msgspec.msgpack.Encoder().encode


_decode_state = msgspec.msgpack.Decoder(UserState).decode


def _alias_commands(aliases: dict[str, str]) -> list[Command]:
    return [["SET", key, target, "EX", YEAR] for key, target in aliases.items()]


class Commit:
    """What one unit of work writes, gathered before the script runs."""

    def __init__(self) -> None:
        self.events: list[EventRow] = []
        self.sessions: list[SessionRow] = []
        self.profiles: list[ProfileRow] = []
        self.bots: list[BotRow] = []
        self.fingerprints: list[bytes] = []  # of the events accepted (see dedup)
        self.aliases: dict[str, str] = {}  # alias key → the id it resolves to
        self.states: dict[str, UserState] = {}  # the index follows each final state
        self.taken_in: list[bytes] = []  # inbox entries this unit takes in (deleted by its commit)

    @property
    def rows(self) -> int:
        return len(self.events) + len(self.sessions) + len(self.profiles) + len(self.bots)


Link = tuple[str, str]  # (project, id): an alias link's source


class Loaded:
    """What one batch read: user states, alias links (source → target)."""

    def __init__(self, states: dict[str, UserState], links: dict[Link, str],
                 sources: dict[str, UserState]) -> None:
        self.states = states
        self.links = links
        self.sources = sources  # re-mapped ids' states, read only


TRUNCATED = "__truncated_properties"


def trim_properties(view: EventRow, limit: int) -> None:
    """Bound a view held in a session's state: past ``limit`` bytes of properties (as JSON),
    the largest are dropped, and named (sorted, comma-separated) in ``__truncated_properties``.
    Up to MAX_HELD_VIEWS views are held per session, so its state stays within about
    MAX_HELD_VIEWS × ``limit`` (a 30 KB page view held 30 KB per visitor before)."""
    props = view.properties
    sizes = {k: len(k) + len(v.encode()) + 6 for k, v in props.items()}  # "k":"v",
    total = sum(sizes.values())
    if total <= limit:
        return
    dropped = []
    for key in sorted(props, key=lambda k: (-sizes[k], k)):
        if total <= limit - 64:  # room for the note
            break
        total -= sizes[key]
        dropped.append(key)
    view.properties = {k: v for k, v in props.items() if k not in dropped}
    note = ",".join(sorted(dropped))
    view.properties[TRUNCATED] = note if len(note) <= 512 else f"{len(dropped)} properties"
    metrics.HELD_VIEWS_TRUNCATED.inc()


class SessionShard:
    def __init__(self, shard: int, redis: RedisIO, keys: Keys, timeout_s: int, dedup_s: int,
                 clock: Callable[[], float] = time.time, *, lateness_s: int = 60,
                 shards: int = 1, max_held_view_bytes: int = 4096, dedup_bucket_s: int = 3600,
                 state_cache: int = 20_000, lease: Lease | None = None) -> None:
        self.shard = shard
        # the shard's lease: commits run under its fence (none: unfenced, for benchmarks)
        self.lease = lease
        self.token: int | None = None  # the fence under which memory was read
        self.max_held_view_bytes = max_held_view_bytes
        self.shards = shards
        self.redis = redis
        self.keys = keys
        self.timeout_ms = timeout_s * 1000
        self.lateness_ms = lateness_s * 1000
        self.dedup_s = dedup_s
        self.clock = clock
        self.dedup = ShardDedup(shard, keys, dedup_s, dedup_bucket_s)
        self.state_cache = state_cache
        self.cache: OrderedDict[str, UserState] = OrderedDict()  # key → state, least recent first
        self.commits: int | None = None  # the shard's commit count after our last commit
        self.aliases_written = False  # on a cluster: no committed alias link waits to be written

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _held(self) -> None:
        """Before a unit: ``LeaseLost`` if the shard is not ours; memory read under another
        token than the lease's (it lapsed and was taken again) is read again."""
        if self.lease is None:
            return
        self.lease.fence()
        if self.lease.token != self.token:
            self.forget(everything=True)
            self.token = self.lease.token

    def state_key(self, project: str, device: str) -> str:
        return self.keys.user_state(self.shard, project, device)

    def _foreign_state_key(self, project: str, device: str) -> str:
        """The state key of a device that may live in another shard (read only)."""
        shard = shard_of(project, device, self.shards)
        return self.keys.user_state(shard, project, device)

    # --- reading ---------------------------------------------------------------------

    async def _mget(self, *groups: list[str]) -> list[list[Any]]:
        """One round trip: an MGET per non-empty group."""
        wanted = [g for g in groups if g]
        if not wanted:
            return [[] for _ in groups]

        results = iter(await self.redis.execute([["MGET", *group] for group in wanted], check=True))
        return [next(results) if g else [] for g in groups]

    async def _load(self, state_keys: list[str], ids: list[Link] | None = None,
                    source_keys: list[str] | None = None) -> Loaded:
        """The states of ``state_keys`` (from memory, else Redis), the alias links of
        ``ids`` and the states of ``source_keys`` (other shards', read only)."""
        ids, source_keys = ids or [], source_keys or []
        alias = self.keys.alias
        cache = self.cache
        missing = [k for k in state_keys if k not in cache]
        raw_states, raw_links, raw_sources = await self._mget(missing, [alias(*i) for i in ids], source_keys)
        read = {k: _decode_state(v) if v else UserState(0) for k, v in zip(missing, raw_states, strict=True)}
        states = {k: read[k] if k in read else cache[k] for k in state_keys}
        sources = {k: _decode_state(v) if v else UserState(0) for k, v in zip(source_keys, raw_sources, strict=True)}
        links = {i: v.decode() for i, v in zip(ids, raw_links, strict=True) if v}
        # Follow chains (a → b, then b → c): another round trip only when links exist.
        asked = set(ids)
        for _ in range(ALIAS_HOPS):
            ask = list({(project, target) for (project, _), target in links.items()} - asked)
            if not ask:
                break
            asked.update(ask)
            (found,) = await self._mget([alias(*i) for i in ask])
            links.update({i: v.decode() for i, v in zip(ask, found, strict=True) if v})
        return Loaded(states, links, sources)

    # --- identity --------------------------------------------------------------------

    @staticmethod
    def _resolve(project: str, uid: str, links: dict[Link, str]) -> str:
        """``uid`` through the alias links, to the newest id (cycles stop where they loop)."""
        seen = {uid}
        for _ in range(ALIAS_HOPS + 1):
            nxt = links.get((project, uid))
            if not nxt or nxt in seen:
                break
            seen.add(nxt)
            uid = nxt
        return uid

    # --- sessionizing ----------------------------------------------------------------

    def _close(self, key: str, state: UserState, commit: Commit, now: int) -> None:
        s = state.session
        assert s is not None
        project, device = _ids(key)
        end = s.last
        views = [s.restore(v, project, device) for v in s.held()]
        for view, after in itertools.pairwise(views):
            view.duration = after.created_at - view.created_at
            commit.events.append(view)
        if views:
            last = views[-1]
            last.duration = max(0, end - last.created_at)
            last.properties["__duration_from"] = "session_end"
            commit.events.append(last)
        commit.events.append(EventRow(
            id=event_id(project, f"session_end:{s.id}"), project_id=project, name="session_end",
            device_id=device, profile_id=s.profile_id, session_id=s.id, created_at=end,
            received_at=now, path=s.exit, origin="", referrer=s.referrer, referrer_name="",
            duration=end - s.start, properties={"reason": s.reason} if s.reason else {},
            country=s.country, country_name="", region="",
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
        state.closed = ClosedRef(s.id, s.start, s.last, state.sessions)
        state.session = None
        commit.states[key] = state
        metrics.SESSIONS_CLOSED.inc()

    def _open(self, state: UserState, row: EventRow, now: int) -> OpenSession:
        state.sessions += 1
        s = OpenSession(
            id=session_id(row.project_id, row.device_id, row.created_at),
            start=row.created_at, last=row.created_at, seen=now, pages=0, events=0,
            entry="", exit="", referrer=row.referrer, utm_source=row.utm_source,
            utm_medium=row.utm_medium, utm_campaign=row.utm_campaign, utm_term=row.utm_term,
            utm_content=row.utm_content, profile_id="", country=row.country, city=row.city,
            browser=row.browser, os=row.os, device=row.device, reason=state.next_reason,
            pending=None)
        state.next_reason = ""
        state.session = s
        row.is_new_session = 1
        return s

    def _straggler(self, state: UserState, row: EventRow, commit: Commit) -> None:
        """An event whose session has closed: saved with that session's id when it was the
        device's last one closed (else with none); the closed session stays as it was."""
        closed = state.closed
        if closed is not None and closed.start - self.timeout_ms <= row.created_at <= closed.last + self.timeout_ms:
            row.session_id, row.session_number, row.session_start = closed.id, closed.number, closed.start
        metrics.LATE_EVENTS.labels("closed_session").inc()
        commit.events.append(row)

    def _apply(self, key: str, state: UserState, enriched: EventRow, incoming: Incoming,
               commit: Commit, now: int, links: dict[Link, str]) -> None:
        # A copy: a failed attempt must not leave its session fields on the event.
        row = msgspec.structs.replace(enriched, properties=dict(enriched.properties))
        project, device, t = row.project_id, row.device_id, row.created_at
        commit.states[key] = state
        # Identity first: every row carries the profile its device is known as by now.
        if row.profile_id:
            state.profile = self._resolve(project, row.profile_id, links)
        elif state.profile:
            state.profile = self._resolve(project, state.profile, links)
        elif (project, row.device_id) in links:
            state.profile = self._resolve(project, row.device_id, links)
        if row.type == "alias" and row.profile_id and incoming.previous_id:
            target = state.profile
            if incoming.previous_id != target:
                links[project, incoming.previous_id] = target
                commit.aliases[self.keys.alias(project, incoming.previous_id)] = target
        row.profile_id = state.profile
        if row.type == "identify" and row.profile_id:  # late or not: traits merge by event time
            commit.profiles.append(ProfileRow(
                project_id=project, profile_id=row.profile_id, anonymous_id=device,
                traits=flatten(incoming.traits), created_at=t, updated_at=t))

        s = state.session
        if s is not None and t - s.last > self.timeout_ms:
            self._close(key, state, commit, now)
            s = None
        if s is not None and t < s.last:
            closed = state.closed
            if t < s.start and (t < s.start - self.timeout_ms
                                or (closed is not None and t <= closed.last + self.timeout_ms)):
                # before this session: it continues the one closed before (or none)
                self._straggler(state, row, commit)
                return
            metrics.LATE_EVENTS.labels("reordered" if s.last - t <= self.lateness_ms else "beyond_window").inc()
        elif s is None:
            closed = state.closed
            if closed is not None and t <= closed.last + self.timeout_ms and t < closed.last:
                self._straggler(state, row, commit)
                return
            s = self._open(state, row, now)
        s.last = max(s.last, t)
        s.seen = now
        s.events += 1
        s.profile_id = row.profile_id or s.profile_id
        row.session_id, row.session_number, row.session_start = s.id, state.sessions, s.start
        if row.name == "screen_view":
            self._view(s, row, commit)
        else:
            self._inherit(s, row)
            commit.events.append(row)
        self._release(s, commit, project, device)  # not row's fields: a held row is stripped

    def _view(self, s: OpenSession, row: EventRow, commit: Commit) -> None:
        t = row.created_at
        s.pages += 1
        if s.pages == 1 or t < s.entry_at:
            s.entry, s.entry_at = row.path, t
        if t >= s.exit_at:
            s.exit, s.exit_at = row.path, t
        released = s.released
        if released is not None and t < released.at:
            # Its predecessor is saved already: it ends where the next known view begins.
            row.duration = released.at - t
            commit.events.append(row)
            return
        trim_properties(row, self.max_held_view_bytes)  # what a session state holds is bounded
        views = s.held()
        views.insert(bisect.bisect_right([v.created_at for v in views], t), row)
        s.hold(views)

    def _release(self, s: OpenSession, commit: Commit, project: str, device: str) -> None:
        """Save the held views whose duration is final: those whose next view is older than
        the lateness window, since no on-time view can fall between them any more."""
        if not s.earlier:
            return
        views, horizon = s.held(), s.last - self.lateness_ms
        while len(views) >= 2 and (views[1].created_at < horizon or len(views) > MAX_HELD_VIEWS):
            view = s.restore(views.pop(0), project, device)
            view.duration = views[0].created_at - view.created_at
            commit.events.append(view)
            s.released = ViewRef(view.id, view.path, view.origin, view.created_at)
        s.hold(views)

    def _inherit(self, s: OpenSession, row: EventRow) -> None:
        t = row.created_at
        source: EventRow | ViewRef | None = None
        for view in reversed(s.held()):
            if view.created_at <= t:
                source = view
                break
        if source is None and s.released is not None and s.released.at <= t:
            source = s.released
        if source is not None:
            row.path, row.origin = source.path, source.origin
            row.properties["__inherit_from"] = (
                source.id if isinstance(source, ViewRef) else event_id(row.project_id, source.message_id))

    def _remap(self, state: UserState, source: UserState) -> None:
        """The new id continues the old one: its count, its profile; the session that
        starts only because of the re-map says so."""
        state.sessions = max(state.sessions, source.sessions)
        state.profile = state.profile or source.profile
        if state.session is None:
            state.next_reason = REANONYMIZED
        elif not state.session.reason:
            state.session.reason = REANONYMIZED  # its events came before the re-map did
        metrics.REMAPS.inc()

    # --- committing ------------------------------------------------------------------

    def _commands(self, commit: Commit) -> list[Command]:
        """The commit as one transaction: plain commands, atomic by MULTI/EXEC."""
        keys, shard = self.keys, self.shard
        commands: list[Command] = [["MULTI"], ["INCR", keys.commits(shard)],
                                   *self.dedup.commands(commit.fingerprints, self._now_ms())]
        if not self.redis.cluster:
            commands += _alias_commands(commit.aliases)
        elif commit.aliases:  # written to their own slots once this commits (``_write_aliases``)
            commands.append(["HSET", keys.pending_aliases(shard), *itertools.chain(*commit.aliases.items())])
        adds: list[int | str] = []
        removes: list[str] = []
        for key, state in commit.states.items():
            commands.append(["SET", key, _encode(state), "EX", YEAR])
            if state.session is None:
                removes.append(key)
            else:
                adds += [state.session.seen, key]
        if adds:
            commands.append(["ZADD", keys.session_index(shard), *adds])
        if removes:
            commands.append(["ZREM", keys.session_index(shard), *removes])
        if commit.rows:
            block = encode_block(Block(commit.events, commit.sessions, commit.profiles, commit.bots))
            commands += [["XADD", keys.buffer(shard), "*", "n", commit.rows, "d", block],
                         ["INCRBY", keys.buffer_count(shard), commit.rows]]
        if commit.taken_in:
            commands.append(["XDEL", keys.inbox(shard), *commit.taken_in])
        commands.append(["EXEC"])
        return commands

    async def _write_pending_aliases(self) -> None:
        """What an earlier commit left pending (a crash, a failed write): before the shard's
        next unit or sweep."""
        if self.redis.cluster and not self.aliases_written:
            pending = self.keys.pending_aliases(self.shard)
            (reply,) = await self.redis.execute([["HGETALL", pending]], check=True)
            await self._write_aliases({k.decode(): v.decode() for k, v in as_dict(reply).items()})

    async def _write_aliases(self, aliases: dict[str, str]) -> None:
        """On a cluster an alias key lives in its own slot, not the shard's: the commit records
        its links in the shard's pending hash, and they are written from there once it has
        committed — never before (a unit done again would see its own link early), never lost
        (``_write_pending_aliases``)."""
        pending = self.keys.pending_aliases(self.shard)
        if aliases:
            await self.redis.execute(_alias_commands(aliases), check=True)
            await self.redis.execute([["HDEL", pending, *aliases]], check=True)
        self.aliases_written = True

    async def _commit(self, commit: Commit) -> None:
        """Commit, then keep in memory what was committed."""
        if not (commit.fingerprints or commit.aliases or commit.states or commit.rows or commit.taken_in):
            return
        fence = None if self.lease is None else (self.lease.fence_key, b"%d" % (self.token or 0))
        try:
            replies = await self.redis.execute(self._commands(commit), fence=fence)
        except FenceMoved:
            metrics.FENCED.inc()
            raise
        for reply in replies:
            if isinstance(reply, Exception):  # a refused command aborts the whole EXEC
                raise reply
        if not isinstance(replies[-1], list):
            raise RuntimeError(f"session commit: unexpected EXEC reply {replies[-1]!r:.80}")
        for reply in replies[-1]:
            if isinstance(reply, Exception):  # applied in part: never expected
                raise reply
        if self.redis.cluster and commit.aliases:
            await self._write_aliases(commit.aliases)
        count = replies[-1][0]
        if self.commits is not None and count != self.commits + 1:
            # Redis lost writes (a restart without them) or another writer: memory may be
            # ahead of Redis; this commit stands, what follows starts from Redis
            log.warning("session-%d: commit count %d after %d: reading the shard's state again",
                        self.shard, count, self.commits)
            self.forget(everything=True)
            self.commits = count
            return
        self.commits = count
        self.dedup.committed(commit.fingerprints)
        cache = self.cache
        for key, state in commit.states.items():
            cache[key] = state
            cache.move_to_end(key)
        while len(cache) > self.state_cache:
            cache.popitem(last=False)

    def forget(self, everything: bool = False) -> None:
        """Drop what memory may hold that Redis does not: after any failure of a unit (an
        error, a timeout, a lost connection, a cancellation), whether or not it committed.
        States are changed in place while a unit is applied, so they go; the dedup bucket
        the commit wrote to is read again (``everything``: the whole window)."""
        self.cache.clear()
        self.commits = None
        self.aliases_written = False
        self.dedup.failed()
        if everything:
            self.dedup.loaded = False
            self.token = None

    async def process(self, items: list[Enriched], taken_in: list[bytes] | None = None) -> Commit:
        """Dedup, sessionize and commit one unit (with ``taken_in``, the inbox entries its
        items came from, deleted by the same commit). Safe to re-run after a failure."""
        try:
            return await self._process(items, taken_in or [])
        except BaseException:
            self.forget()
            raise

    async def _process(self, items: list[Enriched], taken_in: list[bytes]) -> Commit:
        self._held()
        now = self._now_ms()
        items = sorted(items, key=_unit_order(items))
        await self.dedup.prepare(self.redis, now)
        await self._write_pending_aliases()
        prints = [fingerprint(e.row.project_id, e.row.message_id) for e in items]
        seen = self.dedup.seen(prints)
        events = [(e.row, e.incoming) for e in items if isinstance(e.row, EventRow)]
        state_keys = list(dict.fromkeys(self.state_key(row.project_id, row.device_id) for row, _ in events))
        ids: dict[Link, None] = {}
        source_keys: list[str] = []
        for row, incoming in events:
            project = row.project_id
            ids[project, row.device_id] = None
            if row.profile_id:
                ids[project, row.profile_id] = None
            if row.type == "remap":
                source_keys.append(self._foreign_state_key(project, incoming.previous_id))
        loaded = await self._load(state_keys, list(ids), source_keys)
        states, links = loaded.states, loaded.links
        commit = Commit()
        commit.taken_in = taken_in
        fresh: set[bytes] = set()
        duplicates = 0
        for item, mark, was_seen in zip(items, prints, seen, strict=True):
            if was_seen or mark in fresh:
                duplicates += 1
                continue
            fresh.add(mark)
            commit.fingerprints.append(mark)
            if isinstance(item.row, BotRow):  # kept aside: deduplicated, not sessionized
                commit.bots.append(item.row)
                continue
            row = item.row
            key = self.state_key(row.project_id, row.device_id)
            if row.type == "remap":
                source = loaded.sources[self._foreign_state_key(row.project_id, item.incoming.previous_id)]
                self._remap(states[key], source)
                commit.states[key] = states[key]
                continue
            self._apply(key, states[key], row, item.incoming, commit, now, links)
        await self._commit(commit)
        metrics.DUPLICATES.inc(duplicates)
        metrics.STAGE_EVENTS.labels("session").inc(len(commit.fingerprints))
        return commit

    async def sweep(self, close_all: bool = False) -> Commit | None:
        """Close sessions idle (wall clock) for longer than the timeout; every open one
        with ``close_all`` (a graceful stop that closes sessions)."""
        try:
            return await self._sweep(close_all)
        except BaseException:
            self.forget()
            raise

    async def _sweep(self, close_all: bool) -> Commit | None:
        self._held()
        now = self._now_ms()
        await self._write_pending_aliases()
        index = self.keys.session_index(self.shard)
        cutoff = "+inf" if close_all else now - self.timeout_ms
        expired: Any = await self.redis.run(
            lambda: self.redis.client.zrangebyscore(index, "-inf", cutoff, start=0, num=SWEEP_LIMIT))
        if not expired:
            return None
        keys = [k.decode() for k in expired]
        states = (await self._load(keys)).states
        commit = Commit()
        for key in keys:
            state = states[key]
            if state.session is not None and (close_all or state.session.seen <= now - self.timeout_ms):
                self._close(key, state, commit, now)
            elif state.session is None:
                commit.states[key] = state  # already closed: the commit drops it from the index
        await self._commit(commit)
        return commit


def _unit_order(items: list[Enriched]) -> Callable[[Enriched], tuple[int, int, int]]:
    """The order a unit is applied in: by event time, except that a re-map stays where it
    came (it carries the wall clock of the ``remap`` command, not an event time): what
    came before it is applied before it, what came after it after it, as if each re-map
    split the unit."""
    keys: dict[int, tuple[int, int, int]] = {}
    segment = 0
    for item in items:
        if isinstance(item.row, EventRow) and item.row.type == "remap":
            keys[id(item)] = (segment, 1, 0)
            segment += 1
        else:
            keys[id(item)] = (segment, 0, item.row.created_at)
    return lambda item: keys[id(item)]


async def session_actor(shard: SessionShard, to_shard: trio.MemoryReceiveChannel[ShardBatch],
                        receipts: trio.MemorySendChannel[list[Receipt]],
                        notices: trio.MemorySendChannel[Notice], sweep_every: float,
                        replayed: trio.Event, max_events: int = 2000,
                        close_on_shutdown: bool = False, leases: ShardLeases | None = None,
                        inbox: Inbox | None = None,
                        answers_committed: Callable[[bool], bool] = lambda _others: False) -> None:
    """Run one shard for as long as ``to_shard`` brings batches. While this instance holds
    the shard's lease: commit its batches and what its inbox holds (``_hold``). While it does
    not: leave its batches in the shard's inbox for the owner, wherever it runs, and try to
    take the shard now and then (``_stand_by``). Without ``leases`` the shard is this actor's
    alone (benchmarks, tests)."""
    if leases is None or inbox is None:
        await _hold(shard, to_shard, receipts, notices, sweep_every, replayed, max_events, close_on_shutdown)
        return
    lease = shard.lease
    assert lease is not None, "a shard run under leases commits under its own"
    while True:
        if not lease.held and not await leases.try_acquire(shard.shard):
            if not await _stand_by(shard.shard, to_shard, receipts, inbox, max_events, leases.renew_every):
                return
            continue
        if await _hold(shard, to_shard, receipts, notices, sweep_every, replayed, max_events,
                       close_on_shutdown, inbox, leases, answers_committed):
            return
        shard.forget(everything=True)  # lost: another owner writes it now


async def _stand_by(shard: int, to_shard: trio.MemoryReceiveChannel[ShardBatch],
                    receipts: trio.MemorySendChannel[list[Receipt]], inbox: Inbox, max_events: int,
                    seconds: float) -> bool:
    """For ``seconds``, forward what arrives for a shard held elsewhere to its inbox; False
    once ``to_shard`` ended."""
    deadline = trio.current_time() + seconds
    while True:
        batch: ShardBatch | None = None
        with trio.move_on_after(max(0.0, deadline - trio.current_time())):  # never around a forward
            try:
                batch = await to_shard.receive()
            except trio.EndOfChannel:
                return False
        if batch is None:
            return True
        await _forward(inbox, shard, take_queued(to_shard, batch, limit=max_events,
                                                 size=lambda b: len(b.events)), receipts)


async def _forward(inbox: Inbox, shard: int, batches: list[ShardBatch],
                   receipts: trio.MemorySendChannel[list[Receipt]]) -> None:
    """Leave ``batches`` in the shard's inbox; their part of each receipt is then done."""
    await retrying(f"session-{shard} forward", inbox.forward, shard, batches)
    metrics.FORWARDED.inc(sum(len(b.events) for b in batches))
    finished = count_down([r for b in batches for r in b.receipts])
    if finished:
        await receipts.send(finished)


async def _hold(shard: SessionShard, to_shard: trio.MemoryReceiveChannel[ShardBatch],
                receipts: trio.MemorySendChannel[list[Receipt]],
                notices: trio.MemorySendChannel[Notice], sweep_every: float,
                replayed: trio.Event, max_events: int, close_on_shutdown: bool,
                inbox: Inbox | None = None, leases: ShardLeases | None = None,
                answers_committed: Callable[[bool], bool] = lambda _others: False) -> bool:
    """Receive shard batches (coalescing what is queued, up to ``max_events``) and the
    shard's inbox, commit them, report receipts; True once ``to_shard`` ended, False when
    the lease was lost (the batches in hand are forwarded to the inbox, for the new owner).
    While other instances are live and answers wait for commits (``pipeline.answer``), the
    inbox is read again for every unit, after its batches arrived: whatever another instance
    answered before these batches' requests were sent is then applied with them, in event
    order. Sweeps wait for the start-up replay: events a previous run accepted may continue
    sessions that look idle by the wall clock. When the to_shard ends (a graceful stop) and
    ``close_on_shutdown`` is set, every open session of the shard is closed first."""
    next_sweep = trio.current_time() + sweep_every
    next_poll = trio.current_time()
    after = b"-"  # the last inbox entry read
    carried: list[ShardBatch] = []  # batches waiting for the inbox up to ``horizon`` to go first
    horizon: tuple[int, int] | None = None  # the newest inbox entry when they came
    while True:
        if not carried and leases is not None and leases.hand_off(shard.shard):  # between two units
            log.info("session-%d: handed to %s (preferred for it)", shard.shard, leases.preferred(shard.shard))
            await leases.release(shard.shard)
            return False
        batch: ShardBatch | None = None
        sweep_at = next_sweep if replayed.is_set() else math.inf  # no sweep before the replay is done
        wake = min(sweep_at, next_poll) if inbox is not None else sweep_at
        if not carried:
            with trio.move_on_after(max(0.0, wake - trio.current_time())):
                try:
                    batch = await to_shard.receive()
                except trio.EndOfChannel:
                    if close_on_shutdown:
                        with contextlib.suppress(LeaseLost):
                            await _sweep_all(shard, leases, close_all=True)
                    return True
        batches = carried or ([] if batch is None else take_queued(to_shard, batch, limit=max_events,
                                                                   size=lambda b: len(b.events)))
        was_carried, carried = bool(carried), []
        try:
            if trio.current_time() >= sweep_at:
                await _sweep_all(shard, leases)
                next_sweep = trio.current_time() + sweep_every
            taken_in: list[tuple[bytes, list[Enriched]]] = []
            in_order = was_carried or _in_order(leases, answers_committed)
            if inbox is not None and (trio.current_time() >= next_poll or (batches and in_order)):
                taken_in = await retrying(f"session-{shard.shard} inbox", inbox.read, shard.shard, after)
                alone = leases is None or not leases.others.live
                next_poll = trio.current_time() + (INBOX_POLL_ALONE_SECONDS if alone else INBOX_POLL_SECONDS)
                if batches and in_order and len(taken_in) == READ_UNITS:
                    # more waits: what was there when these batches came (answered before them,
                    # maybe) goes first, in pages; what came after may go with them
                    if horizon is None:
                        horizon = await retrying(f"session-{shard.shard} inbox", inbox.newest, shard.shard)
                    if horizon is not None and stream_id(taken_in[-1][0]) < horizon:
                        carried, batches = batches, []
                if not carried:
                    horizon = None
            if not batches and not taken_in:
                continue
            items = [e for b in batches for e in b.events] + [e for _id, unit in taken_in for e in unit]
            commit = await _fenced(leases, f"session-{shard.shard} commit", shard.process, items,
                                   [entry_id for entry_id, _unit in taken_in])
        except LeaseLost as e:
            log.warning("session-%d: %s; its batches go to its inbox, for the new owner", shard.shard, e)
            if inbox is not None and (batches or carried):
                await _forward(inbox, shard.shard, batches + carried, receipts)
            return False
        if taken_in:
            after = taken_in[-1][0]
        finished = count_down([r for b in batches for r in b.receipts])
        if finished:
            await receipts.send(finished)
        # Held screen views are not saved yet, but they make their visitor live: announced
        # once, as they arrive (a view held over several units is not announced again).
        arrived = {e.row.message_id for e in items if e.row.name == "screen_view"}
        held = [st.session.restore(msgspec.structs.replace(v), *_ids(key))
                for key, st in commit.states.items() if st.session is not None
                for v in st.session.held() if v.message_id in arrived] if arrived else []
        if commit.events or held:
            try:
                notices.send_nowait(Notice("event:received", commit.events, held=held))
            except trio.WouldBlock:
                metrics.PUBLISH_DROPPED.inc()


def _in_order(leases: ShardLeases | None, answers_committed: Callable[[bool], bool]) -> bool:
    """Answers wait for commits (``pipeline.answer``): a unit then reads the inbox before it
    commits, so that what was answered before its requests came is applied with it."""
    return leases is not None and answers_committed(leases.others.live)


def _ids(state_key: str) -> tuple[str, str]:
    """(project, device) of a user-state key."""
    project, device = state_key.split(":u:", 1)[1].split(":", 1)
    return project, device


async def _fenced(leases: ShardLeases | None, what: str, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``fn`` retried through Redis faults; a commit its shard's fence refused makes the
    keeper look at the lease at once: the next try reads the state again under a new token,
    or raises ``LeaseLost`` if another owner took the shard."""
    while True:
        try:
            return await retrying(what, fn, *args)
        except FenceMoved:
            if leases is None:
                raise
            await leases.renew()


async def _sweep_all(shard: SessionShard, leases: ShardLeases | None, close_all: bool = False) -> None:
    """Sweep until done: a full sweep may have left more behind it."""
    while True:
        commit = await _fenced(leases, f"session-{shard.shard} sweep", shard.sweep, close_all)
        if commit is None or (not close_all and len(commit.states) < SWEEP_LIMIT):
            return


def start_shard_actors(nursery: trio.Nursery, supervise: Callable[..., Awaitable[None]],
                       pipe: PipelineConfig, redis: RedisIO, keys: Keys,
                       inboxes: Mapping[int, trio.MemoryReceiveChannel[ShardBatch]],
                       receipts: trio.MemorySendChannel[list[Receipt]],
                       notices: trio.MemorySendChannel[Notice], replayed: trio.Event,
                       leases: ShardLeases) -> None:
    """One supervised ``session-N`` actor per shard of ``inboxes``, in the service or in a
    session worker alike: each restarts on its own, so a shard's crash costs that shard's
    batch in hand. Each gets its own clones of ``receipts`` and ``notices``, closed when it
    ends, and commits under its shard's lease (``leases``)."""
    actor = functools.partial(session_actor, close_on_shutdown=pipe.close_sessions_on_shutdown,
                              max_events=pipe.unit_events, leases=leases, inbox=Inbox(redis, keys),
                              answers_committed=pipe.answers_committed)
    for index, to_shard in inboxes.items():
        shard = SessionShard(index, redis, keys, pipe.session_timeout_seconds, pipe.dedup_window_seconds,
                             lateness_s=pipe.lateness_seconds, shards=pipe.session_shards,
                             max_held_view_bytes=pipe.max_held_view_bytes,
                             dedup_bucket_s=pipe.dedup_bucket_seconds, state_cache=pipe.session_state_cache,
                             lease=leases.leases[index])
        r, n = receipts.clone(), notices.clone()
        nursery.start_soon(functools.partial(
            supervise, f"session-{index}", actor, shard, to_shard, r, n, pipe.session_sweep_seconds,
            replayed, closes=(r, n)))
