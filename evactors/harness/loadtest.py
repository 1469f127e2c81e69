"""Load harness: ``bin/evactors loadtest`` (any running evactors, or any Segment-compatible
endpoint) and ``bin/evactors bench`` (a fresh service on embedded defaults, then the
harness against it: the one command behind every performance figure of this project).

How it drives traffic
  The traffic is :mod:`evactors.harness.traffic`'s, generated *before* the timed phase (so
  generation is never the bottleneck; its speed is reported). It is split into *lanes*:
  each lane is an independent generator (its own users, id prefix ``RUN-lN-``) sending over
  its own keep-alive connection, one request at a time, like one SDK instance. That keeps
  every device's events in send order, which sessions depend on.

  A phase is open-loop at a fixed rate (each request has an intended send time; latency is
  measured from it, so a slow answer that delays the next request still counts: no
  coordinated omission, as in wrk2) or closed-loop at max (send the next request as soon as
  the previous one is answered). Sender processes (asyncio + uvloop and the harness's own
  HTTP client, ``evactors.harness.http_client``: the CPU per request matters, the harness
  shares the cores with the service) run the lanes; one more
  process follows ``event:saved`` for event-to-saved latency.

What it measures (per second and per phase)
  accepted events/s, HTTP ack latency (HDR histogram), event-to-saved latency, answers by
  status (503 and Retry-After), the service's CPU and RSS, Redis memory and the backlog, and
  the harness's own CPU and send lag (how late it sent: it says when it is the bottleneck).

What it verifies (after the service drained)
  every accepted event is in ClickHouse exactly once (``events``, or ``events_bots`` for
  crawlers), no rejected one is, and — when sessions were closed (``bench``) — that
  sessions match the generator's oracle. See :mod:`evactors.harness.verify`.
"""

from __future__ import annotations

import base64
import contextlib
import gc
import json
import math
import multiprocessing
import os
import queue as queue_mod
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from hdrh.histogram import HdrHistogram

from evactors.harness.run import (
    BEHIND,
    BIN,
    ERROR,
    HIST_MAX_US,
    PLAIN,
    REMAP,
    WRONG_KEY,
    Options,
    PhaseStats,
    RunResult,
    Second,
    Traffic,
    new_hist,
    prepare,
)
from evactors.store.paths import DataDir
from evactors.store.redis_io import sync_client

TICK = 1.0  # seconds between progress reports of the child processes (each encodes its histograms)




@dataclass
class Plan:
    """What the child processes need; inherited through fork, never pickled."""

    opts: Options
    traffic: Traffic
    t0: float  # monotonic time the first phase starts (every process shares the clock)
    starts: list[float]  # phase start offsets from t0
    sent_at: Any  # multiprocessing RawArray('d'): first intended send time per request
    results: Any  # multiprocessing Queue towards the coordinator
    admin_token: str | None
    first_request: dict[bytes, int]  # messageId of an event -> its first request * 2 + (1: a screen view)
    stop: Any  # multiprocessing Event: the coordinator asks the subscriber to stop
    stopping: Any  # multiprocessing Event: the service was asked to stop (saves now are its final flush)
    admin_address: str = ""  # the service's admin listener (unix:PATH or a URL): re-maps go there
    rates: Any = None  # RawArray('d') per phase: its rate (0 until a half phase's is known)
    accepted: Any = None  # RawArray('d') per sender x phase: events accepted (a half phase's base)
    finished: Any = None  # RawArray('i') per sender x phase: lanes done with it (answers all in)

    @property
    def deadline(self) -> float:
        """No retry after this: the service is not answering, the run has to end."""
        return self.t0 + self.starts[-1] + self.opts.phases[-1].seconds + max(30.0, self.opts.timeout)

    def phase_at(self, t: float) -> int:
        for i in range(len(self.starts) - 1, -1, -1):
            if t >= self.t0 + self.starts[i]:
                return i
        return 0


class Bucket:
    __slots__ = ("_hist", "_view_hist", "count", "statuses", "views")

    def __init__(self) -> None:
        self.count, self.views = 0, 0  # events (accepted, or saved); of which screen views
        self.statuses: Counter[int] = Counter()
        self._hist: HdrHistogram | None = None  # made when first used: a histogram costs 0.3 ms
        self._view_hist: HdrHistogram | None = None

    @property
    def hist(self) -> HdrHistogram:
        if self._hist is None:
            self._hist = new_hist()
        return self._hist

    @property
    def view_hist(self) -> HdrHistogram:
        if self._view_hist is None:
            self._view_hist = new_hist()
        return self._view_hist


def _encoded(h: HdrHistogram | None) -> bytes:
    return h.encode() if h is not None and h.get_total_count() else b""


