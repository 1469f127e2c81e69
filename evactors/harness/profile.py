"""CPU by stage: where the service's CPU goes during a max phase.

py-spy samples the service's processes (the main one and its session workers) without
pausing them (``py-spy record --nonblocking --format raw --threads``); each sample's stack is
mapped to a stage (``classify``). Each thread's CPU, measured from ``/proc`` over the same
window, is split over the stages by its samples, so the stages add up to the measured
process CPU; threads py-spy never saw holding Python code (chDB's engine threads) count by
name. Valkey's CPU comes from its process and ``INFO commandstats`` (per command). The
report divides it all by the events accepted in the window (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

STAGES = ("http server", "parse/ingest", "durable log", "enrich", "sessions", "worker link", "flusher/chDB",
          "publisher", "trio run loop", "other")

# Our modules, matched from the innermost frame out: the first that names a stage owns the
# sample (a session actor's Redis call is the session actor's). Modules that serve several
# stages (store/, core/blocks, core/units, core/model) name none.
_OWN = (
    ("evactors/core/segment", "parse/ingest"), ("evactors/core/posthog", "parse/ingest"),
    ("evactors/core/openpanel", "parse/ingest"), ("evactors/core/limits", "parse/ingest"),
    ("evactors/service/http/segment_api", "parse/ingest"), ("evactors/service/http/protocols", "parse/ingest"),
    ("evactors/service/http/rudderstack", "parse/ingest"),
    ("evactors/pipeline/durable_log", "durable log"), ("evactors/pipeline/acker", "durable log"),
    ("evactors/pipeline/replayer", "durable log"), ("evactors/pipeline/inflight", "durable log"),
    ("evactors/pipeline/enricher", "enrich"), ("evactors/enrichment/", "enrich"),
    ("evactors/pipeline/sessions", "sessions"),
    ("evactors/pipeline/session_link", "worker link"), ("evactors/service/session_worker", "worker link"),
    ("evactors/pipeline/flusher", "flusher/chDB"), ("evactors/store/clickhouse", "flusher/chDB"),
    ("evactors/pipeline/publisher", "publisher"), ("evactors/pipeline/live_hub", "publisher"),
    ("evactors/store/live", "publisher"),
    ("evactors/service/http/", "http server"),
)
# Libraries, when no module of ours owns the sample.
_LIBRARIES = (
    ("/hypercorn/", "http server"), ("/h11/", "http server"), ("/httptools/", "http server"),
    ("/clickhouse_connect/", "flusher/chDB"), ("/chdb/", "flusher/chDB"),
    ("/ua_parser/", "enrich"), ("/maxminddb/", "enrich"), ("/geoip2/", "enrich"),
    ("/trio/", "trio run loop"), ("/outcome/", "trio run loop"),
)


def _file(frame: str) -> str:
    """``function (path:line)`` -> ``path`` with forward slashes."""
    at = frame.rfind(" (")
    return frame[at + 2:].rstrip(")").rsplit(":", 1)[0] if at >= 0 else ""


def classify(frames: list[str]) -> str:
    """The stage of one stack (outermost frame first, as py-spy writes them). In the trio
    thread only what runs inside the loop counts (the task's frames): the command line's
    frames around ``trio.run`` are in every sample."""
    loop = next((i for i, f in enumerate(frames) if f.startswith("unrolled_run ")), -1)
    files = [_file(f) for f in reversed(frames[loop + 1:])]
    ours = False
    for path in files:
        if "evactors/" in path:
            ours = True
            for prefix, stage in _OWN:
                if prefix in path:
                    return stage
    if ours:  # a module of ours that is no stage (the supervisor, the backlog, metrics)
        return "other"
    for path in files:
        for part, stage in _LIBRARIES:
            if part in path:
                return stage
    return "trio run loop" if loop >= 0 else "other"


def parse_raw(text: str) -> dict[int, Counter[str]]:
    """py-spy's raw output with ``--threads`` -> samples per stage, per thread id."""
    out: dict[int, Counter[str]] = {}
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        tid = 0
        if frames and frames[0].startswith("thread ("):
            with contextlib.suppress(ValueError):
                tid = int(frames[0][8:frames[0].index(")")], 0)
            frames = frames[1:]
        while frames and frames[0].startswith("process "):  # with --subprocesses
            frames = frames[1:]
        out.setdefault(tid, Counter())[classify(frames)] += int(count)
    return out


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """Each thread's name and CPU seconds so far (Linux ``/proc``)."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                head, _, rest = (task / "stat").read_text().rpartition(")")
                fields = rest.split()
                out[int(task.name)] = (head.partition("(")[2], (int(fields[11]) + int(fields[12])) / ticks)
    return out


def split(samples: dict[int, Counter[str]], before: dict[int, tuple[str, float]],
          after: dict[int, tuple[str, float]], native_stage: str) -> dict[str, Any]:
    """One process: its CPU over the window by stage. A thread's CPU goes to the stages of its
    samples; a thread without samples (native: chDB's engine) to ``native_stage``."""
    stages = dict.fromkeys(STAGES, 0.0)
    cpu, sampled_cpu = 0.0, 0.0
    sample_count = 0
    for tid, (name, end) in after.items():
        used = max(0.0, end - before.get(tid, (name, 0.0))[1])
        cpu += used
        mine = samples.get(tid)
        if mine:
            total = sum(mine.values())
            sample_count += total
            sampled_cpu += used
            for stage, n in mine.items():
                stages[stage] += used * n / total
        else:
            stages[native_stage if not name.startswith("python") else "other"] += used
    return {"cpu_s": round(cpu, 3), "sampled_share": round(sampled_cpu / cpu, 3) if cpu else None,
            "samples": sample_count, "stages_s": {s: round(stages[s], 4) for s in STAGES if stages[s]}}


def commandstats(client: Any) -> dict[str, tuple[int, int]]:
    """Valkey's ``INFO commandstats``: command -> (calls, usec)."""
    info = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for name, v in info.items()}


def _proc_cpu(pid: int) -> float:
    return sum(cpu for _name, cpu in thread_cpu(pid).values())


class Profiler:
    """Samples the service's processes for one window: ``start``, then ``stop`` -> the figures
    (CPU seconds by stage per process, Valkey by command). Without py-spy (or when it cannot
    attach) it still measures each process's CPU, all under ``other``."""

    RATE = 47  # samples per second per process (not a divisor of the kernel's tick): py-spy's own CPU
    # grows with it, on the cores the service uses

    def __init__(self, pids: dict[str, int], valkey_pid: int | None, redis: Any,
                 senders: list[int] | None = None) -> None:
        self.pids, self.valkey_pid, self.redis = pids, valkey_pid, redis
        self.senders = senders or []  # the harness's sender processes: their CPU over the window
        self.senders_before = 0.0
        self.dir = Path(tempfile.mkdtemp(prefix="evactors-profile-"))
        self.spies: dict[str, subprocess.Popen[bytes]] = {}
        self.before: dict[str, dict[int, tuple[str, float]]] = {}
        self.valkey_before = 0.0
        self.commands_before: dict[str, tuple[int, int]] = {}
        self.started = 0.0
        self.error = ""
        self.spy_cpu = 0.0  # py-spy's own CPU seconds: the harness's, not the service's

    @staticmethod
    def py_spy() -> str | None:
        found = shutil.which("py-spy")
        local = Path(sys.executable).parent / "py-spy"
        return str(local) if local.exists() else found

    def start(self) -> None:
        spy = self.py_spy()
        if spy is None:
            self.error = "py-spy not found (pip install py-spy): stages not sampled"
        for name, pid in self.pids.items():
            if spy is not None:
                self.spies[name] = subprocess.Popen(
                    [spy, "record", "--pid", str(pid), "--nonblocking", "--format", "raw", "--threads",
                     "--full-filenames", "--nolineno", "--rate", str(self.RATE),
                     "--output", str(self.dir / f"{name}.txt")],
                    stdout=subprocess.DEVNULL, stderr=open(self.dir / f"{name}.err", "wb"))
        # py-spy takes a moment to attach: the window starts once it samples
        time.sleep(0.3)
        self.started = time.monotonic()
        self.before = {name: thread_cpu(pid) for name, pid in self.pids.items()}
        if self.valkey_pid:
            self.valkey_before = _proc_cpu(self.valkey_pid)
        self.senders_before = sum(_proc_cpu(pid) for pid in self.senders)
        if self.redis is not None:
            with contextlib.suppress(Exception):
                self.commands_before = commandstats(self.redis)

    def stop(self) -> dict[str, Any]:
        after = {name: thread_cpu(pid) for name, pid in self.pids.items()}
        ended = time.monotonic()
        valkey = _proc_cpu(self.valkey_pid) - self.valkey_before if self.valkey_pid else None
        senders = sum(_proc_cpu(pid) for pid in self.senders) - self.senders_before if self.senders else None
        commands: dict[str, tuple[int, int]] = {}
        if self.redis is not None and self.commands_before:
            with contextlib.suppress(Exception):
                now = commandstats(self.redis)
                for name, (calls, usec) in now.items():
                    c0, u0 = self.commands_before.get(name, (0, 0))
                    if calls > c0:
                        commands[name] = (calls - c0, usec - u0)
        processes: dict[str, Any] = {}
        errors = [self.error] if self.error else []
        for name, pid in self.pids.items():
            samples: dict[int, Counter[str]] = {}
            spy = self.spies.get(name)
            if spy is not None:
                with contextlib.suppress(OSError, ValueError, IndexError):
                    fields = Path(f"/proc/{spy.pid}/stat").read_text().rpartition(")")[2].split()
                    self.spy_cpu += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
                spy.send_signal(signal.SIGINT)  # py-spy writes what it sampled and exits
                try:
                    spy.wait(15)
                except subprocess.TimeoutExpired:
                    spy.kill()
                    spy.wait()
                raw = self.dir / f"{name}.txt"
                if raw.exists():
                    samples = parse_raw(raw.read_text(errors="replace"))
                else:
                    errors.append(f"py-spy on {name} ({pid}): "
                                  + (self.dir / f"{name}.err").read_text(errors="replace").strip()[-300:])
            processes[name] = {"pid": pid, **split(samples, self.before[name], after[name],
                                                   "flusher/chDB" if name == "main" else "other")}
        shutil.rmtree(self.dir, ignore_errors=True)
        return {"window_s": round(ended - self.started, 2), "rate_hz": self.RATE, "processes": processes,
                "valkey_cpu_s": round(valkey, 3) if valkey is not None else None,
                "valkey_commands": {k: {"calls": c, "usec": u} for k, (c, u) in sorted(commands.items())},
                "errors": errors, "started": self.started, "ended": ended, "py_spy_cpu_s": round(self.spy_cpu, 3),
                "senders_cpu_s": round(senders, 3) if senders is not None else None}

    def cancel(self) -> None:
        for spy in self.spies.values():
            if spy.poll() is None:
                spy.kill()
                spy.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def per_event(profile: dict[str, Any], events: int, requests: int, harness_cpu_s: float | None) -> dict[str, Any]:
    """The profile in µs per accepted event (and per request): the table of the report."""
    if not events:
        return {}
    stages = dict.fromkeys(STAGES, 0.0)
    cpu = 0.0
    for proc in profile["processes"].values():
        cpu += proc["cpu_s"]
        for stage, s in proc["stages_s"].items():
            stages[stage] += s
    us = 1e6 / events
    out: dict[str, Any] = {
        "events": events, "requests": requests, "events_per_request": round(events / max(requests, 1), 1),
        "stages_us_per_event": {s: round(stages[s] * us, 1) for s in STAGES if stages[s]},
        "service_us_per_event": round(cpu * us, 1),
        "service_us_per_request": round(cpu * 1e6 / max(requests, 1), 1),
        "sampled_share": {name: p["sampled_share"] for name, p in profile["processes"].items()},
        "processes_us_per_event": {name: round(p["cpu_s"] * us, 1) for name, p in profile["processes"].items()},
    }
    if profile.get("valkey_cpu_s") is not None:
        out["valkey_us_per_event"] = round(profile["valkey_cpu_s"] * us, 1)
    commands = profile.get("valkey_commands") or {}
    out["valkey_commands"] = {
        name: {"calls_per_s": round(c["calls"] / max(profile["window_s"], 1e-9), 1),
               "usec_per_call": round(c["usec"] / c["calls"], 1), "us_per_event": round(c["usec"] / events, 2)}
        for name, c in sorted(commands.items(), key=lambda kv: -kv[1]["usec"]) if c["calls"]}
    if harness_cpu_s is not None:
        out["harness_us_per_request"] = round(harness_cpu_s * 1e6 / max(requests, 1), 1)
        out["harness_us_per_event"] = round(harness_cpu_s * us, 1)
    return out
