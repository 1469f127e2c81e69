"""Operating the service: status, metrics, health, structured logs without PII."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

import pytest

from conftest import CHROME, GB_IP, Service, message, run_cli


def test_status_metrics_health_and_logs(service: Service) -> None:
    msgs = [message("page", anonymousId="op-1", userId="op-user", name="Home",
                    properties={"path": "/"}, context={"ip": GB_IP, "userAgent": CHROME}),
            message("track", anonymousId="op-1", userId="op-user", event="Go",
                    context={"ip": GB_IP, "userAgent": CHROME})]
    r = service.batch(msgs)
    assert r.status_code == 200 and len(r.headers["x-request-id"]) == 12
    r = service.post("/v1/track", {"anonymousId": "x"}, headers={"x-request-id": "trace-42"})
    assert r.status_code == 400 and r.headers["x-request-id"] == "trace-42"
    service.wait_rows("SELECT 1 FROM evactors.events WHERE name = 'Go'", 1)

    result = run_cli("status", "--data-dir", str(service.data_dir))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "backlog" in out and "ClickHouse connected" in out
    for actor in ("acker", "flusher", "publisher", "session-0", "enricher-0", "replayer", "backlog"):
        assert actor in out
    assert "live visitors (5 min): project-a 1" in out
    status = json.loads(run_cli("status", "--data-dir", str(service.data_dir), "--json").stdout)
    assert status["actors"]["flusher"] == {"state": "running", "restarts": 0}
    assert set(status["channels"]) >= {"to-enrich", "to-session-0", "receipts", "notices"}

    assert service.http.get(f"{service.url}/health/ready").json() == {"status": "ready"}
    time.sleep(1.2)  # a backlog round sets the gauges
    metrics = service.metrics()
    for name in ("evactors_lag_seconds", 'evactors_channel_depth_batches{channel="to-enrich"}',
                 "evactors_flush_rows_bucket", "evactors_flush_seconds_bucket",
                 "evactors_http_latency_seconds_bucket", 'evactors_stage_events_total{stage="enrich"}',
                 "evactors_rows_inserted_total", "evactors_backlog_events"):
        assert name in metrics, name
    # memory, told apart: the process's RSS, and what Python's allocator holds of it
    gauges = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
              if line and not line.startswith("#")}
    assert gauges["process_resident_memory_bytes"] > 50 * 2**20
    assert gauges["evactors_python_allocated_blocks"] > 10_000
    assert gauges['python_gc_collections_total{generation="0"}'] >= 1
    if platform.libc_ver()[0] == "glibc":
        assert gauges['evactors_malloc_bytes{kind="in_use"}'] > 1 << 20
        assert gauges['evactors_malloc_bytes{kind="free"}'] >= 0

    assert run_cli("status", "--data-dir", str(service.data_dir / "nowhere")).returncode == 3
    assert service.stop() == 0
    log = service.log()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert any(entry.get("actor") == "flusher" for entry in lines)
    rejected = [e for e in lines if e.get("request_id") == "trace-42"]
    assert rejected and "400 invalid_event" in rejected[0]["msg"]
    assert GB_IP not in log and "Windows NT" not in log  # no raw IPs or user agents in logs


_ARENAS = """
import ctypes, sys, threading
from evactors.ops.malloc import limit_arenas

capped = limit_arenas()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
held = []
together = threading.Barrier(6)
def allocate() -> None:
    held.append(libc.malloc(100_000))  # a new thread's first malloc takes an arena of its own
    together.wait()  # all alive at once: none hands its arena on to the next
threads = [threading.Thread(target=allocate) for _ in range(6)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(int(capped), flush=True)
libc.malloc_stats()  # per arena, on stderr
"""


def _arenas(env: dict[str, str] | None = None) -> tuple[bool, int]:
    proc = subprocess.run([sys.executable, "-c", _ARENAS], capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items()
                               if k not in ("MALLOC_ARENA_MAX", "GLIBC_TUNABLES")} | (env or {}))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip() == "1", sum(line.startswith("Arena ") for line in proc.stderr.splitlines())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_limit_arenas_caps_glibcs_arenas_unless_the_environment_says() -> None:
    """Six threads would take six arenas of their own (up to 8 per core), each keeping what is
    freed in it; ``limit_arenas`` (which ``bin/evactors run`` calls first) caps them at 2.
    MALLOC_ARENA_MAX or GLIBC_TUNABLES in the environment wins."""
    assert _arenas() == (True, 2)
    assert _arenas({"MALLOC_ARENA_MAX": "3"}) == (False, 3)
    assert _arenas({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}) == (False, 4)