class Buckets:
    """Per (second of the run, phase): counts and HDR histograms, sent to the coordinator
    every TICK and started afresh (the coordinator adds them up)."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.data: dict[tuple[int, int], Bucket] = {}

    def at(self, t: float, phase: int) -> Bucket:
        key = (int(t - self.t0), phase)
        bucket = self.data.get(key)
        if bucket is None:
            bucket = self.data[key] = Bucket()
        return bucket

    def take(self) -> list[tuple[int, int, int, dict[int, int], bytes, int, bytes]]:
        out = [(sec, phase, b.count, dict(b.statuses), _encoded(b._hist), b.views, _encoded(b._view_hist))
               for (sec, phase), b in self.data.items()]
        self.data = {}
        return out


def _sender_entry(plan: Plan, index: int) -> None:
    import uvloop

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator stops us
    gc.disable()  # forked: collections would touch (and copy) every inherited object
    uvloop.run(_sender(plan, index))


def _address(url: str) -> tuple[str, int, str | None, str]:
    """(host, port, unix socket path, path prefix) of an ``http://`` URL or ``unix:PATH``."""
    if url.startswith("unix:"):
        return "localhost", 0, url[5:], ""
    parsed = urlsplit(url)
    if parsed.scheme != "http" or not parsed.hostname:
        raise SystemExit(f"the harness speaks plain http:// only, got {url!r}")
    return parsed.hostname, parsed.port or 80, None, parsed.path.rstrip("/")


async def _sender(plan: Plan, index: int) -> None:
    import asyncio

    from evactors.harness.http_client import Client, HTTPError, encode, request_head

    opts, traffic = plan.opts, plan.traffic
    lanes = [lane for lane in range(len(traffic.lanes)) if lane % opts.senders == index]
    buckets = Buckets(plan.t0)
    lag = new_hist()  # how late the harness sent, when it was free to send on time
    # Every request's head but its length is built once, per target: bodies are pre-encoded by
    # the generator. With several instances, each request goes to one of them at random.
    auth = "Basic " + base64.b64encode(f"{opts.write_key}:".encode()).decode()
    targets: list[tuple[str, int, str | None, bytes, bytes]] = []  # host, port, unix, heads
    for url in [opts.url, *opts.urls]:
        host, port, unix, prefix = _address(url)
        host_header = host if port in (0, 80) else f"{host}:{port}"
        targets.append((host, port, unix, request_head("POST", prefix + "/v1/batch", host_header, {
            "Authorization": auth, "Content-Type": "application/json"}), request_head(
            "POST", prefix + "/v1/batch", host_header, {
                "Authorization": "Basic " + base64.b64encode(b"no-such-key:").decode(),
                "Content-Type": "application/json"})))
    admin_host, admin_port, admin_unix, admin_prefix = (_address(plan.admin_address) if plan.admin_address
                                                        else ("localhost", 0, None, ""))
    remap = request_head("POST", admin_prefix + "/admin/remap", "admin",
                         {"Authorization": f"Bearer {plan.admin_token}", "Content-Type": "application/json"})
    retry_after: Counter[float] = Counter()
    done = asyncio.Event()
    accepted_at = index * len(opts.phases)  # this sender's row of plan.accepted

    async def send(clients: list[Client], admin: Client, request: int, intended: float,
                   phase: int, pick: random.Random) -> tuple[int, int, list[int] | None]:
        """One request, retried after 503 or no answer; (status, attempts, rejected indices)."""
        flag = traffic.flags[request]
        target = pick.randrange(len(clients)) if len(clients) > 1 else 0
        client = clients[target]
        plain, wrong_key = targets[target][3], targets[target][4]
        data = encode(remap if flag == REMAP else wrong_key if flag == WRONG_KEY else plain, traffic.bodies[request])
        plan.sent_at[request] = intended
        attempts = 0
        while True:
            attempts += 1
            status, accepted, rejected, wait = ERROR, 0, None, 0.0
            try:
                answer = await (admin if flag == REMAP else client).request(data)
                status = answer.status
                if status == 200:
                    accepted = traffic.messages[request]
                elif status == 400 and answer.body:
                    with contextlib.suppress(ValueError, TypeError, AttributeError, KeyError):
                        reply = json.loads(answer.body)
                        if reply.get("error") == "invalid_events":
                            accepted = int(reply.get("accepted", 0))
                            rejected = [int(r["index"]) for r in reply.get("rejected", [])]
                elif status == 503:
                    try:
                        wait = float(answer.retry_after or b"1")
                    except ValueError:
                        wait = 1.0
                    retry_after[wait] += 1
            except (TimeoutError, HTTPError, OSError):
                wait = min(0.1 * 2 ** attempts, 5.0)
            now = time.monotonic()
            bucket = buckets.at(now, phase)
            bucket.count += accepted
            bucket.statuses[status] += 1
            bucket.hist.record_value(max(1, min(int((now - intended) * 1e6), HIST_MAX_US)))
            plan.accepted[accepted_at + phase] += accepted
            if status not in (503, ERROR) or attempts > opts.retries or now > plan.deadline:
                return status, attempts, rejected
            await asyncio.sleep(wait)
            intended = time.monotonic()  # a retry is a new request, sent when it is due

    async def phase_rate(index: int, p_end: float) -> float | None:
        """An open-loop phase's rate: given, or (a half phase) set by the coordinator at its start."""
        while time.monotonic() < p_end:
            if plan.rates[index] > 0:
                return float(plan.rates[index])
            await asyncio.sleep(0.01)
        return None

    async def lane_task(lane: int) -> None:
        clients = [Client(host, port, opts.timeout, unix) for host, port, unix, _p, _w in targets]
        admin = Client(admin_host, admin_port, opts.timeout, admin_unix)
        first, count = traffic.lanes[lane]
        request, end = first, first + count
        results: list[tuple[int, int, int, list[int] | None]] = []
        loop_rng = random.Random(lane)
        pick = random.Random(lane + 1_000_003)  # which instance each request goes to
        try:
            for phase_index, phase in enumerate(opts.phases):
                p_start = plan.t0 + plan.starts[phase_index]
                p_end = p_start + phase.seconds
                if phase.open_loop:
                    if time.monotonic() < p_start:
                        await asyncio.sleep(p_start - time.monotonic())
                    rate = await phase_rate(phase_index, p_end)
                    if rate is None:
                        plan.finished[accepted_at + phase_index] += 1
                        continue
                    lane_rate = rate / len(traffic.lanes)
                    mean = (opts.batch[0] + opts.batch[1]) / 2
                    intended = max(p_start, time.monotonic()) + loop_rng.random() * mean / lane_rate  # stagger
                    while request < end and intended < p_end:
                        if time.monotonic() >= p_end:
                            # The service kept the lane behind: what this phase still owes is recorded
                            # as waiting since its time (a lower bound), and sent in the next phase, so
                            # no message goes missing mid-traffic (sessions rely on it); after the last
                            # phase it is not sent at all.
                            bucket = buckets.at(p_end, phase_index)
                            owed = request
                            last = phase_index == len(opts.phases) - 1
                            while owed < end and intended < p_end:
                                bucket.statuses[BEHIND] += 1
                                bucket.hist.record_value(max(1, min(int((p_end - intended) * 1e6), HIST_MAX_US)))
                                if last:
                                    results.append((owed, BEHIND, 0, None))
                                intended += max(1, traffic.messages[owed]) / lane_rate
                                owed += 1
                            if last:
                                request = owed
                            break
                        delay = intended - time.monotonic()
                        if delay > 0:
                            await asyncio.sleep(delay)
                            lag.record_value(max(1, min(int((time.monotonic() - intended) * 1e6), HIST_MAX_US)))
                        results.append((request, *await send(clients, admin, request, intended, phase_index, pick)))
                        intended += max(1, traffic.messages[request]) / lane_rate
                        request += 1
                else:
                    if time.monotonic() < p_start:
                        await asyncio.sleep(p_start - time.monotonic())
                    while request < end and time.monotonic() < p_end:
                        results.append((request, *await send(clients, admin, request, time.monotonic(),
                                                             phase_index, pick)))
                        request += 1
                plan.finished[accepted_at + phase_index] += 1
        finally:
            for client in clients:
                client.close()
            admin.close()
        # ran dry: the lane had nothing left to send while its last phase was still on
        ran_dry = request >= end and time.monotonic() < plan.t0 + plan.starts[-1] + opts.phases[-1].seconds - 0.5
        plan.results.put(("lane", lane, results, ran_dry, end - request))

    async def report() -> None:
        while not done.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), TICK)
            plan.results.put(("send", index, buckets.take(), lag.encode() if lag.get_total_count() else b"",
                              dict(retry_after)))
            if lag.get_total_count():
                lag.reset()  # ~2 ms in Python: not when there is nothing to clear
            retry_after.clear()

    if time.monotonic() < plan.t0:
        await asyncio.sleep(plan.t0 - time.monotonic())
    reporter = asyncio.ensure_future(report())
    try:
        await asyncio.gather(*(lane_task(lane) for lane in lanes))
    finally:
        done.set()
        await reporter
    plan.results.put(("sender-done", index))


