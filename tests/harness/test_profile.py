"""CPU by stage: stacks map to the stage that owns them, py-spy's samples of a real process
split its measured CPU (they add up to it), and the report says when the harness, not the
service, is the limit."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter

from hdrh.histogram import HdrHistogram

from evactors.harness.profile import STAGES, Profiler, classify, parse_raw, per_event
from evactors.harness.report import build, harness_limit, table
from evactors.harness.run import Options, Phase, RunResult, Second, Traffic

SITE = "/venv/lib/python3.11/site-packages"
SRC = "/src/evactors"


def _f(function: str, path: str) -> str:
    return f"{function} ({path})"


def test_known_stacks_map_to_their_stage() -> None:
    # the command line's frames around trio.run are in every sample of the loop's thread
    run = [_f("<module>", f"{SRC}/cli/__main__.py"), _f("main", f"{SRC}/service/startup.py"),
           _f("run", f"{SITE}/trio/_core/_run.py"), _f("unrolled_run", f"{SITE}/trio/_core/_run.py")]
    http = [*run, _f("handle", f"{SITE}/hypercorn/protocol/http_stream.py")]
    assert classify([*run, _f("get_events", f"{SITE}/trio/_core/_io_epoll.py")]) == "trio run loop"
    assert classify([*http, _f("next_event", f"{SITE}/h11/_connection.py")]) == "http server"
    assert classify([*http, _f("__call__", f"{SRC}/service/http/app.py")]) == "http server"
    # the innermost module of ours owns the sample: the handler's parse, its durable write
    api = [*http, _f("__call__", f"{SRC}/service/http/app.py"), _f("store", f"{SRC}/service/http/segment_api.py")]
    assert classify(api) == "parse/ingest"
    assert classify([*api, _f("parse", f"{SRC}/core/segment.py"), _f("decode", f"{SITE}/msgspec/json.py")]) \
        == "parse/ingest"
    assert classify([*api, _f("append", f"{SRC}/pipeline/durable_log.py"), _f("execute", f"{SRC}/store/resp.py")]) \
        == "durable log"
    # store/ and core/blocks serve several stages: their caller decides
    assert classify([*run, _f("run", f"{SRC}/pipeline/sessions.py"), _f("commit", f"{SRC}/store/resp.py")]) \
        == "sessions"
    assert classify([*run, _f("run", f"{SRC}/pipeline/sessions.py"), _f("encode_block", f"{SRC}/core/blocks.py")]) \
        == "sessions"
    assert classify([*run, _f("run", f"{SRC}/pipeline/enricher.py"), _f("parse", f"{SRC}/enrichment/useragent.py"),
                     _f("__call__", f"{SITE}/ua_parser/re2.py")]) == "enrich"
    thread = [_f("_bootstrap", "/usr/lib/python3.11/threading.py"), _f("worker", f"{SITE}/trio/_core/_thread_cache.py")]
    assert classify([*thread, _f("insert_sync", f"{SRC}/store/clickhouse.py"),
                     _f("insert", f"{SITE}/clickhouse_connect/driver/client.py")]) == "flusher/chDB"
    assert classify([*thread, _f("query", f"{SITE}/chdb/session/state.py")]) == "flusher/chDB"
    assert classify([*run, _f("link", f"{SRC}/pipeline/session_link.py"), _f("encode_unit", f"{SRC}/core/blocks.py")]) \
        == "worker link"
    assert classify([*run, _f("main", f"{SRC}/service/session_worker.py")]) == "worker link"
    assert classify([*run, _f("publish", f"{SRC}/pipeline/publisher.py")]) == "publisher"
    assert classify([*run, _f("refresh", f"{SRC}/pipeline/backlog.py")]) == "other"
    assert classify([_f("<module>", "/usr/lib/python3.11/gc.py")]) == "other"


def test_raw_output_is_counted_per_thread_and_stage() -> None:
    raw = (f"thread (101): MainThread;{_f('run', f'{SITE}/trio/_core/_run.py')};"
           f"{_f('run', f'{SRC}/pipeline/sessions.py')} 7\n"
           f"thread (101): MainThread;{_f('run', f'{SITE}/trio/_core/_run.py')} 3\n"
           f"thread (0x66): Thread-2;{_f('insert', f'{SITE}/clickhouse_connect/driver/client.py')} 5\n"
           "garbage line\n")
    assert parse_raw(raw) == {101: Counter({"sessions": 7, "trio run loop": 3}), 0x66: Counter({"flusher/chDB": 5})}


_CHILD = """
import threading, time
import trio
from evactors.enrichment.useragent import device_type
UA = "Mozilla/5.0 (Linux; Android 10; SM-T510) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/90 Safari/537.36"

