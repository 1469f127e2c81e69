"""The load run's report: a JSON document, a table on the terminal, and a chart (PNG) of
throughput, latency and resources over time. Figures are defined in docs/benchmarks.md."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from evactors.harness.run import BEHIND, ERROR, RunResult

if TYPE_CHECKING:
    from hdrh.histogram import HdrHistogram



# The targets of issue 17 (2 cores, embedded Valkey + chDB, service and harness side by side).
# Sustained events/s by request size (events per request: min, max).
TARGET_EPS = {(100, 100): 20_000, (10, 100): 12_000, (1, 1): 5_000}


TARGET_ACK_P99_MS = 50.0  # at half the max rate (a half phase)


TARGET_E2S_P99_MS = 2_000.0


TARGET_FLOOR_RATIO = 0.5


TARGET_SERVICE_US = {(100, 100): ("event", 60.0), (1, 1): ("request", 250.0)}  # service CPU
TARGET_VALKEY_US = {(100, 100): 10.0}  # Valkey CPU per event


TARGET_HARNESS_US_PER_REQUEST = 50.0  # the senders' CPU: the harness must not be the limit
# Below this many requests/s a sender's fixed cost (~0.01 core: its per-second report) is most
# of its CPU per request, and the harness is far from being the limit: no target then.
HARNESS_TARGET_MIN_RATE = 1_000


SOAK_SECONDS = 600


TARGET_RSS_GROWTH_PCT = 10.0


# Shown beside the soak's growth, not instead of it: how much of it is the warm-up (chDB's
# library paged in, buffers and caches filling) and how much continues.
WARMUP_SECONDS = 180


_ANSWER = {-1: "no answer", -2: "behind"}  # ERROR, BEHIND (see evactors.harness.loadtest)


def percentiles(h: HdrHistogram) -> dict[str, Any]:
    """p50/p90/p99/p99.9, max and mean in ms, as hdrh gives them, from one cumulative sum of
    the counts (the mean from the non-empty buckets only): the histogram's own queries walk
    every bucket in Python each (~15 ms a query), which over a 10-minute run's per-second
    histograms took minutes."""
    total = h.get_total_count()
    if not total:
        return {"count": 0}
    counts = np.ctypeslib.as_array(h.counts)[:h.counts_len]
    cumulative = np.cumsum(counts)
    out: dict[str, Any] = {"count": total}
    for name, percentile in (("p50_ms", 50), ("p90_ms", 90), ("p99_ms", 99), ("p99_9_ms", 99.9)):
        index = int(np.searchsorted(cumulative, h.get_target_count_at_percentile(percentile)))
        out[name] = round(h.get_highest_equivalent_value(h.get_value_from_index(index)) / 1000, 2)
    out["max_ms"] = round(h.get_max_value() / 1000, 2)
    used = np.flatnonzero(counts)
    medians = [lo + (h.get_highest_equivalent_value(lo) - lo + 1) // 2  # what the mean weighs each by
               for lo in (h.get_lowest_equivalent_value(h.get_value_from_index(int(i))) for i in used)]
    out["mean_ms"] = round(float(np.dot(counts[used].astype(np.float64), medians)) / total / 1000, 2)
    return out


def _slope_per_minute(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope (per minute) of (seconds, value) points."""
    if len(points) < 30:  # a slope over less than half a minute says nothing of a leak
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    if not var:
        return None
    return round(sum((x - mx) * (y - my) for x, y in points) / var * 60, 2)


def _rss(points: list[tuple[float, float]]) -> dict[str, Any]:
    """Start, end, max and slope of (seconds, MB) samples; over 2 minutes or more, the growth
    of the last minute's mean over the first minute's, and (over 5 minutes or more) over
    the minute after the warm-up."""
    if not points:
        return {}
    out: dict[str, Any] = {"start": points[0][1], "end": points[-1][1], "max": max(v for _, v in points),
                           "slope_mb_per_min": _slope_per_minute(points)}
    t0, t1 = points[0][0], points[-1][0]

    def mean(a: float, b: float) -> float | None:
        values = [v for t, v in points if a <= t < b]
        return sum(values) / len(values) if values else None

    last = mean(t1 - 60, t1 + 1)
    for key, start, span in (("growth_pct", t0, 120), ("after_warmup_growth_pct", t0 + WARMUP_SECONDS, 300)):
        base = mean(start, start + 60) if t1 - t0 + 1 >= span else None  # a sample a second
        out[key] = round((last - base) / base * 100, 1) if base and last is not None else None
    return out


