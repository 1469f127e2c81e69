"""The load harness itself (short runs): its verification passes on a clean run and fails
when ClickHouse holds one event too few, one too many, or one it refused; ``bench`` runs end
to end (service, traffic, stop, exactly-once and oracle checks, floor, report)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

from conftest import BIN, Service
from evactors.harness.loadtest import LoadTest
from evactors.harness.report import build, percentiles, table
from evactors.harness.run import ERROR, MALFORMED, PLAIN, Options, Phase, RunResult, Traffic
from evactors.harness.verify import AdminReader, expectations, verify


def _run(service: Service, tmp_path: Path, seconds: float = 3.0, rate: float = 1500) -> RunResult:
    opts = Options(url=service.url, write_key="key-a", project="project-a", phases=[Phase(rate, seconds)],
                   lanes=6, senders=1, batch=(5, 40), data_dir=service.data_dir, report_dir=tmp_path / "report",
                   progress=False, p_bad=0.01, bad_requests=0.02, run_id="t1")
    test = LoadTest(opts, say=lambda _text: None)
    try:
        test.prepare()
        test.run()
        test.drain()
        return test.finish()
    finally:
        test.close()


def _ids(result: RunResult, kind: str, statuses: tuple[int, ...]) -> list[str]:
    t = result.traffic
    return [mid for r, (status, _a, _rej) in sorted(result.outcomes.items())
            if status in statuses and t.flags[r] == PLAIN for k, mid in zip(t.kinds[r], t.ids[r], strict=True)
            if k == kind]


def _failed(verification: dict[str, Any]) -> dict[str, list[str]]:
    return {c["check"]: c["examples"] for c in verification["checks"] if not c["ok"]}


def test_verification_passes_clean_and_names_a_missing_a_doubled_and_a_rejected_event(
        make_service: Any, tmp_path: Path) -> None:
    service = make_service().start()
    result = _run(service, tmp_path)
    answers = Counter(status for status, _a, _r in result.outcomes.values())
    assert answers[200] > 20 and answers[400] > 0, answers  # batches with invalid messages, broken requests
    assert answers[ERROR] == 0 and answers[503] == 0
    reader = AdminReader(service.admin, (service.data_dir / "admin.token").read_text().strip())

    clean = verify(result, reader, sessions_closed=False)
    assert clean["ok"], clean
    assert clean["accepted"] > 500 and clean["rejected"] > 0

    report = build(result, clean, None, "loadtest")
    phase = report["phases"][0]
    assert phase["accepted_events"] > 500 and phase["ack_latency"]["count"] == len(result.outcomes)
    assert phase["event_to_saved"]["count"] > 0  # followed on event:saved
    assert phase["service_cpu"]["max"] > 0 and phase["service_rss_mb"]["max"] > 50
    assert "RESULT: PASS" in table(report)

    # Now ClickHouse loses one acknowledged event, doubles another, and holds a refused one.
    tracks = _ids(result, "o", (200,))
    lost, doubled = tracks[3], tracks[7]
    refused = _ids(result, "x", (400,))[0]  # an invalid message of a batch answered 400
    service.query(f"DELETE FROM evactors.events WHERE message_id = '{lost}'")
    service.query(f"INSERT INTO evactors.events SELECT * FROM evactors.events WHERE message_id = '{doubled}' "
                  "SETTINGS insert_deduplicate = 0")
    service.query(f"INSERT INTO evactors.events SELECT * REPLACE ('{refused}' AS message_id) FROM "  # (a subquery:
                  f"(SELECT * FROM evactors.events WHERE message_id = '{tracks[9]}') "  # the alias would shadow)
                  "SETTINGS insert_deduplicate = 0")
    broken = verify(result, reader, sessions_closed=False)
    assert not broken["ok"]
    assert _failed(broken) == {"accepted events stored (none missing)": [lost],
                               "stored once (none doubled)": [doubled],
                               "rejected events not stored": [refused]}
    text = table(build(result, broken, None, "loadtest"))
    assert "RESULT: FAIL" in text and lost in text

    # The command line on the same service: its own run id, so the rows above do not count.
    proc = subprocess.run(
        [str(BIN), "loadtest", "--url", service.url, "--write-key", "key-a", "--project", "project-a",
         "--data-dir", str(service.data_dir), "--rate", "800", "--duration", "2", "--connections", "4",
         "--senders", "1", "--report-dir", str(tmp_path / "cli"), "--json", "--no-progress"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    cli = json.loads(proc.stdout)
    assert cli["verification"]["ok"] and cli["verification"]["accepted"] > 100
    assert cli["run_id"] != result.opts.run_id and (tmp_path / "cli" / "chart.png").exists()


def test_percentiles_agree_with_the_histograms_own_queries() -> None:
    """The report's vectorized percentiles and mean give what hdrh's (slow) queries give."""
    import random

    from evactors.harness.run import new_hist as histogram

    rng = random.Random(5)
    for size in (1, 7, 3_000):
        h = histogram()
        for _ in range(size):  # sub-ms acks and multi-second queueing in one histogram
            h.record_value(rng.choice((rng.randint(1, 3_000), rng.randint(100, 30_000_000))))
        got = percentiles(h)
        assert got == {"count": size, **{
            name: round(h.get_value_at_percentile(p) / 1000, 2)
            for name, p in (("p50_ms", 50), ("p90_ms", 90), ("p99_ms", 99), ("p99_9_ms", 99.9))},
            "max_ms": round(h.get_max_value() / 1000, 2), "mean_ms": round(h.get_mean_value() / 1000, 2)}
    assert percentiles(histogram()) == {"count": 0}


def test_rss_growth_is_the_last_minute_over_the_first_and_after_the_warm_up() -> None:
    from evactors.harness.report import _rss

    # 10 minutes, one sample a second: 400 MB rising to 600 MB over 3 minutes, then flat
    warm = [(float(t), 400 + 200 * min(t, 180) / 180) for t in range(600)]
    got = _rss(warm)
    assert got["start"] == 400 and got["end"] == 600 and got["max"] == 600
    assert 35 < got["growth_pct"] < 45 and got["after_warmup_growth_pct"] == 0.0
    leak = [(float(t), 400 + t / 6) for t in range(600)]  # 10 MB a minute, all along
    got = _rss(leak)
    assert got["slope_mb_per_min"] == 10.0 and 13 < got["after_warmup_growth_pct"] < 15
    assert _rss(leak[:119])["growth_pct"] is None  # under 2 minutes: no growth figure
    assert _rss(leak[:120])["growth_pct"] is not None  # a 120 s phase: samples 0..119
    assert _rss([]) == {}


def test_answers_decide_what_is_expected() -> None:
    """From the answers alone: a 200 stores all, a 400 invalid_events all but the refused
    indices, a 503 after the last retry nothing, no answer at most once, a malformed body
    nothing; a duplicate is expected once, in the table of its first send."""
    t = Traffic()
    for body, kinds, ids, flag in ((b"{}", "ovb", ("a", "b", "c"), PLAIN),
                                   (b"{}", "oxo", ("d", "e", "f"), PLAIN),
                                   (b"{}", "oo", ("g", "h"), PLAIN),
                                   (b"{}", "od", ("i", "a"), PLAIN),
                                   (b"{}", "o", ("j",), MALFORMED)):
        t.bodies.append(body)
        t.kinds.append(kinds)
        t.ids.append(ids)
        t.flags.append(flag)
        t.messages.append(len(ids))
    opts = Options(url="", write_key="k", phases=[Phase(1, 1)], run_id="x")
    outcomes = {0: (200, 1, None), 1: (400, 1, [1]), 2: (503, 6, None), 3: (ERROR, 6, None), 4: (400, 1, None)}
    result = RunResult(opts, t, 0.0, [0.0], [], {}, outcomes, None, Counter(), [])  # type: ignore[arg-type]
    exp = expectations(result)
    assert exp.accepted == {"a", "b", "c", "d", "f"}
    assert {m: exp.table[m] for m in exp.accepted} == {"a": "events", "b": "events", "c": "events_bots",
                                                       "d": "events", "f": "events"}
    assert exp.unknown == {"i"}
    assert exp.rejected() == {"e", "g", "h", "j"}
    assert not exp.findings

    outcomes[1] = (400, 1, [0])  # the service refused a valid message and kept the invalid one
    assert set(expectations(result).findings) == {"validation disagrees with the generator"}


def test_bench_runs_end_to_end(tmp_path: Path) -> None:
    report_dir = tmp_path / "bench"
    proc = subprocess.run(
        [str(BIN), "bench", "--phase", "1200:3", "--phase", "max:3", "--phase", "half:2", "--max-events", "60000",
         "--connections", "6",
         "--senders", "1", "--report-dir", str(report_dir), "--json", "--no-progress"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    report = json.loads(proc.stdout)
    assert json.loads((report_dir / "report.json").read_text())["run_id"] == report["run_id"]
    assert (report_dir / "chart.png").stat().st_size > 10_000
    assert not (report_dir / "data").exists()  # the fresh data dir is removed afterwards
    checks = {c["check"]: c for c in report["verification"]["checks"]}
    assert all(c["ok"] for c in checks.values()), checks
    sessions = checks["sessions match the oracle"]
    assert not sessions.get("skipped") and "0 difference(s)" in sessions["detail"]
    assert [p["phase"] for p in report["phases"]] == ["1200/s", "max", "half"]
    assert all(p["accepted_events"] > 0 and p["ack_latency"]["count"] > 0 for p in report["phases"]), \
        [(p["phase"], p["offered_eps"], p["accepted_events"], p["answers"]) for p in report["phases"]]
    _rate, top, half = report["phases"]
    base = top["accepted_events"] / top["seconds"]  # every answer to the max phase's requests, per second
    assert 0.4 * base <= half["offered_eps"] <= 0.6 * base, (base, half["offered_eps"])  # (exact but for a slow lane)
    assert any(t["target"].startswith("p99 HTTP ack <= 50 ms at half the max rate") for t in report["targets"])
    assert report["service_exit"] == 0
    # CPU by stage in the max phase: py-spy's stages add up to the service's measured CPU
    stages = report["cpu_by_stage"]
    assert stages and not stages["errors"] and stages["events"] > 0, stages
    assert len(stages["stages_us_per_event"]) >= 3 and stages["sampled_share"]["main"] > 0.3, stages
    assert abs(sum(stages["stages_us_per_event"].values()) - stages["service_us_per_event"]) \
        <= 0.01 * stages["service_us_per_event"] + 1
    assert stages["valkey_us_per_event"] > 0 and stages["valkey_commands"] and stages["harness_us_per_request"] > 0, \
        stages
    floor = report["floor"]
    assert floor["stored"] == floor["events"] > 1000 and floor["events_per_s"] > 0
    assert 0 < floor["service_ratio"]
    # the floor as the service at its best: its chunk size, one round trip per connection's request
    assert 5 < floor["requests_per_write"] <= 6 and floor["chunk_rows"] >= floor["rows_per_insert"] > 0, floor
    assert floor["service_insert"]["inserts"] > 0 and floor["service_insert"]["rows_per_insert"] > 0, floor


def test_bench_stopped_by_sigterm_stops_its_service(tmp_path: Path) -> None:
    """A bench ended by SIGTERM (a CI timeout, a supervisor) takes its service, the service's Valkey
    and session worker, and its own sender processes with it."""
    report_dir = tmp_path / "bench"
    bench = subprocess.Popen(
        [str(BIN), "bench", "--phase", "300:120", "--no-floor", "--connections", "2", "--senders", "1",
         "--report-dir", str(report_dir), "--no-progress"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    service_json = report_dir / "data" / "service.json"
    valkey_pid_file = report_dir / "data" / "redis" / "valkey.pid"
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not (service_json.exists() and valkey_pid_file.exists()) and time.monotonic() < deadline:
            assert bench.poll() is None, "bench ended before its service started"
            time.sleep(0.2)
        time.sleep(4)  # the senders start 1.5 s after the service: now they are sending
        service_pid = json.loads(service_json.read_text())["pid"]
        valkey_pid = int(valkey_pid_file.read_text())
        harness = set(_children(bench.pid)) - {service_pid}  # its senders and subscriber
        pids = sorted({service_pid, valkey_pid, *_children(service_pid), *harness})
        assert [p for p in _children(service_pid) if p != valkey_pid], "no session worker"
        assert harness, "no sender processes"
        assert all(_alive(pid) for pid in pids)
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in pids if _alive(pid)]
    finally:
        bench.kill()
        bench.wait()
        for pid in pids:  # whatever a failure left behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited; its parent has not reaped it yet


def test_fixed_request_sizes_hold_with_duplicates_and_invalid_messages() -> None:
    """--batch-size 1 and 100: every plain request carries exactly that many messages (a lane's
    last may carry fewer), resent duplicates and invalid messages included."""
    from evactors.harness.run import prepare

    for size in (1, 100):
        opts = Options(url="", write_key="k", phases=[Phase(2000, 10)], batch=(size, size), run_id="fx", lanes=3,
                       p_duplicate=0.05, p_bad=0.02)
        t = prepare(opts)
        for first, count in t.lanes:
            sizes = [t.messages[r] for r in range(first, first + count) if t.flags[r] == PLAIN]
            assert sizes and all(n == size for n in sizes[:-1]) and 1 <= sizes[-1] <= size, (size, Counter(sizes))
        kinds = Counter("".join(t.kinds))
        assert kinds["d"] > 0 and kinds["x"] > 0  # duplicates and invalid messages are there
