"""The test oracle: what docs/sessions.md says the service must derive from some traffic.

Plain Python over the messages as sent, written independently of the service (it imports
nothing of it). Feed it the accepted traffic in arrival order — :class:`~evactors.harness.traffic.Request`
(the messages the service stored: all but the ``bad`` ones) and
:class:`~evactors.harness.traffic.Remap` steps — then ask for :meth:`Oracle.expected`, which closes
every session (as the service does at shutdown with ``pipeline.close_sessions_on_shutdown``).
:func:`compare` lists the differences between that and the rows read from ClickHouse.

Arrival order matters only where the contract says so: the profile known for a device, the
lateness window, and which screen views an event could inherit from (rows are never
rewritten). The messages of one request are one unit of work (applied in time order). The
service may join requests that wait together into one unit; that changes nothing the oracle
checks exactly, except where stragglers land: send a request with ``barrier`` set only once
the service has processed all before it. Stragglers beyond the window get weaker checks.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from itertools import pairwise
from typing import Any
from urllib.parse import parse_qs, urlsplit

from evactors.harness.traffic import BAD, Remap, Request

VIEW_TYPES = ("page", "screen")


REANONYMIZED = "re-anonymized"


UTM = ("utm_source", "utm_medium", "utm_campaign", "utm_term", "utm_content")


_CAMPAIGN_KEYS = ("source", "medium", "name", "term", "content")


# ClickHouse reads that compare() understands ({project} is the project id).
SQL_EVENTS = ("SELECT toString(id) AS id, name, type, device_id, profile_id, session_id, message_id, "
              "toUnixTimestamp64Milli(created_at) AS created_at_ms, "
              "toUnixTimestamp64Milli(session_start) AS session_start_ms, session_number, is_new_session, "
              "duration, path, origin, referrer, utm_source, utm_medium, utm_campaign, utm_term, utm_content, "
              "country, city, browser, os, device, properties "
              "FROM evactors.events WHERE project_id = '{project}'")


SQL_SESSIONS = ("SELECT session_id, device_id, profile_id, toUnixTimestamp64Milli(session_start) AS session_start_ms, "
                "toUnixTimestamp64Milli(session_end) AS session_end_ms, duration_seconds, page_count, event_count, "
                "session_number, entry_page, exit_page, referrer, utm_source, utm_medium, utm_campaign, utm_term, "
                "utm_content, country, city, browser, os, device, reason "
                "FROM evactors.sessions FINAL WHERE project_id = '{project}'")


SQL_PROFILES = "SELECT profile_id, traits FROM evactors.profiles_merged WHERE project_id = '{project}'"


SQL_DAILY_EVENTS = ("SELECT toString(day) AS day, name, sum(events) AS events FROM evactors.daily_events "
                    "WHERE project_id = '{project}' GROUP BY day, name")


SQL_DAILY_PAGE_VIEWS = ("SELECT toString(day) AS day, path, sum(views) AS views FROM evactors.daily_page_views "
                        "WHERE project_id = '{project}' GROUP BY day, path")


SQL_DAU = ("SELECT toString(day) AS day, uniqExactMerge(users) AS users FROM evactors.daily_active_users "
           "WHERE project_id = '{project}' GROUP BY day")


SQL_BOTS = "SELECT message_id FROM evactors.events_bots WHERE project_id = '{project}'"


@dataclass
class ExpectedEvent:
    message_id: str
    type: str
    name: str
    device: str
    profile: str
    created_at: int  # ms
    session: tuple[str, int] | None = None  # (device, session_start); None: no session can be told
    session_number: int = 0
    is_new_session: int = 0
    duration: int = 0  # screen views
    duration_from: str | None = None  # 'session_end' for the last view of a session
    path: str = ""
    origin: str = ""
    inherit_from: str | None = None  # message id of the view it inherits from
    utm: tuple[str, ...] = ("", "", "", "", "")
    referrer: str = ""
    exact: bool = True  # False for stragglers beyond the window: only weaker checks
    durations_exact: bool = True  # False in a session a straggler view made approximate
    arrival: int = 0  # index of the request it came in
    view_name: str | None = None  # properties.name of a screen view (the call's name)
    # a straggler of a closed session: the session whose id its row carries (("", 0): none)
    closed_session: tuple[str, int] | None = None


@dataclass
class ExpectedSession:
    device: str
    start: int
    end: int = 0
    session_number: int = 0
    profile: str = ""
    reason: str = ""
    page_count: int = 0
    event_count: int = 0
    entry_page: str = ""
    exit_page: str = ""
    referrer: str = ""
    utm: tuple[str, ...] = ("", "", "", "", "")
    first_message_id: str = ""
    message_ids: list[str] = field(default_factory=list)
    exact: bool = True  # False when a straggler view made its durations/pages approximate

    @property
    def key(self) -> tuple[str, int]:
        return (self.device, self.start)

    @property
    def duration_ms(self) -> int:
        return self.end - self.start

    @property
    def duration_seconds(self) -> int:
        return (self.end - self.start) // 1000


@dataclass
class Expected:
    events: dict[str, ExpectedEvent]  # by message id
    sessions: dict[tuple[str, int], ExpectedSession]  # by (device, start)
    profiles: dict[str, dict[str, str]]  # merged traits (flattened) by profile id
    daily_events: dict[tuple[str, str], int]  # (day, name) -> events, session_end included
    daily_page_views: dict[tuple[str, str], int]  # (day, path) -> screen views
    daily_active_users: dict[str, int]  # day -> distinct profile (else device)
    bots: set[str]  # message ids of bot events
    devices: set[str]
    # late arrivals by outcome (reordered, beyond_window, closed_session), counted per request:
    # an upper bound for the service, whose unit of work may join several requests
    late: dict[str, int]

    def summary(self) -> str:
        stragglers = sum(not e.exact for e in self.events.values())
        return (f"{len(self.events)} events, {len(self.sessions)} sessions, {len(self.profiles)} profiles, "
                f"{len(self.bots)} bot events, {len(self.devices)} devices, {stragglers} stragglers")


def parse_time(value: Any) -> int:
    """Milliseconds since the epoch of an ISO 8601 timestamp (no zone: UTC)."""
    if isinstance(value, (int, float)):
        return int(value)
    text = str(value).strip().replace("Z", "+00:00")
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return round(dt.timestamp() * 1000)


def day_of(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).date().isoformat()


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """Nested traits as the service stores them: keys joined with '.', values as text."""
    out: dict[str, str] = {}
    if isinstance(value, Mapping):
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}.{i}" if prefix else str(i)))
    elif isinstance(value, bool):
        out[prefix] = "true" if value else "false"
    elif value is None:
        out[prefix] = ""
    else:
        out[prefix] = str(value)
    return out


def _page(msg: Mapping[str, Any]) -> Mapping[str, Any]:
    context = msg.get("context") or {}
    page = context.get("page") if isinstance(context, Mapping) else None
    props = msg.get("properties") if msg.get("type") in VIEW_TYPES else None
    merged: dict[str, Any] = {}
    if isinstance(props, Mapping):
        merged.update({k: props[k] for k in ("path", "url", "referrer") if k in props})
    if isinstance(page, Mapping):
        merged.update({k: page[k] for k in ("path", "url", "referrer") if k in page})
    return merged


def page_fields(msg: Mapping[str, Any]) -> tuple[str, str, str, tuple[str, ...]]:
    """(path, origin, referrer, utm) of a message's own page and campaign."""
    page = _page(msg)
    url = str(page.get("url") or "")
    parts = urlsplit(url) if url else None
    path = str(page.get("path") or (parts.path if parts else "") or "")
    origin = f"{parts.scheme}://{parts.netloc}" if parts and parts.scheme and parts.netloc else ""
    query = parse_qs(parts.query) if parts else {}
    campaign = (msg.get("context") or {}).get("campaign") or {}
    utm = tuple(str(campaign.get(ck) or (query.get(u) or [""])[0]) for u, ck in zip(UTM, _CAMPAIGN_KEYS, strict=True))
    return path, origin, str(page.get("referrer") or ""), utm