def _per_event(p: dict[str, Any], key: str) -> float | None:
    """CPU time per accepted event, in µs: what bounds throughput once the cores are busy."""
    cores, rate = (p.get(key) or {}).get("mean"), p.get("accepted_eps")
    return round(cores * 1e6 / rate) if cores is not None and rate else None


def _other_cpu(m: dict[str, Any]) -> float | None:
    """Machine CPU not used by the service, its Valkey or the harness: other work on the
    machine, which the figures then share the cores with."""
    if m.get("machine_cpu") is None or m.get("harness_cpu") is None:
        return None
    return round(max(0.0, m["machine_cpu"] - sum(m.get(k) or 0.0 for k in ("service_cpu", "valkey_cpu",
                                                                             "harness_cpu"))), 3)


def _stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {}
    return {"mean": round(sum(values) / len(values), 3), "max": round(max(values), 3)}


def harness_limit(p: dict[str, Any], cores: int) -> list[str]:
    """Why the harness, not the service, bounds a phase (empty: it does not): a sender process
    near a full core, the senders near their cores' share of the machine, or — in a max phase —
    the service mostly idle while the harness is busy."""
    why = []
    senders = {k.removesuffix("_cpu"): v for k, v in p["harness_processes_cpu"].items()
               if k.startswith("sender") and v}
    for name, st in senders.items():
        if st["mean"] >= 0.85:
            why.append(f"sender process {name} used {st['mean']:.2f} of a core (mean)")
    busy = sum(st["mean"] for st in senders.values())
    share = cores / 2  # the harness shares the machine with the service
    if senders and busy >= 0.85 * share:
        why.append(f"the senders used {busy:.2f} cores, near the harness's share of the machine ({share:g})")
    service = (p.get("service_cpu") or {}).get("mean")
    machine = (p.get("machine_cpu") or {}).get("mean")
    if not p.get("open_loop", True) and service is not None and busy and service < busy and \
            machine is not None and machine < 0.9 * cores:
        why.append(f"the service used {service:.2f} cores, less than the senders ({busy:.2f}), with cores to spare "
                   f"({machine:.2f} of {cores} busy)")
    return why


def _window_sum(result: RunResult, a: float, b: float, value: Any) -> float:
    """``value(second)`` summed over the run's seconds, weighted by their overlap with [a, b)
    (seconds since the run's t0)."""
    total = 0.0
    for sec, s in result.seconds.items():
        overlap = min(b, sec + 1) - max(a, sec)
        if overlap > 0:
            total += value(s) * overlap
    return total


def _cpu_by_stage(result: RunResult) -> dict[str, Any] | None:
    """The profile of the max phase (evactors.harness.profile) per accepted event."""
    from evactors.harness.profile import per_event

    prof = result.profile
    if not prof:
        return None
    a, b = prof["started"] - result.t0, prof["ended"] - result.t0
    events = round(_window_sum(result, a, b, lambda s: s.accepted))
    requests = round(_window_sum(result, a, b, lambda s: sum(n for k, n in s.statuses.items() if k >= 0)))
    senders = prof.get("senders_cpu_s")  # measured over the window (/proc), else from the monitor's samples
    if senders is None:
        senders = 0.0
        for m in result.monitor:  # each sample covers the second before it
            overlap = min(b, m["t"] - result.t0) - max(a, m["t"] - result.t0 - 1)
            if overlap > 0:
                senders += sum(v for k, v in m.items() if k.startswith("harness_sender") and v) * overlap
    out = per_event(prof, events, requests, senders)
    if out:
        out["window_s"], out["errors"] = prof["window_s"], prof["errors"]
        out["py_spy_us_per_event"] = round(prof.get("py_spy_cpu_s", 0.0) * 1e6 / max(events, 1), 1)
    return out or None


