"""A load run's model: its options and phases, the traffic generated before it (per lane),
the answer codes, and what the run produced (``RunResult``). The sender, the report and
the verification all read it; none of them imports another."""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import random
import time
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram

from evactors.harness.traffic import BAD, BOT, DUPLICATE, OK, Remap, Request, TrafficSpec, generate

# Latencies are recorded in microseconds, from 1 µs to one hour, 3 significant digits.
ROOT = Path(__file__).resolve().parents[2]  # the project: bin/evactors, the package
BIN = ROOT / "bin" / "evactors"
LaneTraffic = tuple[list[bytes], list[int], list[int], bytes, list[str], list[tuple[str, ...]], bool]

HIST_MAX_US = 3_600_000_000


def new_hist() -> HdrHistogram:
    return HdrHistogram(1, HIST_MAX_US, 3)


ERROR = -1  # status of an attempt that got no HTTP answer (connection refused/reset, timeout)


# A request of an open-loop phase still waiting for its lane when the phase ended: not sent,
# so the next phase starts on time. Its latency is recorded as at least that wait.
BEHIND = -2


MAX_GUESS_EPS = 60_000  # events a max phase pre-generates per second unless --max-events says


# Request flags: what a request is, beyond a plain batch. MALFORMED and WRONG_KEY are broken
# copies of the next request, sent before it: refused whole, they leave the traffic intact.
PLAIN, REMAP, MALFORMED, WRONG_KEY = 0, 1, 2, 3


KIND_CODE = {OK: "o", BOT: "b", DUPLICATE: "d", BAD: "x"}  # and "v": an OK page/screen (a screen view)


@dataclass(frozen=True)
class Phase:
    rate: float | None  # events/s offered (open loop); None: closed loop at max (or half, below)
    seconds: float
    half: bool = False  # open loop at half the accepted rate of the last max phase before it

    @property
    def name(self) -> str:
        return "half" if self.half else "max" if self.rate is None else f"{self.rate:g}/s"

    @property
    def open_loop(self) -> bool:
        return self.rate is not None or self.half


def parse_phase(text: str) -> Phase:
    """``RATE:SECONDS``, ``max:SECONDS`` or ``half:SECONDS`` (e.g. ``25000:20``, ``max:60``,
    ``half:60``: half the accepted rate of the max phase before it)."""
    rate, _, seconds = text.partition(":")
    try:
        phase = Phase(None if rate in ("max", "half") else float(rate), float(seconds), half=rate == "half")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected RATE:SECONDS, max:SECONDS or half:SECONDS, got {text!r}") from None
    if phase.seconds <= 0 or (phase.rate is not None and phase.rate <= 0):
        raise argparse.ArgumentTypeError(f"rate and seconds must be positive: {text!r}")
    return phase