def event_name(msg: Mapping[str, Any]) -> str:
    kind = msg.get("type", "")
    if kind in VIEW_TYPES:
        return "screen_view"
    if kind == "track":
        return str(msg.get("event"))
    return str(kind)


def _text(value: Any) -> str:
    return "" if value is None else str(value)


@dataclass
class _Open:
    """A device's open session while traffic is fed."""

    session: ExpectedSession
    last: int  # latest event time
    events: list[ExpectedEvent] = field(default_factory=list)
    last_arrived_profile: str = ""


@dataclass
class _Device:
    count: int = 0  # sessions so far (a re-map carries it over)
    known: str = ""  # raw profile last known (resolved at use)
    open: _Open | None = None
    reanonymized: bool = False  # the next session starts because of a re-map
    last_closed: ExpectedSession | None = None


class Oracle:
    """Feed accepted traffic of one project in arrival order; ask for the expected outcome."""

    def __init__(self, timeout_ms: int = 30 * 60 * 1000, lateness_ms: int = 60_000) -> None:
        self.timeout = timeout_ms
        self.lateness = lateness_ms
        self.aliases: dict[str, str] = {}
        self.devices: dict[str, _Device] = {}
        self.seen: set[str] = set()
        self.events: dict[str, ExpectedEvent] = {}
        self.sessions: dict[tuple[str, int], ExpectedSession] = {}
        self.traits: dict[str, dict[str, tuple[int, str]]] = {}
        self.bots: set[str] = set()
        self.requests = 0
        self.late: Counter[str] = Counter()

    # -- identity --------------------------------------------------------------------------

    def resolve(self, user: str) -> str:
        hops = 0
        while user in self.aliases and hops < 100:  # a cycle would stop here
            user = self.aliases[user]
            hops += 1
        return user

    def device(self, name: str) -> _Device:
        dev = self.devices.get(name)
        if dev is None:
            dev = self.devices[name] = _Device()
        return dev

    # -- feeding ---------------------------------------------------------------------------

    def feed(self, item: Request | Remap) -> None:
        if isinstance(item, Remap):
            for old, new in item.pairs:
                self.remap(old, new)
            return
        self.requests += 1
        arrived: list[tuple[int, Mapping[str, Any]]] = []
        for msg, kind in zip(item.messages, item.kinds, strict=True):
            if kind == BAD:
                continue
            mid = _text(msg.get("messageId"))
            if mid in self.seen:
                continue  # a duplicate: deduplicated by messageId
            self.seen.add(mid)
            if kind == "bot":
                self.bots.add(mid)
                continue
            arrived.append((parse_time(msg["timestamp"]), msg))
        # one request is one unit of work: applied in event-time order
        arrived.sort(key=lambda a: a[0])
        for t, message in arrived:
            self.event(message, t)

    def feed_all(self, items: Iterable[Request | Remap]) -> Oracle:
        for item in items:
            self.feed(item)
        return self

    def remap(self, old: str, new: str) -> None:
        src = self.device(old)
        dst = self.device(new)
        dst.count = max(dst.count, src.count)
        dst.known = src.known or dst.known
        dst.reanonymized = True

    def event(self, msg: Mapping[str, Any], t: int) -> None:
        kind = str(msg.get("type"))
        mid = _text(msg.get("messageId"))
        device_id = _text(msg.get("anonymousId")) or _text(msg.get("userId"))
        dev = self.device(device_id)
        user = _text(msg.get("userId"))
        if kind == "alias":
            self.aliases[_text(msg.get("previousId"))] = user
        if user:
            dev.known = user
        if dev.known:
            profile = self.resolve(dev.known)
        else:
            profile = self.resolve(device_id) if device_id in self.aliases else ""
        path, origin, referrer, utm = page_fields(msg)
        ev = ExpectedEvent(message_id=mid, type=kind, name=event_name(msg), device=device_id, profile=profile,
                           created_at=t, path=path, origin=origin, utm=utm, referrer=referrer,
                           arrival=self.requests)
        if kind in VIEW_TYPES:
            ev.view_name = _text(msg.get("name")) if msg.get("name") is not None else None
        self.events[mid] = ev
        if kind == "identify" and user:
            merged = self.traits.setdefault(profile, {})
            for key, value in flatten(msg.get("traits") or {}).items():
                if key not in merged or (t, value) > merged[key]:  # the latest wins (a tie: the greater)
                    merged[key] = (t, value)
        self.sessionize(dev, ev)

    def sessionize(self, dev: _Device, ev: ExpectedEvent) -> None:
        t, T = ev.created_at, self.timeout
        cur = dev.open
        if cur is not None and t > cur.last + T:
            self.close(dev)
            cur = None
        closed = dev.last_closed
        if cur is not None and t < cur.session.start and closed is not None and t <= closed.end + T:
            # a straggler of a closed session (by time it continues an earlier one): it carries the
            # id of the last one closed when it belongs there, else no session; no row changes
            ev.exact, ev.session = False, None
            ev.closed_session = closed.key if t >= closed.start - T else ("", 0)
            self.late["closed_session"] += 1
            return
        if cur is None:
            dev.count += 1
            session = ExpectedSession(device=ev.device, start=t, session_number=dev.count,
                                      reason=REANONYMIZED if dev.reanonymized else "",
                                      referrer=ev.referrer, utm=ev.utm, first_message_id=ev.message_id)
            dev.reanonymized = False
            cur = dev.open = _Open(session, t)
            ev.is_new_session = 1
        elif t < cur.last:  # arrived after a later event of its session (not in its own request)
            beyond = t < cur.last - self.lateness
            self.late["beyond_window" if beyond else "reordered"] += 1
            if beyond or t < cur.session.start:
                ev.exact = False  # it joins the session, approximately (its start does not move)
                if ev.type in VIEW_TYPES:
                    cur.session.exact = False
        ev.session = cur.session.key
        ev.session_number = cur.session.session_number
        cur.last = max(cur.last, t)
        cur.events.append(ev)
        cur.last_arrived_profile = ev.profile

    def close(self, dev: _Device) -> None:
        cur = dev.open
        assert cur is not None
        dev.open = None
        s = cur.session
        s.end = cur.last
        s.profile = cur.last_arrived_profile
        s.message_ids = [e.message_id for e in cur.events]
        s.event_count = len(cur.events)
        by_time = sorted(cur.events, key=lambda e: (e.created_at, e.arrival))
        views = [e for e in by_time if e.type in VIEW_TYPES]
        s.page_count = len(views)
        if views:
            s.entry_page, s.exit_page = views[0].path, views[-1].path
        for view, after in pairwise(views):
            view.duration = after.created_at - view.created_at
        if views:
            views[-1].duration = s.end - views[-1].created_at
            views[-1].duration_from = "session_end"
        if not s.exact:
            for e in cur.events:
                e.durations_exact = False
        view_times = [v.created_at for v in views]
        for e in by_time:
            if e.type in VIEW_TYPES:
                continue
            # the latest view at or before it that had arrived by then (rows are never rewritten)
            i = bisect.bisect_right(view_times, e.created_at) - 1
            while i >= 0 and views[i].arrival > e.arrival:
                i -= 1
            if i >= 0:
                view = views[i]
                e.path, e.origin, e.inherit_from = view.path, view.origin, view.message_id
        dev.last_closed = s
        self.sessions[s.key] = s

    # -- the outcome -----------------------------------------------------------------------

    def expected(self) -> Expected:
        """Close every open session (as at shutdown) and derive all rows and aggregates."""
        for dev in self.devices.values():
            if dev.open is not None:
                self.close(dev)
        daily_events: Counter[tuple[str, str]] = Counter()
        page_views: Counter[tuple[str, str]] = Counter()
        users: dict[str, set[str]] = {}
        for e in self.events.values():
            day = day_of(e.created_at)
            daily_events[(day, e.name)] += 1
            if e.name == "screen_view":
                page_views[(day, e.path)] += 1
            users.setdefault(day, set()).add(e.profile or e.device)
        for s in self.sessions.values():
            daily_events[(day_of(s.end), "session_end")] += 1
        return Expected(
            events=dict(self.events), sessions=dict(self.sessions),
            profiles={p: {k: v for k, (_t, v) in traits.items()} for p, traits in self.traits.items()},
            daily_events=dict(daily_events), daily_page_views=dict(page_views),
            daily_active_users={d: len(u) for d, u in users.items()}, bots=set(self.bots),
            devices=set(self.devices), late=dict(self.late))