def build(result: RunResult, verification: dict[str, Any] | None, floor: dict[str, Any] | None,
          kind: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:

    opts, traffic, t0 = result.opts, result.traffic, result.t0
    # a sample covers the second before it: second k is the sample taken at about k + 1
    samples = [{**s, "t": round(s["t"] - t0, 2), "sec": round(s["t"] - t0) - 1} for s in result.monitor]
    last_sec = max([*result.seconds, 0])
    timeline: list[dict[str, Any]] = []
    for sec in range(0, last_sec + 1):
        s = result.seconds.get(sec)
        row: dict[str, Any] = {"t": sec}
        if s is not None:
            ack, e2s = percentiles(s.ack), percentiles(s.e2s)
            row.update(accepted=s.accepted, saved=s.saved, saved_views=s.saved_views,
                       requests=sum(s.statuses.values()),
                       refused_503=s.statuses.get(503, 0), errors=s.statuses.get(ERROR, 0),
                       ack_p50_ms=ack.get("p50_ms"), ack_p99_ms=ack.get("p99_ms"), ack_p99_9_ms=ack.get("p99_9_ms"),
                       e2s_p50_ms=e2s.get("p50_ms"), e2s_p99_ms=e2s.get("p99_ms"),
                       e2s_views_p99_ms=percentiles(s.e2s_views).get("p99_ms"))
        near = [m for m in samples if m["sec"] == sec]
        if near:
            m = near[-1]
            row.update({k: m.get(k) for k in ("service_cpu", "service_rss_mb", "valkey_cpu", "valkey_rss_mb",
                                               "redis_used_mb", "backlog", "harness_cpu", "machine_cpu")})
            row["other_cpu"] = _other_cpu(m)
        timeline.append(row)

    phases: list[dict[str, Any]] = []
    for i, (phase, stats) in enumerate(zip(opts.phases, result.phases, strict=True)):
        start, end = result.starts[i], result.starts[i] + phase.seconds
        window = [m for m in samples if start <= m["sec"] < end]
        stored = sum(s.saved for sec, s in result.seconds.items() if start <= sec < end)
        svc_rss = [(m["t"], m["service_rss_mb"]) for m in window if m.get("service_rss_mb") is not None]
        senders = {k.removeprefix("harness_"): _stats([m[k] for m in window if m.get(k) is not None])
                   for k in (window[-1] if window else {}) if k.startswith("harness_") and k != "harness_cpu"}
        offered = result.rates[i] if i < len(result.rates) else phase.rate
        phases.append({
            "phase": phase.name, "offered_eps": offered, "seconds": phase.seconds, "open_loop": phase.open_loop,
            "requests": sum(stats.statuses.values()),
            "answers": {_ANSWER.get(k, str(k)): v for k, v in sorted(stats.statuses.items())},
            "accepted_events": stats.accepted, "saved_events": stats.saved,
            "accepted_eps": round(sum(s.accepted for sec, s in result.seconds.items() if start <= sec < end)
                                  / phase.seconds),
            "stored_eps": round(stored / phase.seconds) if result.subscribed else None,
            "refused_503": stats.statuses.get(503, 0), "no_answer": stats.statuses.get(ERROR, 0),
            "not_sent_behind": stats.statuses.get(BEHIND, 0),
            "ack_latency": percentiles(stats.ack), "event_to_saved": percentiles(stats.e2s),
            "screen_view_to_saved": percentiles(stats.e2s_views),
            "service_cpu": _stats([m["service_cpu"] for m in window if m.get("service_cpu") is not None]),
            "service_main_cpu": _stats([m["service_main_cpu"] for m in window
                                        if m.get("service_main_cpu") is not None]),
            "instances_cpu": [_stats([m["instances_cpu"][i] for m in window if m.get("instances_cpu")
                                      and m["instances_cpu"][i] is not None])
                              for i in range(max((len(m.get("instances_cpu") or []) for m in window), default=0))],
            "valkey_cpu": _stats([m["valkey_cpu"] for m in window if m.get("valkey_cpu") is not None]),
            "service_rss_mb": _rss(svc_rss),
            "service_main_rss_mb": {
                **_rss([(m["t"], m["service_main_rss_mb"]) for m in window
                        if m.get("service_main_rss_mb") is not None]),
                "file_backed_end": next((m["service_main_file_mb"] for m in reversed(window)
                                         if m.get("service_main_file_mb") is not None), None)},
            "redis_used_mb": _stats([m["redis_used_mb"] for m in window if m.get("redis_used_mb") is not None]),
            "backlog": _stats([m["backlog"] for m in window if m.get("backlog") is not None]),
            "harness_cpu": _stats([m["harness_cpu"] for m in window if m.get("harness_cpu") is not None]),
            "harness_processes_cpu": senders,
            "machine_cpu": _stats([m["machine_cpu"] for m in window if m.get("machine_cpu") is not None]),
            "other_cpu": _stats([v for m in window if (v := _other_cpu(m)) is not None]),
        })

    for p in phases:
        p["harness_limit"] = harness_limit(p, os.cpu_count() or 1)
    lag = percentiles(result.lag)
    announced = sum(p.saved for p in result.phases) + result.at_stop.saved
    bottleneck = []
    to_announce = verification["accepted_events_rows"] - verification["held"] if verification else 0
    if result.subscribed and verification is not None and announced < to_announce:
        # the publisher drops notices when its channel is full (best effort, off the delivery
        # path): event-to-saved covers only what was announced
        bottleneck.append(f"event:saved announced {announced:,} of {to_announce:,} stored events: "
                          "latency samples are missing")
    for p in phases:
        bottleneck += [f"{p['phase']}: THE HARNESS IS THE LIMIT: {why}" for why in p["harness_limit"]]
        for name, st in p["harness_processes_cpu"].items():
            if st and st["max"] >= 0.9 and name != "coordinator_cpu":
                bottleneck.append(f"{p['phase']}: harness process {name.removesuffix('_cpu')} used "
                                  f"{st['max']:.2f} of a core")
    if lag.get("p99_ms", 0) > 5:
        bottleneck.append(f"the harness sent late: send lag p99 {lag['p99_ms']} ms")
    if result.ran_dry:
        bottleneck.append(f"{result.ran_dry} lane(s) ran out of pre-generated traffic (raise --max-events)")
    if result.disconnects:
        bottleneck.append(f"the event:saved subscriber lost Redis {len(result.disconnects)} time(s): "
                          "event-to-saved samples are missing")
    for p in phases:
        if p["machine_cpu"] and p["machine_cpu"]["mean"] >= 0.95 * (os.cpu_count() or 1):
            bottleneck.append(f"{p['phase']}: the machine's {os.cpu_count()} cores were busy "
                              f"({p['machine_cpu']['mean']:.2f} on average): harness and service compete")
        if p["other_cpu"] and p["other_cpu"]["mean"] >= 0.2:
            bottleneck.append(f"{p['phase']}: other processes used {p['other_cpu']['mean']:.2f} cores "
                              "(not the service, its Valkey or the harness): the figures share the machine")

    floor_eps = floor.get("events_per_s") if floor and "events_per_s" in floor else None
    max_phases = [p for p in phases if not p["open_loop"]]
    best = max((p["stored_eps"] or 0 for p in max_phases), default=None) if max_phases else None
    if floor is not None and floor_eps and best is not None:
        floor["service_ratio"] = round(best / floor_eps, 3)
    verified = verification is not None and verification["ok"]
    targets: list[dict[str, Any]] = []
    batch: tuple[int, int] = (opts.batch[0], opts.batch[1])
    if max_phases and best is not None:
        long_enough = any(p["seconds"] >= 60 for p in max_phases)
        goal = TARGET_EPS.get(batch)
        if goal is not None:
            targets.append({"target": f"sustained >= {goal:,} events/s end to end for 60 s at {batch[0]}-{batch[1]} "
                                      "events/request, exactly once",
                            "value": best, "met": bool(best >= goal and verified and long_enough),
                            "note": "" if long_enough else "phase shorter than 60 s"})
    report_stages = _cpu_by_stage(result)
    if report_stages:
        stages = report_stages
        per = TARGET_SERVICE_US.get(batch)
        if per is not None:
            unit, limit = per
            value = stages[f"service_us_per_{unit}"]
            targets.append({"target": f"service CPU <= {limit:g} µs per {unit} at {batch[0]}-{batch[1]} events/request",
                            "value": value, "met": value <= limit})
        valkey = TARGET_VALKEY_US.get(batch)
        if valkey is not None and stages.get("valkey_us_per_event") is not None:
            targets.append({"target": f"Valkey CPU <= {valkey:g} µs per event", "value": stages["valkey_us_per_event"],
                            "met": stages["valkey_us_per_event"] <= valkey})
        rate = stages["requests"] / max(stages["window_s"], 1e-9)
        if stages.get("harness_us_per_request") is not None and rate >= HARNESS_TARGET_MIN_RATE:
            targets.append({"target": f"harness senders' CPU <= {TARGET_HARNESS_US_PER_REQUEST:g} µs per request",
                            "value": stages["harness_us_per_request"],
                            "met": stages["harness_us_per_request"] <= TARGET_HARNESS_US_PER_REQUEST})
    for p in phases:
        if p["phase"] == "half" and p["ack_latency"].get("count"):
            targets.append({"target": f"p99 HTTP ack <= {TARGET_ACK_P99_MS:g} ms at half the max rate "
                                      f"({_fmt(p['offered_eps'])} events/s)",
                            "value": p["ack_latency"]["p99_ms"],
                            "met": p["ack_latency"]["p99_ms"] <= TARGET_ACK_P99_MS})
    for p in phases:
        if p["open_loop"] and p["event_to_saved"].get("count"):
            targets.append({"target": f"p99 event-to-saved <= {TARGET_E2S_P99_MS / 1000:g} s at {p['phase']}",
                            "value": p["event_to_saved"]["p99_ms"],
                            "met": p["event_to_saved"]["p99_ms"] <= TARGET_E2S_P99_MS})
    if floor is not None and "service_ratio" in floor:
        targets.append({"target": f">= {TARGET_FLOOR_RATIO:g} of the infrastructure floor (at the service's "
                                  "chunk sizes)",
                        "value": floor["service_ratio"], "met": floor["service_ratio"] >= TARGET_FLOOR_RATIO})
    for p in phases:
        if p["open_loop"] and p["seconds"] >= SOAK_SECONDS and p["service_rss_mb"]:
            rss = p["service_rss_mb"]
            growth = rss.get("growth_pct")
            targets.append({"target": f"service RSS flat over a {p['seconds']:.0f} s soak at {p['phase']} "
                                      f"(growth <= {TARGET_RSS_GROWTH_PCT:g}%)",
                            "value": growth, "met": growth is not None and growth <= TARGET_RSS_GROWTH_PCT,
                            "note": f"% of the last minute's mean over the first minute's (slope "
                                    f"{_fmt(rss.get('slope_mb_per_min'))} MB/min; after the first "
                                    f"{WARMUP_SECONDS // 60} minutes {_fmt(rss.get('after_warmup_growth_pct'))}%)"})

    report: dict[str, Any] = {
        "kind": kind, "run_id": opts.run_id, "url": opts.url, "urls": [opts.url, *opts.urls],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(time.time() - (time.monotonic() - t0))),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "memory_gb": _memory_gb()},
        "settings": {"phases": [p.name + f" for {p.seconds:g}s" for p in opts.phases], "lanes": opts.lanes,
                     "senders": opts.senders, "batch_size": list(opts.batch), "seed": opts.seed,
                     "bots_users": opts.p_bot, "duplicates": opts.p_duplicate, "bad_events": opts.p_bad,
                     "bad_requests": opts.bad_requests, "remap": opts.remap_fraction, "retries": opts.retries,
                     "saved_latency": opts.saved_latency},
        "traffic": {"events": traffic.events, "requests": len(traffic), "lanes": len(traffic.lanes),
                    "generated_in_s": round(traffic.seconds, 2),
                    "generation_eps": round(traffic.events / max(traffic.seconds, 1e-9)),
                    "sent_requests": sum(o[0] != BEHIND for o in result.outcomes.values()),
                    "unsent_requests": result.unsent},
        "phases": phases,
        "retry_after_seconds": {f"{k:g}": v for k, v in sorted(result.retry_after.items())},
        "send_lag": lag,
        "drain_seconds": round(result.drained_at - result.send_end, 2) if result.drained_at else None,
        "saved_at_stop": {"events": result.at_stop.saved, "screen_views": result.at_stop.saved_views},
        "saved_announced": announced if result.subscribed else None,
        "harness_bottleneck": bottleneck,
        "cpu_by_stage": report_stages,
        "verification": verification,
        "floor": floor,
        "targets": targets,
        "notes": result.notes,
        "timeline": timeline,
        **(extra or {}),
    }
    return report