def _subscriber_entry(plan: Plan) -> None:
    """Follows ``event:saved``: event-to-saved latency = when the notice arrives - when the
    event's request was (meant to be) sent."""
    import re

    import redis

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    gc.disable()
    # Only the message ids are needed: found in the raw JSON with one regex (C speed) rather
    # than decoding 46 columns per row. Ids of this run end in "-m<n>"; no other column does.
    pattern = re.compile(rb'"(' + re.escape(plan.opts.run_id.encode()) + rb'-l\d+-[^"]*?-m\d+)"')
    buckets = Buckets(plan.t0)
    client = redis_client(plan.opts)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("event:saved")
    plan.results.put(("subscribed",))
    last_tick, connected = time.monotonic(), True
    first_request, sent_at = plan.first_request, plan.sent_at
    while True:
        try:
            message = pubsub.get_message(timeout=0.2)
            connected = True
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            if connected and not plan.stopping.is_set():  # notices may be missed meanwhile
                plan.results.put(("disconnected", time.monotonic()))
            connected = False
            if plan.stop.is_set():
                break
            time.sleep(0.2)
            with contextlib.suppress(Exception):
                pubsub = redis_client(plan.opts).pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe("event:saved")
            continue
        now = time.monotonic()
        if message is not None and message["type"] == "message":
            per_request = Counter(code for m in pattern.findall(message["data"])
                                  if (code := first_request.get(m)) is not None)
            final_flush = plan.stopping.is_set()
            for code, n in per_request.items():
                request, view = code >> 1, code & 1
                sent = sent_at[request]
                if sent <= 0:
                    continue
                # phase -1: saved by the service's final flush (held screen views of sessions
                # closed at shutdown), kept out of the phases' latency
                bucket = buckets.at(now, -1 if final_flush else plan.phase_at(sent))
                latency = max(1, min(int((now - sent) * 1e6), HIST_MAX_US))
                bucket.count += n
                if view:  # held until the next view is past the lateness window: paced by the traffic
                    bucket.views += n
                    bucket.view_hist.record_value(latency, n)
                else:
                    bucket.hist.record_value(latency, n)
        if now - last_tick >= TICK:
            plan.results.put(("saved", buckets.take()))
            last_tick = now
        if plan.stop.is_set() and message is None:
            break
    plan.results.put(("saved", buckets.take()))
    plan.results.put(("subscriber-done",))