def parse_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    try:
        pair = (int(low), int(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN-MAX, got {text!r}") from None
    if not 1 <= pair[0] <= pair[1]:
        raise argparse.ArgumentTypeError(f"expected 1 <= MIN <= MAX, got {text!r}")
    return pair


@dataclass
class Options:
    url: str  # the service (its admin, verification and CPU go with --data-dir)
    write_key: str
    phases: list[Phase]
    project: str | None = None  # the write key's project: scopes verification, needed for re-maps
    run_id: str = ""  # prefix of every id of this run (default: derived from the time)
    users: int | None = None  # distinct users in all lanes (default: enough for the whole run)
    lanes: int = 32  # connections, each one SDK-like sender with its own users
    senders: int = 1  # sender processes (one lean sender takes ~15,000 requests/s on a core)
    batch: tuple[int, int] = (10, 100)
    seed: int = 1
    p_bot: float = 0.2  # of users are crawlers; they make ~5% of events (fewer events each)
    p_duplicate: float = 0.01
    p_bad: float = 0.001  # invalid messages inside batches (answered 400, the rest stored)
    bad_requests: float = 0.001  # whole requests broken: malformed JSON or an unknown write key
    remap_fraction: float = 0.0
    retries: int = 5  # per request, after a 503 or no answer (as SDKs do)
    timeout: float = 30.0
    max_events: int | None = None  # what a max phase pre-generates (default 60k per second)
    data_dir: Path | None = None  # the service's: pid, admin token, embedded Redis socket
    redis_url: str | None = None
    redis_prefix: str = "evx"
    redis_lanes: int = 0  # on a Redis Cluster: the service's redis.ingest_lanes
    redis_pids: list[int] = field(default_factory=list)  # a cluster's servers: their CPU and memory
    clickhouse_dsn: str | None = None
    database: str = "evactors"
    pid: int | None = None
    # more instances of the same service (one Redis): each request goes to one of url and
    # these at random (no visitor affinity); their data dirs give their CPU, instance by instance
    urls: list[str] = field(default_factory=list)
    instance_dirs: list[Path] = field(default_factory=list)
    saved_latency: bool = True  # subscribe to event:saved
    drain_timeout: float = 180.0
    report_dir: Path | None = None
    progress: bool = True
    verify: bool = True
    profile: bool = True  # CPU by stage in the first max phase (py-spy on the service's processes)

    @property
    def budget_events(self) -> int:
        """Events to generate: each rate phase's, plus what the max phases may use."""
        total = sum(p.rate * p.seconds for p in self.phases if p.rate is not None)
        max_seconds = sum(p.seconds for p in self.phases if p.rate is None and not p.half)
        half_seconds = sum(p.seconds for p in self.phases if p.half)
        if max_seconds:
            per_second = (self.max_events / max_seconds if self.max_events is not None else MAX_GUESS_EPS)
            total += per_second * (max_seconds + half_seconds / 2)
        return int(total)


@dataclass
class Traffic:
    """Every request of every lane, in one flat list (lane by lane, each in send order)."""

    bodies: list[bytes] = field(default_factory=list)
    messages: array = field(default_factory=lambda: array("I"))  # messages per request
    items: array = field(default_factory=lambda: array("i"))  # index in the lane's generator (-1: a copy)
    flags: bytearray = field(default_factory=bytearray)
    kinds: list[str] = field(default_factory=list)  # per request, one letter per message
    ids: list[tuple[str, ...]] = field(default_factory=list)  # messageId per message ("" if none)
    lanes: list[tuple[int, int]] = field(default_factory=list)  # (first request, count) per lane
    specs: list[TrafficSpec] = field(default_factory=list)
    exhausted: list[bool] = field(default_factory=list)  # lane generator ran dry before its budget
    seconds: float = 0.0  # generation time
    events: int = 0

    def __len__(self) -> int:
        return len(self.bodies)


def lane_spec(opts: Options, lane: int, users: int, start_ms: int) -> TrafficSpec:
    return TrafficSpec(seed=opts.seed * 1009 + lane, users=users, project_key=opts.write_key,
                       start_ms=start_ms, p_bot=opts.p_bot, p_duplicate=opts.p_duplicate, p_bad=opts.p_bad,
                       remap_fraction=opts.remap_fraction, batch_size=opts.batch,
                       id_prefix=f"{opts.run_id}-l{lane}-")


def _generate_lane(opts: Options, spec: TrafficSpec, budget: int) -> LaneTraffic:
    """One lane's requests, up to ``budget`` events: bodies, messages, generator items, flags,
    kinds, ids, and whether the generator ran dry first."""
    bodies: list[bytes] = []
    counts: list[int] = []
    items: list[int] = []
    flags = bytearray()
    kinds: list[str] = []
    ids: list[tuple[str, ...]] = []
    rng = random.Random(spec.seed)
    events = 0

    def add(body: bytes, count: int, item: int, flag: int, kind: str, mids: tuple[str, ...]) -> None:
        bodies.append(body)
        counts.append(count)
        items.append(item)
        flags.append(flag)
        kinds.append(kind)
        ids.append(mids)

    for index, item in enumerate(generate(spec)):
        if events >= budget:
            return bodies, counts, items, bytes(flags), kinds, ids, False
        if isinstance(item, Remap):
            add(json.dumps({"project": opts.project or "", "pairs": item.pairs}).encode(), 0, index, REMAP, "", ())
            continue
        assert isinstance(item, Request)
        if rng.random() < opts.bad_requests:  # a broken copy first: malformed JSON, or an unknown key
            broken = MALFORMED if rng.random() < 0.5 else WRONG_KEY
            add(item.body[: len(item.body) // 2] if broken == MALFORMED else item.body, 0, -1, broken, "", ())
        add(item.body, len(item.messages), index, PLAIN,
            "".join("v" if k == OK and m.get("type") in ("page", "screen") else KIND_CODE[k]
                    for k, m in zip(item.kinds, item.messages, strict=True)),
            tuple(str(m.get("messageId") or "") for m in item.messages))
        events += len(item.messages)
    return bodies, counts, items, bytes(flags), kinds, ids, True


def _generate_lane_star(args: tuple[Options, TrafficSpec, int]) -> LaneTraffic:
    return _generate_lane(*args)


def prepare(opts: Options) -> Traffic:
    """Generate each lane's share of the run's event budget (a little more: a lane may run
    ahead of the others), lanes spread over the cores (they are independent)."""
    started = time.perf_counter()
    traffic = Traffic()
    per_lane = math.ceil(opts.budget_events / opts.lanes * 1.05) + opts.batch[1]
    # generated lazily: unused users cost nothing, so the default errs on the generous side
    users = math.ceil(opts.users / opts.lanes) if opts.users else max(64, per_lane // 4)
    start_ms = int(time.time() * 1000) - 6 * 3_600_000
    traffic.specs = [lane_spec(opts, lane, users, start_ms) for lane in range(opts.lanes)]
    jobs = [(opts, spec, per_lane) for spec in traffic.specs]
    processes = min(os.cpu_count() or 1, opts.lanes)
    if processes > 1 and opts.budget_events > 50_000:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            lanes = pool.map(_generate_lane_star, jobs, chunksize=1)
    else:
        lanes = [_generate_lane(*job) for job in jobs]
    for bodies, counts, items, flags, kinds, ids, exhausted in lanes:
        traffic.lanes.append((len(traffic), len(bodies)))
        traffic.bodies += bodies
        traffic.messages.extend(counts)
        traffic.items.extend(items)
        traffic.flags += flags
        traffic.kinds += kinds
        traffic.ids += ids
        traffic.exhausted.append(exhausted)
        traffic.events += sum(counts)
    traffic.seconds = time.perf_counter() - started
    return traffic


def replay_requests(traffic: Traffic, lane: int) -> Iterator[tuple[int, Request | Remap]]:
    """The lane's requests again, with their global index (the generator is deterministic):
    the oracle needs whole messages, which are not kept in memory during the run."""
    first, count = traffic.lanes[lane]
    wanted = ((r, traffic.items[r]) for r in range(first, first + count) if traffic.items[r] >= 0)
    request, at = next(wanted, (None, -1))
    for index, item in enumerate(generate(traffic.specs[lane])):
        if request is None:
            return
        if index == at:
            yield request, item
            request, at = next(wanted, (None, -1))


@dataclass
class Second:
    """What happened in one second of the run (or, summed, in one phase)."""

    accepted: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    ack: HdrHistogram = field(default_factory=new_hist)
    saved: int = 0  # events saved (event:saved), screen views included
    e2s: HdrHistogram = field(default_factory=new_hist)  # event-to-saved of events but screen views
    saved_views: int = 0
    e2s_views: HdrHistogram = field(default_factory=new_hist)  # of screen views (held for their duration)

    def add_sent(self, accepted: int, statuses: dict[int, int], hist: bytes) -> None:
        self.accepted += accepted
        self.statuses.update(statuses)
        if hist:
            self.ack.decode_and_add(hist)

    def add_saved(self, saved: int, hist: bytes, views: int, view_hist: bytes) -> None:
        self.saved += saved
        self.saved_views += views
        if hist:
            self.e2s.decode_and_add(hist)
        if view_hist:
            self.e2s_views.decode_and_add(view_hist)


PhaseStats = Second


@dataclass
class RunResult:
    opts: Options
    traffic: Traffic
    t0: float
    starts: list[float]
    phases: list[PhaseStats]
    seconds: dict[int, Second]
    outcomes: dict[int, tuple[int, int, list[int] | None]]  # request -> (status, attempts, rejected)
    lag: HdrHistogram
    retry_after: Counter[float]
    monitor: list[dict[str, Any]]
    send_end: float = 0.0  # monotonic: last lane finished
    drained_at: float | None = None
    stop_at: float | None = None  # monotonic: the service was asked to stop (bench)
    ran_dry: int = 0  # lanes that had no traffic left while their phase was still on
    unsent: int = 0  # requests generated but not sent (max phases end by time; lanes behind stop)
    at_stop: Second = field(default_factory=Second)  # saved by the service's final flush (bench)
    disconnects: list[float] = field(default_factory=list)  # the subscriber lost Redis (notices missed)
    subscribed: bool = False
    harness_pids: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    rates: list[float | None] = field(default_factory=list)  # per phase: the rate offered (a half phase's, resolved)
    service_inserts: dict[str, Any] | None = None  # the service's ClickHouse inserts (its /metrics)
    profile: dict[str, Any] | None = None  # CPU by stage in the max phase (evactors.harness.profile)