def _memory_gb() -> float | None:
    try:
        import psutil

        return round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:
        return None


def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.2f}{unit}"
    if isinstance(v, int):
        return f"{v:,}{unit}"
    return f"{v}{unit}"


def table(report: dict[str, Any]) -> str:
    """The human summary."""
    out: list[str] = []
    t = report["traffic"]
    more = len(report.get("urls") or [report["url"]]) - 1
    out.append(f"evactors {report['kind']} {report['run_id']} against {report['url']}"
               f"{f' and {more} more instance(s), each request to one at random' if more else ''} on "
               f"{report['machine']['cpus']} cores")
    out.append(f"traffic: {t['events']:,} events / {t['requests']:,} requests generated in {t['generated_in_s']}s "
               f"({t['generation_eps']:,} events/s, before the timed phase); {t['sent_requests']:,} requests sent")
    rows = [("", *[p["phase"] + f" {p['seconds']:g}s" for p in report["phases"]])]

    def add(label: str, fn: Any) -> None:
        rows.append((label, *[fn(p) for p in report["phases"]]))

    add("accepted events/s", lambda p: _fmt(p["accepted_eps"]))
    add("stored events/s (end to end)", lambda p: _fmt(p["stored_eps"]))
    add("attempts (answers)", lambda p: f"{p['requests']:,} " + " ".join(f"{k}:{v}" for k, v in p["answers"].items()))
    for name, key in (("ack", "ack_latency"), ("event-to-saved", "event_to_saved"),
                      ("screen-view-to-saved", "screen_view_to_saved")):
        add(f"{name} p50 / p99 / p99.9 ms", lambda p, key=key: " / ".join(
            _fmt(p[key].get(k)) for k in ("p50_ms", "p99_ms", "p99_9_ms")))
        add(f"{name} max ms", lambda p, key=key: _fmt(p[key].get("max_ms")))
    add("service CPU mean / max (cores)", lambda p: " / ".join(_fmt(p["service_cpu"].get(k)) for k in ("mean", "max")))
    add("  of it the main process (cores)", lambda p: " / ".join(
        _fmt(p.get("service_main_cpu", {}).get(k)) for k in ("mean", "max")))
    if any(p.get("instances_cpu") for p in report["phases"]):
        add("  by instance, mean (cores)", lambda p: " / ".join(
            _fmt(st.get("mean")) for st in p.get("instances_cpu") or []))
        add("  by instance, µs per event it took", lambda p: " / ".join(
            _fmt(round(st["mean"] * 1e6 * len(p["instances_cpu"]) / p["accepted_eps"]))
            if st.get("mean") is not None and p.get("accepted_eps") else "-" for st in p.get("instances_cpu") or []))
    add("valkey CPU mean / max (cores)", lambda p: " / ".join(_fmt(p["valkey_cpu"].get(k)) for k in ("mean", "max")))
    add("service RSS start / end / max MB", lambda p: " / ".join(
        _fmt(p["service_rss_mb"].get(k)) for k in ("start", "end", "max")))
    add("service RSS slope MB/min", lambda p: _fmt(p["service_rss_mb"].get("slope_mb_per_min")))
    add(f"service RSS growth %: last vs first minute / vs minute {WARMUP_SECONDS // 60 + 1}", lambda p: " / ".join(
        _fmt(p["service_rss_mb"].get(k)) for k in ("growth_pct", "after_warmup_growth_pct")))
    add("  main process RSS end / of it file-backed (chDB's library, GeoIP db, …) MB", lambda p: " / ".join(
        _fmt(p.get("service_main_rss_mb", {}).get(k)) for k in ("end", "file_backed_end")))
    add("redis used MB max", lambda p: _fmt(p["redis_used_mb"].get("max")))
    add("backlog max (events)", lambda p: _fmt(p["backlog"].get("max")))
    add("harness CPU mean / max (cores)", lambda p: " / ".join(_fmt(p["harness_cpu"].get(k)) for k in ("mean", "max")))
    add("machine CPU mean (cores)", lambda p: _fmt(p["machine_cpu"].get("mean")))
    add("other processes CPU mean (cores)", lambda p: _fmt(p["other_cpu"].get("mean")))
    add("CPU µs per accepted event: service / valkey / harness / machine", lambda p: " / ".join(
        _fmt(_per_event(p, key)) for key in ("service_cpu", "valkey_cpu", "harness_cpu", "machine_cpu")))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    lag = report["send_lag"]
    out.append(f"send lag (harness late vs schedule) p50 / p99: {_fmt(lag.get('p50_ms'))} / "
               f"{_fmt(lag.get('p99_ms'))} ms"
               + (f"; Retry-After seen: {report['retry_after_seconds']}" if report["retry_after_seconds"] else ""))
    if report["drain_seconds"] is not None:
        out.append(f"drain after sending: {report['drain_seconds']}s")
    v = report["verification"]
    if report["saved_announced"] is not None and v is not None:
        out.append(f"event:saved announced {report['saved_announced']:,} of "
                   f"{v['accepted_events_rows'] - v['held']:,} events stored (event-to-saved is measured on those)")
    if report["saved_at_stop"]["events"]:
        out.append(f"saved by the final flush at stop (held screen views of closed sessions): "
                   f"{report['saved_at_stop']['events']:,}")
    out += _stage_lines(report.get("cpu_by_stage"))
    floor = report["floor"]
    if floor:
        if "error" in floor:
            out.append(f"floor: failed ({floor['error'][-200:]})")
        else:
            out.append(f"floor (Redis XADD + ClickHouse insert of the same {floor['events']:,} events, no processing): "
                       f"{floor['events_per_s']:,} events/s; service at "
                       f"{_fmt(floor.get('service_ratio'))} of it (best max phase, stored events/s)"
                       + (f"; it costs {floor['own_cpu'] * 1e6 / floor['events_per_s']:,.0f} µs of CPU per event"
                          if floor.get("own_cpu") and floor.get("events_per_s") else "")
                       + (f"; other processes used {floor['other_cpu']} cores meanwhile" if floor.get("other_cpu")
                          else ""))
            service = floor.get("service_insert") or {}
            out.append(f"  the floor wrote {floor.get('requests_per_write', 1)} requests per Redis round trip and "
                       f"inserted {_fmt(floor.get('rows_per_insert'))} rows per insert (flush.chunk_rows "
                       f"{_fmt(floor.get('chunk_rows'))}); the service inserted {_fmt(service.get('rows_per_insert'))} "
                       f"rows per insert ({_fmt(service.get('inserts'))} inserts, all tables)")
    out.append("harness bottleneck: " + ("; ".join(report["harness_bottleneck"]) or "none seen"))
    for t_ in report["targets"]:
        out.append(f"target {'MET ' if t_['met'] else 'MISS'}  {t_['target']}: {_fmt(t_['value'])}"
                   + (f" ({t_['note']})" if t_.get("note") else ""))
    for note in report["notes"]:
        out.append(f"note: {note}")
    v = report["verification"]
    if v is None:
        out.append("RESULT: not verified")
    else:
        for c in v["checks"]:
            mark = "skip" if c.get("skipped") else ("ok  " if c["ok"] else "FAIL")
            out.append(f"  [{mark}] {c['check']}: {c['detail']}"
                       + (f" e.g. {', '.join(c['examples'][:3])}" if not c["ok"] and c["examples"] else ""))
        failed = [c["check"] for c in v["checks"] if not c["ok"]]
        out.append(f"RESULT: PASS - {v['accepted']:,} acknowledged events stored exactly once, none of "
                   f"{v['rejected']:,} rejected stored" if not failed else "RESULT: FAIL - " + "; ".join(failed))
    return "\n".join(out)