def enrich():
    while True:
        device_type(UA, "Android")

async def loop():
    while True:
        await trio.sleep(0)

threading.Thread(target=enrich, daemon=True).start()
print("ready", flush=True)
trio.run(loop)
"""


def test_py_spy_samples_split_the_measured_cpu_of_a_real_process() -> None:
    child = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        time.sleep(0.5)
        profiler = Profiler({"main": child.pid}, None, None)
        profiler.start()
        time.sleep(3)
        profile = profiler.stop()
    finally:
        child.kill()
        child.wait()
    assert not profile["errors"], profile["errors"]
    main = profile["processes"]["main"]
    stages = main["stages_s"]
    assert main["samples"] > 100 and main["sampled_share"] > 0.9
    # two busy threads (RE2 matches without the GIL): at most two cores, less on a busy machine
    assert 0.5 < main["cpu_s"] < 2 * profile["window_s"] + 0.3
    assert abs(sum(stages.values()) - main["cpu_s"]) < 0.01  # the stages add up to the measured CPU
    assert set(stages) <= set(STAGES)
    assert stages.get("enrich", 0) > 0.2 * main["cpu_s"] and stages.get("trio run loop", 0) > 0.2 * main["cpu_s"]
    assert stages.get("enrich", 0) + stages.get("trio run loop", 0) > 0.9 * main["cpu_s"]
    table_ = per_event(profile, events=1000, requests=10, harness_cpu_s=0.05)
    assert table_["service_us_per_event"] == round(main["cpu_s"] * 1000, 1)
    assert table_["service_us_per_request"] == round(main["cpu_s"] * 1e5, 1)
    assert table_["harness_us_per_request"] == 5000.0


def _result(sender_cpu: float, service_cpu: float, machine_cpu: float) -> RunResult:
    """A 10 s max phase whose monitor saw the given CPU each second (cores)."""
    opts = Options(url="", write_key="k", phases=[Phase(None, 10)], run_id="x", senders=1)
    seconds = {}
    for sec in range(10):
        s = Second(accepted=1000)
        s.statuses[200] = 1000
        s.ack.record_value(2000)
        seconds[sec] = s
    monitor = [{"t": float(sec + 1), "service_cpu": service_cpu, "service_main_cpu": service_cpu,
                "valkey_cpu": 0.1, "harness_cpu": sender_cpu + 0.01, "harness_coordinator_cpu": 0.01,
                "harness_sender0_cpu": sender_cpu, "machine_cpu": machine_cpu} for sec in range(10)]
    return RunResult(opts, Traffic(), 0.0, [0.0], [Second(accepted=10_000)], seconds, {}, HdrHistogram(1, 10**9, 3),
                     Counter(), monitor)


def test_the_report_names_the_harness_as_the_limit_when_it_is() -> None:
    busy_harness = build(_result(sender_cpu=0.95, service_cpu=0.4, machine_cpu=1.4), None, None, "loadtest")
    limit = busy_harness["phases"][0]["harness_limit"]
    assert any("sender process sender0 used 0.95 of a core" in why for why in limit)
    assert any("the service used 0.40 cores, less than the senders" in why for why in limit)
    assert "THE HARNESS IS THE LIMIT" in table(busy_harness)

    busy_service = build(_result(sender_cpu=0.05, service_cpu=1.8, machine_cpu=1.95), None, None, "loadtest")
    assert busy_service["phases"][0]["harness_limit"] == []
    assert "THE HARNESS IS THE LIMIT" not in table(busy_service)

    # two cores: the senders at 0.9 of the harness's share (one core) is the limit too
    assert harness_limit({"harness_processes_cpu": {"sender0_cpu": {"mean": 0.45, "max": 0.5},
                                                     "sender1_cpu": {"mean": 0.45, "max": 0.5}},
                          "service_cpu": {"mean": 1.0}, "machine_cpu": {"mean": 1.9}, "open_loop": False}, 2)
