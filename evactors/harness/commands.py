"""``bin/evactors loadtest`` and ``bin/evactors bench``: their arguments, the bench's own
service, the infrastructure floor, then verification and the report."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from evactors.harness import loadtest
from evactors.harness.loadtest import BenchService, LoadTest
from evactors.harness.run import MAX_GUESS_EPS, PLAIN, ROOT, Options, Phase, RunResult, parse_phase, parse_range
from evactors.store.paths import DataDir


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("traffic")
    g.add_argument("--users", type=int, help="distinct users over all lanes (default: enough for the run)")
    g.add_argument("--batch-size", type=parse_range, default=(10, 100), metavar="MIN-MAX",
                   help="messages per request, drawn uniformly (default 10-100; browser SDKs send 1-20)")
    g.add_argument("--seed", type=int, default=1)
    g.add_argument("--bots", type=float, default=0.2, metavar="P",
                   help="share of users that are crawlers (default 0.2: about 5%% of events)")
    g.add_argument("--duplicates", type=float, default=0.01, metavar="P", help="resent messages (default 0.01)")
    g.add_argument("--bad-events", type=float, default=0.001, metavar="P",
                   help="invalid messages inside batches (default 0.001)")
    g.add_argument("--bad-requests", type=float, default=0.001, metavar="P",
                   help="malformed bodies and unknown write keys (default 0.001)")
    g.add_argument("--remap", type=float, default=0.0, metavar="P",
                   help="users re-mapped between visits via /admin/remap (needs the admin token)")
    g.add_argument("--max-events", type=int, help="events pre-generated for the max phases "
                   f"(default {MAX_GUESS_EPS:,} per second)")
    s = p.add_argument_group("senders")
    s.add_argument("--connections", type=int, default=32, help="lanes: connections, each one sequential "
                   "SDK-like sender with its own users (default 32)")
    s.add_argument("--senders", type=int, default=1, help="sender processes (default 1: a lean sender "
                   "takes ~15,000 requests/s on a free core)")
    s.add_argument("--retries", type=int, default=5, help="retries of a request after 503 or no answer")
    s.add_argument("--timeout", type=float, default=30.0, help="seconds per HTTP request")
    s.add_argument("--no-saved-latency", action="store_true",
                   help="do not subscribe to event:saved (the service then skips encoding its notices)")
    r = p.add_argument_group("report")
    r.add_argument("--report-dir", type=Path, help="where report.json and chart.png go "
                   "(default bench-results/<time>)")
    r.add_argument("--no-profile", action="store_true", help="do not sample the service with py-spy in the "
                   "max phase (CPU by stage)")
    r.add_argument("--json", action="store_true", help="print the JSON report on stdout instead of the table")
    r.add_argument("--no-progress", action="store_true")


def _check_half(phases: list[Phase]) -> None:
    for i, phase in enumerate(phases):
        if phase.half and not any(not p.open_loop for p in phases[:i]):
            raise SystemExit("a half phase needs a max phase before it (e.g. --phase max:20 --phase half:20)")


def _phases(args: argparse.Namespace, default_rate: float | None) -> list[Phase]:
    if args.phase:
        _check_half(list(args.phase))
        return list(args.phase)
    if args.max:
        return [Phase(None, args.duration)]
    return [Phase(args.rate if args.rate else default_rate, args.duration)]


def _options(args: argparse.Namespace, phases: list[Phase], **kw: Any) -> Options:
    return Options(phases=phases, users=args.users, batch=args.batch_size, seed=args.seed,
                   p_bot=args.bots, p_duplicate=args.duplicates, p_bad=args.bad_events,
                   bad_requests=args.bad_requests, remap_fraction=args.remap, max_events=args.max_events,
                   lanes=args.connections, senders=args.senders, retries=args.retries, timeout=args.timeout,
                   saved_latency=not args.no_saved_latency, progress=not args.no_progress,
                   profile=not args.no_profile,
                   report_dir=args.report_dir or default_report_dir(), **kw)


def default_report_dir() -> Path:
    return Path("bench-results") / time.strftime("%Y%m%d-%H%M%S")


def loadtest_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evactors loadtest", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Send realistic Segment traffic to a running evactors (or any Segment-compatible "
        "endpoint) at a fixed rate or at max, measure it, and verify what was stored. Traffic goes to "
        "the given URL only: use it on 127.0.0.1.\n\n" + (loadtest.__doc__ or "").split("\n\n", 1)[1])
    p.add_argument("--url", required=True, action="append", help="the service's base URL, e.g. "
                   "http://127.0.0.1:8080; repeated: instances of one service (one Redis), each request "
                   "to one at random; the first is the one --data-dir and verification go with")
    p.add_argument("--instance-data-dir", type=Path, action="append", default=[], metavar="DIR",
                   help="another instance's data dir (repeatable): its CPU, apart and in the total")
    p.add_argument("--write-key", required=True)
    p.add_argument("--project", help="the write key's project (scopes the checks; needed for --remap)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--rate", type=float, help="events/s, open loop (default 1000)")
    mode.add_argument("--max", action="store_true", help="closed loop, as fast as it answers")
    mode.add_argument("--phase", type=parse_phase, action="append", metavar="RATE:S|max:S|half:S",
                      help="a phase (repeatable), e.g. --phase 25000:20 --phase max:20 --phase half:20")
    p.add_argument("--duration", type=float, default=20.0, help="seconds (default 20)")
    svc = p.add_argument_group("the service (for CPU/RSS, Redis, backlog and verification)")
    svc.add_argument("--data-dir", type=Path, help="its data dir: service.json (pid), admin.token, "
                     "embedded Valkey socket")
    svc.add_argument("--redis-url", help="its Redis, when not the embedded one")
    svc.add_argument("--redis-prefix", default="evx")
    svc.add_argument("--clickhouse-dsn", help="read its ClickHouse directly instead of /admin/query")
    svc.add_argument("--database", default="evactors")
    svc.add_argument("--pid", type=int, help="its process id (default: from DATA/service.json)")
    svc.add_argument("--no-verify", action="store_true", help="measure only")
    svc.add_argument("--drain-timeout", type=float, default=180.0)
    p.add_argument("--floor", action="store_true", help="also measure the bare Redis + ClickHouse cost of the "
                   "same events (embedded, in a temporary dir) and print the throughput as a ratio of it")
    p.add_argument("--run-id", default="", help="prefix of every id (default: from the time); ids must not "
                   "repeat across runs on one service (its dedup window is 24 h)")
    _common(p)
    return p


def bench_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evactors bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Start a service on embedded defaults (a fresh data dir, sessions closed at shutdown), "
        "run the load harness against it, stop it, verify exactly-once and sessions, measure the "
        "infrastructure floor, and write the report. Default: max for --duration seconds (throughput, "
        "CPU by stage), then half that max's accepted rate for --duration seconds (latency).")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--rate", type=float, help="one phase at this rate only")
    mode.add_argument("--max", action="store_true", help="one phase at max only")
    mode.add_argument("--phase", type=parse_phase, action="append", metavar="RATE:S|max:S|half:S",
                      help="phases (repeatable); default max:D then half:D (open loop at half the max "
                      "phase's accepted rate: latency at a load the service keeps up with)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per phase (default 20)")
    p.add_argument("--data-dir", type=Path, help="the service's data dir (default: a fresh one in the "
                   "report dir, removed afterwards unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the data dir")
    p.add_argument("--no-floor", action="store_true", help="skip the infrastructure floor")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for the service (e.g. EVACTORS_PIPELINE_ENRICHERS=2)")
    p.add_argument("--instances", type=int, default=1, metavar="N",
                   help="run N instances of the service on one Redis (the first's embedded Valkey; the others "
                   "--role ingest,sessions), each request to one at random; CPU is shown per instance")
    p.add_argument("--valkey-cluster", action="store_true",
                   help="run the instances on a local Valkey cluster (3 masters, 3 replicas, in the report dir) "
                   "instead of the first's embedded Valkey; Valkey CPU is then the six servers'")
    p.add_argument("--service-bin", type=Path, metavar="PATH",
                   help="the bin/evactors to run as the service (default: this checkout's); another "
                   "checkout's, set up with bin/setup, measures before and after with the same harness")
    _common(p)
    return p


def main_loadtest(argv: list[str]) -> int:
    from evactors.harness.report import finish_report

    args = loadtest_parser().parse_args(argv)
    opts = _options(args, _phases(args, 1000.0), url=args.url[0], urls=args.url[1:],
                    instance_dirs=args.instance_data_dir, write_key=args.write_key, project=args.project,
                    run_id=args.run_id, data_dir=args.data_dir, redis_url=args.redis_url,
                    redis_prefix=args.redis_prefix, clickhouse_dsn=args.clickhouse_dsn, database=args.database,
                    pid=args.pid, drain_timeout=args.drain_timeout, verify=not args.no_verify)
    if opts.data_dir is None and opts.redis_url is None and opts.saved_latency:
        opts = replace(opts, saved_latency=False)  # no Redis to follow event:saved on
    test = LoadTest(opts)
    try:
        test.prepare()
        test.run()
        test.drain()
        result = test.finish()
    finally:
        test.close()
    verification = None
    if opts.verify:
        from evactors.harness.verify import reader_for_running, verify

        reader = reader_for_running(opts)
        if reader is None:
            test.say("verification skipped: give --data-dir (admin token) or --clickhouse-dsn")
        else:
            verification = verify(result, reader, sessions_closed=False)
    floor = run_floor(result, opts.report_dir) if args.floor else None
    return finish_report(result, verification, floor, as_json=args.json, kind="loadtest")


def _exit_on_sigterm(owner: int) -> Callable[[int, Any], None]:
    """A SIGTERM handler: in ``owner``, unwind like Ctrl-C (once: a second SIGTERM does not cut
    the clean-up short); in a forked child (a sender, the subscriber), die as before."""
    def handler(signum: int, _frame: Any) -> None:
        if os.getpid() != owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        signal.signal(signum, signal.SIG_IGN)
        raise SystemExit(128 + signum)
    return handler


def main_bench(argv: list[str]) -> int:
    import shutil

    from evactors.harness.report import finish_report
    from evactors.harness.verify import LocalReader, verify

    args = bench_parser().parse_args(argv)
    phases = list(args.phase) if args.phase else (
        [Phase(None, args.duration)] if args.max else [Phase(args.rate, args.duration)] if args.rate else
        [Phase(None, args.duration), Phase(None, args.duration, half=True)])
    _check_half(phases)
    report_dir = (args.report_dir or default_report_dir()).resolve()
    report_dir.mkdir(parents=True, exist_ok=True)
    data_dir = (args.data_dir or report_dir / "data").resolve()
    if data_dir.exists() and any(data_dir.iterdir()):
        raise SystemExit(f"{data_dir} is not empty: bench needs a fresh data dir")
    env = dict(e.partition("=")[::2] for e in args.env)
    service_bin = args.service_bin.resolve() if args.service_bin else None
    cluster = None
    if args.valkey_cluster:
        from evactors.harness.valkey_cluster import LocalValkeyCluster

        cluster = LocalValkeyCluster(report_dir / "cluster")
        cluster.start()
        env = {"EVACTORS_REDIS_URL": cluster.url, **env}
    service = BenchService(data_dir, "bench-key", "bench", env, service_bin)
    # more instances: on the first one's Valkey (or the cluster), taking requests and shards, not flushing
    others = [BenchService(report_dir / f"data-{i + 2}", "bench-key", "bench", {
        "EVACTORS_REDIS_URL": f"unix://{DataDir(data_dir).valkey_socket}", **env,
        "EVACTORS_ROLES": "ingest,sessions"}, service_bin) for i in range(max(0, args.instances - 1))]
    # SIGTERM (a timeout, a supervisor) unwinds like Ctrl-C, so the service is stopped, not orphaned.
    signal.signal(signal.SIGTERM, _exit_on_sigterm(os.getpid()))
    opts = _options(args, phases, url="", write_key="bench-key", project="bench", run_id=f"b{args.seed}",
                    data_dir=data_dir)
    if cluster is not None:
        opts = replace(opts, redis_url=cluster.url, redis_pids=[n.pid for n in cluster.nodes() if n.pid],
                       redis_lanes=int(env.get("EVACTORS_REDIS_INGEST_LANES", 16)))
    opts = replace(opts, report_dir=report_dir)
    test = LoadTest(opts)
    say = test.say
    result_notes: list[str] = []
    try:
        test.prepare()  # before the service starts: generation does not share the cores with it
        say(f"starting the service (data in {data_dir}) ...")
        service.start()
        for other in others:
            other.start()
        if others:
            say(f"{len(others)} more instance(s): {', '.join(o.url for o in others)}")
            time.sleep(5)  # the shards spread over the instances (a third of a lease apart)
        test.opts = opts = replace(opts, url=service.url, urls=[o.url for o in others],
                                   instance_dirs=[o.data_dir for o in others])
        test.run()
        say("sending done; waiting for the service to drain ...")
        test.drain()
        test.mark_stop()
        say("stopping the service (SIGTERM: it drains and closes its sessions) ...")
        stopped = time.monotonic()
        for other in others:  # first: their shards go back to the first, which flushes them
            other_code = other.stop()
            if other_code != 0:
                result_notes.append(f"instance {other.url} exited {other_code}; see {other.log_path}")
        code = service.stop()
        result = test.finish(wait=0.5)
        result.notes.append(f"service stop took {time.monotonic() - stopped:.1f}s, exit {code}")
        if "drain deadline" in service.log_path.read_text(errors="replace"):
            result.notes.append("the stop reached its drain deadline: what it had not finished stays "
                                "durable in Redis (a restart finishes it) and is not in ClickHouse yet")
        if code != 0:
            result.notes.append(f"the service exited {code} (expected 0); see {service.log_path}")
        result.notes += result_notes
    finally:
        for other in others:
            other.kill()
        service.kill()  # first: cheap, and a no-op after a clean stop
        test.close()
        if cluster is not None:
            cluster.stop()
    say("verifying ...")
    reader = LocalReader(data_dir, opts.database)
    try:
        verification = verify(result, reader, sessions_closed=True)
    finally:
        reader.close()
    floor = None if args.no_floor else run_floor(result, report_dir, env)
    status = finish_report(result, verification, floor, as_json=args.json, kind="bench",
                           extra={"service_log": str(service.log_path), "service_exit": code})
    if not args.keep and args.data_dir is None:
        shutil.rmtree(data_dir, ignore_errors=True)
    return status


FLOOR_MIN_EVENTS = 200_000  # fewer, and the fixed cost of each insert would weigh on the figure


def run_floor(result: RunResult, report_dir: Path | None, env: dict[str, str] | None = None) -> dict[str, Any] | None:
    """The infrastructure floor in its own process (chDB allows one engine per process):
    the requests this run got a 200 for (topped up with generated requests it did not send,
    up to FLOOR_MIN_EVENTS), written to Redis and inserted into ClickHouse as the service
    would at its best: its settings (``env``: the service's), its group commit."""
    traffic = result.traffic
    accepted = [r for r, (status, _a, _rej) in sorted(result.outcomes.items())
                if status == 200 and traffic.flags[r] == PLAIN]
    events = sum(traffic.messages[r] for r in accepted)
    for r in range(len(traffic)):
        if events >= FLOOR_MIN_EVENTS:
            break
        if r not in result.outcomes and traffic.flags[r] == PLAIN:
            accepted.append(r)
            events += traffic.messages[r]
    bodies = [(traffic.bodies[r], traffic.messages[r]) for r in accepted]
    if not bodies:
        return None
    with tempfile.TemporaryDirectory(prefix="evactors-floor-") as tmp:
        spool = Path(tmp) / "requests.bin"
        with open(spool, "wb") as f:
            for body, n in bodies:
                f.write(len(body).to_bytes(4, "little") + n.to_bytes(4, "little") + body)
        out = Path(tmp) / "floor.json"
        print("measuring the infrastructure floor (Redis + ClickHouse, no processing) ...", file=sys.stderr)
        from evactors.pipeline.durable_log import DurableLog

        group = min(result.opts.lanes, DurableLog.MAX_GROUP)  # at most one request per connection waits
        proc = subprocess.run([sys.executable, "-m", "evactors.harness.floor", str(spool), str(out),
                               "--project", result.opts.project or "floor", "--group", str(group),
                               "--group-bytes", str(DurableLog.MAX_GROUP_BYTES)],
                              cwd=tmp, env={**os.environ, **(env or {}),
                              "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")},
                              capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            print(f"floor failed: {proc.stderr[-2000:]}", file=sys.stderr)
            return {"error": proc.stderr[-2000:]}
        floor: dict[str, Any] = json.loads(out.read_text())
        floor["service_insert"] = result.service_inserts
        return floor