def _stage_lines(c: dict[str, Any] | None) -> list[str]:
    """The profile of the max phase, in µs of CPU per accepted event."""
    if not c:
        return []
    shares = ", ".join(f"{name} {_fmt(share)}" for name, share in c["sampled_share"].items())
    out = [f"CPU by stage in the max phase, µs per accepted event ({c['window_s']:g} s sampled by py-spy, "
           f"{c['events']:,} events, {c['events_per_request']:g} events/request; share of each process's "
           f"CPU in threads py-spy sampled: {shares}; the rest by thread name, chDB's engine threads):"]
    width = max(len(k) for k in c["stages_us_per_event"]) if c["stages_us_per_event"] else 10
    for stage, us in sorted(c["stages_us_per_event"].items(), key=lambda kv: -kv[1]):
        out.append(f"  {stage.ljust(width)}  {us:>9,.1f}")
    processes = " + ".join(f"{name} {us:,.1f}" for name, us in c["processes_us_per_event"].items())
    out.append(f"  {'service'.ljust(width)}  {c['service_us_per_event']:>9,.1f}  (= measured process CPU: "
               f"{processes}; {c['service_us_per_request']:,.1f} µs per request)")
    if c.get("valkey_us_per_event") is not None:
        top = ", ".join(f"{name} {v['us_per_event']:g} ({v['calls_per_s']:,.0f}/s, {v['usec_per_call']:g} µs each)"
                        for name, v in list(c["valkey_commands"].items())[:5])
        out.append(f"  {'valkey'.ljust(width)}  {c['valkey_us_per_event']:>9,.1f}  (process CPU; by command, "
                   f"in-command time: {top})")
    if c.get("harness_us_per_request") is not None:
        out.append(f"  harness senders: {c['harness_us_per_request']:,.1f} µs per request at "
                   f"{c['requests'] / max(c['window_s'], 1e-9):,.0f} requests/s (with a fixed ~0.01 core per sender "
                   f"process) "
                   f"({c['harness_us_per_event']:,.1f} per event); py-spy itself {c['py_spy_us_per_event']:,.1f} "
                   "per event")
    for error in c.get("errors") or []:
        out.append(f"  profile: {error}")
    return out