def expect(items: Iterable[Request | Remap], timeout_ms: int = 30 * 60 * 1000,
           lateness_ms: int = 60_000) -> Expected:
    """The expected outcome of accepted traffic (all of it one project), sessions closed."""
    return Oracle(timeout_ms, lateness_ms).feed_all(items).expected()


def _ms(row: Mapping[str, Any], name: str) -> int:
    value = row.get(f"{name}_ms", row.get(name))
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return round(value.timestamp() * 1000)
    if isinstance(value, str) and not value.lstrip("-").isdigit():
        return parse_time(value.replace(" ", "T"))
    return int(value)  # type: ignore[arg-type]


def _day(value: Any) -> str:
    if isinstance(value, datetime):
        return value.date().isoformat()
    if isinstance(value, date):
        return value.isoformat()
    return str(value)[:10]


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


class _Diffs:
    def __init__(self, limit: int) -> None:
        self.items: list[str] = []
        self.limit = limit
        self.dropped = 0

    def add(self, text: str) -> None:
        if len(self.items) < self.limit:
            self.items.append(text)
        else:
            self.dropped += 1

    def done(self) -> list[str]:
        return self.items + ([f"... and {self.dropped} more differences"] if self.dropped else [])


def compare(expected: Expected, events_rows: Sequence[Mapping[str, Any]],
            sessions_rows: Sequence[Mapping[str, Any]], *,
            profiles_rows: Sequence[Mapping[str, Any]] | None = None,
            daily_events_rows: Sequence[Mapping[str, Any]] | None = None,
            daily_page_views_rows: Sequence[Mapping[str, Any]] | None = None,
            dau_rows: Sequence[Mapping[str, Any]] | None = None,
            bot_rows: Sequence[Mapping[str, Any]] | None = None,
            only_known_devices: bool = False, max_diffs: int = 200) -> list[str]:
    """Human-readable differences between the oracle and ClickHouse rows (read with the
    ``SQL_*`` queries above); an empty list means they match. ``only_known_devices`` ignores
    rows of devices the oracle never saw (other traffic in the same project); the aggregates
    are then not comparable and should be left out."""
    d = _Diffs(max_diffs)
    if only_known_devices:
        events_rows = [r for r in events_rows if r["device_id"] in expected.devices]
        sessions_rows = [r for r in sessions_rows if r["device_id"] in expected.devices]
    ends = [r for r in events_rows if r["name"] == "session_end"]
    rows = [r for r in events_rows if r["name"] != "session_end"]

    # every event exactly once, no other
    by_mid: dict[str, Mapping[str, Any]] = {}
    for r in rows:
        mid = r["message_id"]
        if mid in by_mid:
            d.add(f"event {mid}: stored twice")
        by_mid[mid] = r
    for mid in sorted(set(by_mid) - set(expected.events)):
        d.add(f"event {mid} ({by_mid[mid]['name']}, device {by_mid[mid]['device_id']}): not expected"
              + (" (a bot)" if mid in expected.bots else ""))
    for mid in sorted(set(expected.events) - set(by_mid)):
        e = expected.events[mid]
        d.add(f"event {mid} ({e.name} of {e.device} at {_iso(e.created_at)}): missing")
    id_to_mid = {str(r["id"]): r["message_id"] for r in rows if "id" in r}

    # sessions: the rows of one expected session share one id, which names its sessions row
    session_ids: dict[tuple[str, int], set[str]] = {}
    for mid, e in expected.events.items():
        if mid not in by_mid:
            continue
        r = by_mid[mid]
        where = f"event {mid} ({e.name} of {e.device} at {_iso(e.created_at)})"

        def check(what: str, got: Any, want: Any, where: str = where) -> None:
            if got != want:
                d.add(f"{where}: {what} = {got!r}, expected {want!r}")

        check("name", r["name"], e.name)
        check("type", r.get("type", e.type), e.type)
        check("device_id", r["device_id"], e.device)
        check("profile_id", r["profile_id"], e.profile)
        check("created_at", _ms(r, "created_at"), e.created_at)
        props = r.get("properties") or {}
        if e.session is not None:
            session_ids.setdefault(e.session, set()).add(r["session_id"])
            check("session_start", _iso(_ms(r, "session_start")), _iso(e.session[1]))
            check("session_number", int(r["session_number"]), e.session_number)
            check("is_new_session", int(r["is_new_session"]), e.is_new_session)
        if e.type in VIEW_TYPES:
            check("path", r["path"], e.path)
            check("origin", r["origin"], e.origin)
            check("properties.name", props.get("name"), e.view_name)
            if e.durations_exact:
                check("duration", int(r["duration"]), e.duration)
                check("properties.__duration_from", props.get("__duration_from"), e.duration_from)
        elif e.exact and e.durations_exact:
            check("path", r["path"], e.path)
            check("origin", r["origin"], e.origin)
            inherit = props.get("__inherit_from")
            got = id_to_mid.get(str(inherit), f"<row {inherit}>") if inherit else None
            check("__inherit_from (as message id)", got, e.inherit_from)
        for col, want in zip(UTM, e.utm, strict=True):
            if col in r:
                check(col, r[col], want)

    for mid, e in expected.events.items():
        if mid not in by_mid or e.closed_session is None:
            continue
        r = by_mid[mid]
        ids = session_ids.get(e.closed_session, set()) if e.closed_session[0] else {""}
        if len(ids) == 1 and r["session_id"] not in ids:
            want = f"that of its closed session from {_iso(e.closed_session[1])}" if e.closed_session[0] else "none"
            d.add(f"event {mid} ({e.name} of {e.device} at {_iso(e.created_at)}, a straggler of a closed session): "
                  f"session_id = {r['session_id']!r}, expected {want}")

    sessions_by_id: dict[str, Mapping[str, Any]] = {}
    for r in sessions_rows:
        if r["session_id"] in sessions_by_id:
            d.add(f"sessions row {r['session_id']}: twice (even with FINAL)")
        sessions_by_id[r["session_id"]] = r
    ends_by_sid: dict[str, list[Mapping[str, Any]]] = {}
    for r in ends:
        ends_by_sid.setdefault(r["session_id"], []).append(r)
    matched: set[str] = set()
    for key, s in sorted(expected.sessions.items()):
        where = f"session of {s.device} from {_iso(s.start)} (#{s.session_number})"
        ids = session_ids.get(key, set())
        if len(ids) != 1:
            if ids or any(m in by_mid for m in s.message_ids):
                d.add(f"{where}: its events carry {len(ids)} session ids {sorted(ids)[:4]}")
            else:
                d.add(f"{where}: none of its events stored")
            continue
        sid = next(iter(ids))
        if sid in matched:
            d.add(f"{where}: session id {sid} shared with another session")
        matched.add(sid)
        row = sessions_by_id.get(sid)

        def check_s(what: str, got: Any, want: Any, where: str = where) -> None:
            if got != want:
                d.add(f"{where}: {what} = {got!r}, expected {want!r}")

        if row is None:
            d.add(f"{where}: no sessions row {sid}")
        else:
            check_s("device_id", row["device_id"], s.device)
            check_s("profile_id", row["profile_id"], s.profile)
            check_s("session_start", _iso(_ms(row, "session_start")), _iso(s.start))
            check_s("session_end", _iso(_ms(row, "session_end")), _iso(s.end))
            check_s("duration_seconds", int(row["duration_seconds"]), s.duration_seconds)
            check_s("page_count", int(row["page_count"]), s.page_count)
            check_s("event_count", int(row["event_count"]), s.event_count)
            check_s("session_number", int(row["session_number"]), s.session_number)
            check_s("reason", row["reason"], s.reason)
            check_s("referrer", row["referrer"], s.referrer)
            for col, want in zip(UTM, s.utm, strict=True):
                check_s(col, row[col], want)
            if s.exact:
                check_s("entry_page", row["entry_page"], s.entry_page)
                check_s("exit_page", row["exit_page"], s.exit_page)
            first = by_mid.get(s.first_message_id)
            if first is not None:  # device, geo and UA fields of its first event
                for col in ("country", "city", "browser", "os", "device"):
                    if col in row and col in first:
                        check_s(f"{col} (as its first event's)", row[col], first[col])
        got_ends = ends_by_sid.pop(sid, [])
        if len(got_ends) != 1:
            d.add(f"{where}: {len(got_ends)} session_end events")
            continue
        end = got_ends[0]
        props = end.get("properties") or {}
        check_s("session_end.created_at", _iso(_ms(end, "created_at")), _iso(s.end))
        check_s("session_end.device_id", end["device_id"], s.device)
        check_s("session_end.profile_id", end["profile_id"], s.profile)
        check_s("session_end.duration", int(end["duration"]), s.duration_ms)
        check_s("session_end.session_number", int(end["session_number"]), s.session_number)
        check_s("session_end.is_new_session", int(end["is_new_session"]), 0)
        check_s("session_end.session_start", _iso(_ms(end, "session_start")), _iso(s.start))
        check_s("session_end.properties.reason", props.get("reason", ""), s.reason)
        if s.exact:
            check_s("session_end.path", end["path"], s.exit_page)
    for sid, extra in ends_by_sid.items():
        d.add(f"session_end for unexpected session {sid} (device {extra[0]['device_id']}): {len(extra)}")
    for sid in sorted(set(sessions_by_id) - matched):
        r = sessions_by_id[sid]
        d.add(f"sessions row {sid} (device {r['device_id']}, start {_iso(_ms(r, 'session_start'))}): not expected")

    if profiles_rows is not None:
        got_profiles: dict[str, dict[str, str]] = {}
        for r in profiles_rows:
            if r["profile_id"] in got_profiles:
                d.add(f"profile {r['profile_id']}: twice (even with FINAL)")
            got_profiles[r["profile_id"]] = dict(r.get("traits") or {})
        if only_known_devices:
            got_profiles = {p: t for p, t in got_profiles.items() if p in expected.profiles}
        for p in sorted(set(got_profiles) | set(expected.profiles)):
            # a profile known only from an alias (no identify) may be there with no traits
            got_traits, want_traits = got_profiles.get(p) or None, expected.profiles.get(p) or None
            if got_traits != want_traits:
                d.add(f"profile {p}: traits {got_traits!r}, expected {want_traits!r}")

    def counts(name: str, rows_: Sequence[Mapping[str, Any]] | None, keys: tuple[str, ...], value: str,
               want: Mapping[Any, int]) -> None:
        if rows_ is None:
            return
        got: dict[Any, int] = {}
        for r in rows_:
            k = tuple(_day(r[c]) if c == "day" else r[c] for c in keys)
            k1 = k[0] if len(k) == 1 else k
            got[k1] = got.get(k1, 0) + int(r[value])
        got = {k: v for k, v in got.items() if v}
        for k in sorted(set(got) | set(want), key=str):
            if got.get(k, 0) != want.get(k, 0):
                d.add(f"{name} {k}: {got.get(k, 0)}, expected {want.get(k, 0)}")

    counts("daily_events", daily_events_rows, ("day", "name"), "events", expected.daily_events)
    counts("daily_page_views", daily_page_views_rows, ("day", "path"), "views", expected.daily_page_views)
    counts("daily_active_users", dau_rows, ("day",), "users", expected.daily_active_users)

    if bot_rows is not None:
        got_bots = Counter(r["message_id"] for r in bot_rows)
        if only_known_devices:
            got_bots = Counter({m: n for m, n in got_bots.items() if m in expected.bots})
        for mid in sorted(expected.bots - set(got_bots)):
            d.add(f"bot event {mid}: not in events_bots")
        for mid, n in sorted(got_bots.items()):
            if mid not in expected.bots:
                d.add(f"events_bots {mid}: not a bot event sent")
            elif n > 1:
                d.add(f"events_bots {mid}: {n} rows")
    return d.done()