def insert_sizes(metrics: str) -> dict[str, Any] | None:
    """Rows per ClickHouse insert from the service's Prometheus text (all tables, and the
    ``events`` rows)."""
    values: dict[str, float] = {}
    for line in metrics.splitlines():
        name, _, value = line.rpartition(" ")
        if name in ("evactors_flush_rows_sum", "evactors_flush_rows_count",
                    'evactors_rows_inserted_total{table="events"}'):
            with contextlib.suppress(ValueError):
                values[name] = float(value)
    count = values.get("evactors_flush_rows_count")
    if not count:
        return None
    return {"inserts": int(count), "rows": int(values.get("evactors_flush_rows_sum", 0)),
            "rows_per_insert": round(values.get("evactors_flush_rows_sum", 0) / count),
            "events_rows": int(values.get('evactors_rows_inserted_total{table="events"}', 0))}


def redis_client(opts: Options) -> Any:
    import redis

    if opts.redis_url:
        return sync_client(opts.redis_url, 5)
    if opts.data_dir is None:
        raise RuntimeError("no Redis: give --data-dir (embedded Valkey) or --redis-url")
    return redis.Redis(unix_socket_path=str(DataDir(opts.data_dir).valkey_socket), socket_timeout=5)


def service_info(data_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads(DataDir(data_dir).service_json.read_text())
    except (OSError, ValueError):
        return None


class Monitor:
    """Samples the service (CPU, RSS; its embedded Valkey apart), Redis memory and backlog,
    the harness's own processes and the machine, once a second."""

    def __init__(self, opts: Options, harness_pids: dict[str, int]) -> None:
        import psutil

        self.psutil = psutil
        self.samples: list[dict[str, Any]] = []
        self.service = self.valkey = None
        self.valkeys: list[Any] = []  # the Redis servers measured: the embedded one, or a cluster's
        pid = opts.pid
        if pid is None and opts.data_dir is not None:
            pid = (service_info(opts.data_dir) or {}).get("pid")
        if pid:
            with contextlib.suppress(psutil.Error):
                self.service = psutil.Process(int(pid))
                children = [c for c in self.service.children() if "valkey" in c.name() or "redis" in c.name()]
                self.valkey = children[0] if children else None
        for server in opts.redis_pids:
            with contextlib.suppress(psutil.Error):
                self.valkeys.append(psutil.Process(server))
        if self.valkey is not None:
            self.valkeys.insert(0, self.valkey)
        self.lanes = opts.redis_lanes
        self.others: list[Any] = []  # the other instances' main processes
        for directory in opts.instance_dirs:
            other = (service_info(directory) or {}).get("pid")
            if other:
                with contextlib.suppress(psutil.Error):
                    self.others.append(psutil.Process(int(other)))
        self.harness: dict[str, Any] = {}
        for name, p in {"coordinator": os.getpid(), **harness_pids}.items():
            with contextlib.suppress(psutil.Error):
                self.harness[name] = psutil.Process(p)
        self.redis = None
        self.keys_prefix = opts.redis_prefix
        with contextlib.suppress(Exception):
            client = redis_client(opts)
            client.ping()
            self.redis = client
        self.shards = 0
        if self.redis is not None:
            with contextlib.suppress(Exception):
                self.shards = int(self.redis.hget(f"{self.keys_prefix}:meta", "session_shards") or 0)
        self.last: dict[int, float] = {}  # pid -> CPU seconds at the last sample
        self.last_t = 0.0
        psutil.cpu_percent(None)

    def _workers(self, service: Any = None) -> list[Any]:
        """The service's own child processes (session workers), its Valkey apart: part of
        the service's CPU and memory. Looked up each time: a restarted worker is new."""
        service = service or self.service
        if service is None:
            return []
        try:
            children = service.children()
        except self.psutil.Error:
            return []
        valkey = self.valkey.pid if self.valkey is not None else None
        return [c for c in children if c.pid != valkey]

    def _cpu(self, proc: Any) -> float:
        """CPU seconds the process used since the last sample (0 once it ended)."""
        try:
            times = proc.cpu_times()
        except self.psutil.Error:
            return 0.0
        now = times.user + times.system
        previous = self.last.get(proc.pid)
        self.last[proc.pid] = now
        return now - previous if previous is not None else 0.0

    def sample(self, t: float) -> dict[str, Any]:
        elapsed = t - self.last_t if self.last_t else 0.0
        self.last_t = t
        s: dict[str, Any] = {"t": t}

        def cores(used: float) -> float | None:
            return round(used / elapsed, 3) if elapsed else None

        workers = self._workers()
        main_cpu = self._cpu(self.service) if self.service is not None else None
        s["service_main_cpu"] = cores(main_cpu) if main_cpu is not None else None
        # with several instances: the service is all of them, and each is shown apart
        per_instance = [] if main_cpu is None else [main_cpu + sum(self._cpu(w) for w in workers)]
        for other in self.others:
            per_instance.append(self._cpu(other) + sum(self._cpu(w) for w in self._workers(other)))
        s["service_cpu"] = cores(sum(per_instance)) if main_cpu is not None else None
        s["instances_cpu"] = [cores(used) for used in per_instance] if self.others else None
        s["valkey_cpu"] = cores(sum(self._cpu(v) for v in self.valkeys)) if self.valkeys else None
        harness = {name: self._cpu(proc) for name, proc in self.harness.items()}
        s["harness_cpu"] = cores(sum(harness.values()))
        for name, used in harness.items():
            s[f"harness_{name}_cpu"] = cores(used)
        for name, procs in (("service", [self.service, *workers]), ("valkey", self.valkeys or [None])):
            s[f"{name}_rss_mb"] = None
            if procs[0] is not None:
                with contextlib.suppress(self.psutil.Error):
                    s[f"{name}_rss_mb"] = round(sum(p.memory_info().rss for p in procs if p) / 2**20, 1)
        s["service_main_rss_mb"] = s["service_main_file_mb"] = None
        if self.service is not None:
            # The main process apart, and its file-backed part (Linux): mapped files, mostly
            # the pages of chDB's 530 MB library it has touched, and the GeoIP database.
            with contextlib.suppress(self.psutil.Error):
                memory = self.service.memory_info()
                s["service_main_rss_mb"] = round(memory.rss / 2**20, 1)
                shared = getattr(memory, "shared", None)
                s["service_main_file_mb"] = round(shared / 2**20, 1) if shared is not None else None
        s["machine_cpu"] = round(self.psutil.cpu_percent(None) / 100 * (os.cpu_count() or 1), 3)
        s["redis_used_mb"] = s["backlog"] = None
        if self.redis is not None:
            import redis

            # the service (and its Valkey) may be stopping: then a gap in the timeline (None)
            with contextlib.suppress(redis.RedisError, OSError):
                if self.lanes:  # a cluster: every master's memory, every lane's counter
                    from evactors.store.keys import Keys

                    used = self.redis.info("memory", target_nodes=self.redis.PRIMARIES)
                    s["redis_used_mb"] = round(sum(i["used_memory"] for i in used.values()) / 2**20, 1)
                    counters = Keys(self.keys_prefix, self.lanes).backlog_counters(self.shards)
                    s["backlog"] = sum(int(c or 0) for c in self.redis.mget_nonatomic(counters))
                    self.samples.append(s)
                    return s
                pipe = self.redis.pipeline(transaction=False)
                pipe.info("memory")
                pipe.get(f"{self.keys_prefix}:in:n")
                for shard in range(self.shards):
                    pipe.get(f"{self.keys_prefix}:{{s{shard}}}:buf:n")
                info, *counts = pipe.execute()
                s["redis_used_mb"] = round(info["used_memory"] / 2**20, 1)
                s["backlog"] = sum(int(c or 0) for c in counts)
        self.samples.append(s)
        return s


class LoadTest:
    """One run: ``prepare`` (generate), ``run`` (send and measure), ``drain``; then
    :func:`evactors.harness.verify.verify` and :mod:`evactors.harness.report`."""

    def __init__(self, opts: Options, say: Any = None) -> None:
        if not opts.run_id:
            opts = replace(opts, run_id=f"lt{int(time.time() * 1000) % 36**7:x}")
        self.opts = opts
        self.say = say or (lambda text: print(text, file=sys.stderr, flush=True))
        self.traffic: Traffic | None = None
        self.result: RunResult | None = None
        self._ctx = multiprocessing.get_context("fork")
        self._procs: list[Any] = []
        self._subscriber: Any = None
        self._plan: Plan | None = None
        self._monitor: Monitor | None = None
        self._next_sample = 0.0
        self._profiler: Any = None

    def admin_token(self) -> str | None:
        if self.opts.data_dir is None:
            return None
        try:
            return DataDir(self.opts.data_dir).admin_token.read_text().strip() or None
        except OSError:
            return None

    def admin_address(self) -> str:
        if self.opts.data_dir is None:
            return ""
        from evactors.store.admin_client import admin_address

        try:
            return admin_address(self.opts.data_dir)
        except (OSError, ValueError, KeyError):
            return ""

    def prepare(self) -> Traffic:
        from evactors.harness.traffic import browser_user_agents

        self.traffic = prepare(self.opts)
        t = self.traffic
        if any(t.exhausted):
            self.say(f"note: {sum(t.exhausted)} lane(s) used all their users (--users) before their share "
                     "of the run's events: they may run dry")
        if len(browser_user_agents()) < 100:
            self.say("warning: fake-useragent is not installed: only a few user agents, so the service's "
                     "caches are unrealistically warm (pip install fake-useragent)")
        self.say(f"traffic: {t.events:,} events in {len(t):,} requests over {len(t.lanes)} lanes, generated in "
                 f"{t.seconds:.1f}s ({t.events / max(t.seconds, 1e-9):,.0f} events/s, before the timed phase)")
        if any(f == REMAP for f in t.flags) and not (self.admin_token() and self.opts.project):
            raise SystemExit("re-maps need --project and --data-dir (the admin token)")
        return t

    # -- running ----------------------------------------------------------------------

    def run(self) -> RunResult:
        from multiprocessing.sharedctypes import RawArray

        notes = []
        if self.opts.saved_latency and not self._redis_reachable():
            notes.append("event:saved not followed: the service's Redis is not reachable "
                         "(give --data-dir of an embedded one, or --redis-url)")
            self.opts = replace(self.opts, saved_latency=False)
        opts = self.opts
        traffic = self.traffic or self.prepare()
        first_request: dict[bytes, int] = {}
        for request, (kinds, ids) in enumerate(zip(traffic.kinds, traffic.ids, strict=True)):
            if traffic.flags[request] != PLAIN:
                continue
            for kind, mid in zip(kinds, ids, strict=False):
                if kind in "ov" and mid:
                    first_request.setdefault(mid.encode(), request * 2 + (kind == "v"))
        starts, at = [], 0.0
        for phase in opts.phases:
            starts.append(at)
            at += phase.seconds
        results = self._ctx.Queue()
        plan = Plan(opts, traffic, 0.0, starts, RawArray("d", max(1, len(traffic))), results,
                    self.admin_token(), first_request, self._ctx.Event(), self._ctx.Event(),
                    self.admin_address(), RawArray("d", [p.rate or 0.0 for p in opts.phases]),
                    RawArray("d", opts.senders * len(opts.phases)), RawArray("i", opts.senders * len(opts.phases)))
        self._plan = plan
        result = RunResult(opts, traffic, 0.0, starts, [PhaseStats() for _ in opts.phases], {}, {}, new_hist(),
                           Counter(), [], notes=notes)
        self.result = result
        gc.collect()
        gc.freeze()  # children inherit everything; keep their collector off our pages
        try:
            plan.t0 = time.monotonic() + 1.5  # time to fork, connect and subscribe
            result.t0 = plan.t0
            if opts.saved_latency:
                self._subscriber = self._ctx.Process(target=_subscriber_entry, args=(plan,), daemon=True)
                self._subscriber.start()
                result.harness_pids["subscriber"] = self._subscriber.pid
            for index in range(opts.senders):
                proc = self._ctx.Process(target=_sender_entry, args=(plan, index), daemon=True)
                proc.start()
                self._procs.append(proc)
                result.harness_pids[f"sender{index}"] = proc.pid or 0
        finally:
            gc.unfreeze()
        self._monitor = Monitor(opts, result.harness_pids)
        self._monitor.sample(time.monotonic())
        self._next_sample = plan.t0
        senders_done = 0
        total = sum(p.seconds for p in opts.phases)
        with self._progress_bar(total) as progress:
            while senders_done < opts.senders:
                senders_done += self._pump(0.2)
                now = time.monotonic()
                self._resolve_half(now)
                self._profile(now)
                if self._sample(now):
                    progress(min(max(0.0, now - plan.t0), total), self._status_line(now))
                if any(not p.is_alive() and p.exitcode not in (0, None) for p in self._procs):
                    raise RuntimeError("a sender process died: " + ", ".join(
                        f"{p.pid} exit {p.exitcode}" for p in self._procs))
        result.send_end = time.monotonic()
        self._profile(math.inf)
        result.rates = [plan.rates[i] or None for i in range(len(opts.phases))]
        for proc in self._procs:
            proc.join(10)
        return result

    def _profile(self, now: float) -> None:
        """CPU by stage over the first max phase (from its second second to just before its
        end): py-spy on the service's processes, Valkey's commandstats."""
        from evactors.harness.profile import Profiler

        plan, opts = self._plan, self.opts
        assert plan is not None and self._monitor is not None and self.result is not None
        index = next((i for i, p in enumerate(opts.phases) if not p.open_loop), None)
        if not opts.profile or index is None or self._monitor.service is None or self.result.profile is not None:
            return
        start = plan.t0 + plan.starts[index] + min(1.0, opts.phases[index].seconds / 4)
        end = plan.t0 + plan.starts[index] + opts.phases[index].seconds - 0.3
        if self._profiler is None and start <= now < end:
            monitor = self._monitor
            pids: dict[str, int] = {"main": self._monitor.service.pid}
            for n, worker in enumerate(monitor._workers()):
                pids[f"worker{n}" if n else "worker"] = worker.pid
            senders = [pid for name, pid in self.result.harness_pids.items() if name.startswith("sender")]
            self._profiler = Profiler(pids, monitor.valkey.pid if monitor.valkey is not None else None,
                                      None if monitor.lanes else monitor.redis, senders)
            self._profiler.start()
        elif self._profiler is not None and now >= end:
            self.result.profile = self._profiler.stop()
            self._profiler = None

    def _resolve_half(self, now: float) -> None:
        """A half phase's rate, once it starts: half what the last max phase before it accepted
        per second (every answer to its requests, counted by the senders), once every lane is
        done with it (or 2 s into the half phase: a lane waiting for a slow answer holds no one)."""
        plan, phases = self._plan, self.opts.phases
        assert plan is not None
        for i, phase in enumerate(phases):
            if not phase.half or plan.rates[i] > 0 or now < plan.t0 + plan.starts[i]:
                continue
            base = next((j for j in range(i - 1, -1, -1) if not phases[j].open_loop), None)
            rows, lanes = range(self.opts.senders), len(self.traffic.lanes) if self.traffic else 0
            if base is not None and now < plan.t0 + plan.starts[i] + 2.0 and \
                    sum(plan.finished[s * len(phases) + base] for s in rows) < lanes:
                continue
            accepted = 0.0 if base is None else sum(plan.accepted[s * len(phases) + base] for s in rows)
            rate = accepted / phases[base].seconds / 2 if base is not None else 0.0
            plan.rates[i] = max(rate, 1.0)
            self.say(f"half phase: {plan.rates[i]:,.0f} events/s (half the max phase's accepted rate)")

    def _redis_reachable(self) -> bool:
        try:
            client = redis_client(self.opts)
            client.ping()
            client.close()
            return True
        except Exception:
            return False

    def _sample(self, now: float) -> dict[str, Any] | None:
        """A monitor sample on each whole second of the run (each covers the second before)."""
        assert self._monitor is not None
        if now < self._next_sample:
            return None
        self._next_sample += max(1.0, math.floor(now - self._next_sample) + 1.0)
        return self._monitor.sample(now)

    def _progress_bar(self, total: float) -> Any:
        opts = self.opts

        @contextlib.contextmanager
        def bar() -> Iterator[Any]:
            if not opts.progress or not sys.stderr.isatty():
                last = [0.0]

                def plain(done: float, text: str) -> None:  # a line every 5 s when not on a terminal
                    if done - last[0] >= 5:
                        last[0] = done
                        self.say(f"  {done:5.0f}s/{total:.0f}s  {text}")

                yield plain
                return
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            with Progress(TextColumn("[bold]load"), BarColumn(), TextColumn("{task.completed:.0f}/{task.total:.0f}s"),
                          TimeElapsedColumn(), TextColumn("{task.fields[status]}"), transient=True) as p:
                task = p.add_task("load", total=total, status="starting")
                yield lambda done, text: p.update(task, completed=done, status=text)

        return bar()

    def _status_line(self, now: float) -> str:
        assert self.result is not None and self._monitor is not None
        sec = int(now - self.result.t0) - 1  # the last whole second
        s = self.result.seconds.get(sec, Second())
        m = self._monitor.samples[-1]
        p99 = s.ack.get_value_at_percentile(99) / 1000 if s.ack.get_total_count() else 0
        refused = sum(x.statuses.get(503, 0) for x in self.result.seconds.values())
        parts = [f"{s.accepted:,} acc/s", f"{s.saved:,} saved/s", f"ack p99 {p99:.1f}ms", f"503 {refused}"]
        if m.get("service_cpu") is not None:
            parts.append(f"svc {m['service_cpu']:.2f} cpu {m['service_rss_mb']:.0f}MB")
        if m.get("backlog") is not None:
            parts.append(f"backlog {m['backlog']:,}")
        return " | ".join(parts)

    def _pump(self, timeout: float) -> int:
        """Merge what the child processes sent; returns how many senders finished."""
        assert self.result is not None
        result, finished = self.result, 0
        deadline = time.monotonic() + timeout
        while True:
            try:
                item = self._plan.results.get(timeout=max(0.0, deadline - time.monotonic()))  # type: ignore[union-attr]
            except queue_mod.Empty:
                return finished
            kind = item[0]
            if kind == "send":
                _, _, buckets, lag, retry_after = item
                for sec, phase, accepted, statuses, hist, _views, _view_hist in buckets:
                    result.seconds.setdefault(sec, Second()).add_sent(accepted, statuses, hist)
                    result.phases[phase].add_sent(accepted, statuses, hist)
                if lag:
                    result.lag.decode_and_add(lag)
                result.retry_after.update(retry_after)
            elif kind == "saved":
                for sec, phase, saved, _statuses, hist, views, view_hist in item[1]:
                    if phase < 0:
                        result.at_stop.add_saved(saved, hist, views, view_hist)
                        continue
                    result.seconds.setdefault(sec, Second()).add_saved(saved, hist, views, view_hist)
                    result.phases[phase].add_saved(saved, hist, views, view_hist)
            elif kind == "lane":
                _, _lane, outcomes, ran_dry, unsent = item
                for request, status, attempts, rejected in outcomes:
                    result.outcomes[request] = (status, attempts, rejected)
                result.ran_dry += bool(ran_dry)
                result.unsent += unsent
            elif kind == "disconnected":
                result.disconnects.append(item[1])
            elif kind == "sender-done":
                finished += 1
            elif kind == "subscribed":
                result.subscribed = True
            if time.monotonic() >= deadline:
                return finished

    def drain(self, settle: float = 1.0) -> None:
        """Wait until the service has nothing left in Redis (the backlog) and no more events
        are being saved, or ``drain_timeout``."""
        assert self.result is not None and self._monitor is not None
        deadline = time.monotonic() + self.opts.drain_timeout
        quiet_since, last_saved = time.monotonic(), -1
        while time.monotonic() < deadline:
            self._pump(0.25)
            now = time.monotonic()
            self._sample(now)
            saved = sum(p.saved for p in self.result.phases)
            if saved != last_saved:
                quiet_since, last_saved = now, saved
            backlog = self._monitor.samples[-1].get("backlog")
            if (backlog == 0 or backlog is None) and now - quiet_since >= settle:
                self.result.drained_at = now
                break
        else:
            self.result.notes.append(f"the service did not drain within {self.opts.drain_timeout:.0f}s")
        self.result.service_inserts = self.service_inserts()

    def service_inserts(self) -> dict[str, Any] | None:
        """The service's ClickHouse inserts so far, from its ``/metrics``: rows per insert."""
        token, address = self.admin_token(), self.admin_address()
        if not token or not address:
            return None
        from evactors.store.admin_client import call

        try:
            text = call(address, token, "/metrics", timeout=10)
        except Exception:
            return None
        return insert_sizes(str(text))

    def mark_stop(self) -> None:
        """The service is about to be stopped: what is saved from now on is its final flush."""
        assert self.result is not None and self._plan is not None
        self._pump(0.3)  # notices already on their way belong to the run
        self._plan.stopping.set()
        self.result.stop_at = time.monotonic()

    def finish(self, wait: float = 3.0) -> RunResult:
        """Stop the subscriber (after the last notices) and collect everything."""
        assert self.result is not None and self._plan is not None
        if self._subscriber is not None:
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                self._pump(0.2)
            self._plan.stop.set()
            end = time.monotonic() + 10
            while self._subscriber.is_alive() and time.monotonic() < end:
                self._pump(0.2)
            self._pump(0.1)
            self._subscriber.join(1)
            if self._subscriber.is_alive():
                self._subscriber.terminate()
        if self._monitor is not None:
            self.result.monitor = self._monitor.samples
        return self.result

    def close(self) -> None:
        if self._profiler is not None:
            self._profiler.cancel()
        for proc in [*self._procs, *([self._subscriber] if self._subscriber else [])]:
            if proc.is_alive():
                proc.terminate()
                proc.join(5)


class BenchService:
    """``bin/evactors run`` on embedded defaults in a subprocess, on a free port, closing its
    sessions at shutdown so they can be checked against the oracle."""

    def __init__(self, data_dir: Path, key: str, project: str, env: dict[str, str] | None = None,
                 bin_path: Path | None = None) -> None:
        self.data_dir, self.key, self.project = data_dir, key, project
        self.env = env or {}
        self.bin = bin_path or BIN  # another checkout's bin/evactors: before/after side by side
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.log_path = data_dir.parent / f"{data_dir.name}.log"

    def start(self, timeout: float = 90) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Every session is checked against the oracle, so the stop closes all of them, and
        # may take its time: a long soak leaves hundreds of thousands open, more than the
        # default 15 s drain closes (the rest would stay in Redis, not in ClickHouse).
        env = {**os.environ, "EVACTORS_LOG_FORMAT": "json",
               "EVACTORS_PIPELINE_CLOSE_SESSIONS_ON_SHUTDOWN": "true",
               "EVACTORS_SUPERVISOR_DRAIN_SECONDS": "280", **self.env}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(self.bin), "run", "--data-dir", str(self.data_dir), "--listen", "127.0.0.1:0",
                 "--write-key", f"{self.key}={self.project}"], stdout=log, stderr=log, env=env,
                cwd=self.bin.resolve().parents[1])  # `python -m` puts the cwd first on the path
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the service exited {self.proc.returncode}; see {self.log_path}")
            info = service_info(self.data_dir)
            if info and info.get("pid") == self.proc.pid:
                self.url = info["url"]
                return
            time.sleep(0.1)
        raise RuntimeError(f"the service did not start in {timeout:.0f}s; see {self.log_path}")

    def stop(self, timeout: float = 300) -> int:
        """SIGTERM: it drains (and closes its sessions), then exits 0."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return -9

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        pid_file = DataDir(self.data_dir).valkey_pid
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