def chart(report: dict[str, Any], path: Path) -> None:
    """Throughput, latencies and resources over time, phases marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = report["timeline"]
    t = [r["t"] for r in tl]

    def series(key: str, scale: float = 1.0) -> list[float | None]:
        return [None if r.get(key) is None else r[key] * scale for r in tl]

    fig, axes = plt.subplots(4, 1, figsize=(11, 12), sharex=True)
    ax = axes[0]
    ax.plot(t, series("accepted"), label="accepted events/s")
    ax.plot(t, series("saved"), label="saved events/s (event:saved)")
    ax.plot(t, series("refused_503"), label="503 answers/s", color="red", linewidth=0.8)
    ax.set_ylabel("per second")
    ax.set_title(f"evactors {report['kind']} {report['run_id']} - {', '.join(report['settings']['phases'])}")
    ax = axes[1]
    for key, label in (("ack_p50_ms", "ack p50"), ("ack_p99_ms", "ack p99"), ("ack_p99_9_ms", "ack p99.9")):
        ax.plot(t, series(key), label=label)
    ax.set_yscale("log")
    ax.set_ylabel("HTTP ack latency, ms")
    ax = axes[2]
    for key, label in (("e2s_p50_ms", "event-to-saved p50"), ("e2s_p99_ms", "event-to-saved p99"),
                       ("e2s_views_p99_ms", "screen view-to-saved p99")):
        ax.plot(t, series(key), label=label)
    ax.set_yscale("log")
    ax.set_ylabel("event-to-saved, ms")
    ax = axes[3]
    ax.plot(t, series("service_cpu"), label="service CPU (cores)")
    ax.plot(t, series("valkey_cpu"), label="valkey CPU (cores)")
    ax.plot(t, series("harness_cpu"), label="harness CPU (cores)")
    ax.plot(t, series("other_cpu"), label="other processes (cores)", color="lightgray")
    ax.set_ylabel("cores")
    ax.set_xlabel("seconds since the first phase started")
    right = ax.twinx()
    right.plot(t, series("service_rss_mb"), label="service RSS MB", color="black", linestyle="--")
    right.plot(t, series("redis_used_mb"), label="redis used MB", color="gray", linestyle=":")
    right.set_ylabel("MB")
    right.legend(loc="upper right", fontsize=8)
    start = 0.0
    for phase in report["phases"]:
        for a in axes:
            a.axvline(start, color="gray", linewidth=0.6)
        axes[0].text(start, 1.0, f" {phase['phase']}", transform=axes[0].get_xaxis_transform(), va="top", fontsize=8)
        start += phase["seconds"]
    for a in axes:
        a.grid(True, alpha=0.3)
        a.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def finish_report(result: RunResult, verification: dict[str, Any] | None, floor: dict[str, Any] | None,
                  as_json: bool, kind: str, extra: dict[str, Any] | None = None) -> int:
    """Write report.json and chart.png, print the table (or the JSON); exit 1 when a check failed."""
    report = build(result, verification, floor, kind, extra)
    directory = result.opts.report_dir
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "report.json").write_text(json.dumps(report, indent=1))
        try:
            chart(report, directory / "chart.png")
        except Exception as e:  # a chart is a convenience; the figures are in the JSON
            print(f"chart not drawn: {e}", file=sys.stderr)
    if as_json:
        print(json.dumps(report, indent=1))
    else:
        print(table(report))
        if directory is not None:
            print(f"report: {directory / 'report.json'}  chart: {directory / 'chart.png'}")
    return 0 if verification is None or verification["ok"] else 1
