"""Redis bounded by bytes: the embedded Valkey's maxmemory with noeviction, the backlog's
high-water mark in bytes, an evicting Redis refused at start, evictions reported, and a full
Redis that answers 503 and, once memory is freed, has lost and doubled nothing."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest
import redis

from conftest import Sender, Service, StallProbe, message, record_fault_result, record_hostile_result, rss_mb, run_cli


def _valkey(service: Service) -> redis.Redis:
    return redis.Redis(unix_socket_path=str(service.data_dir / "redis" / "valkey.sock"), socket_timeout=10)


def _stored_ids(service: Service, expected: set[str], timeout: float = 150) -> list[str]:
    sql = "SELECT message_id FROM evactors.events WHERE name = 'Load'"
    deadline = time.monotonic() + timeout
    while True:
        ids = [r["message_id"] for r in service.query(sql)]
        if expected <= set(ids) or time.monotonic() > deadline:
            time.sleep(1.0)
            return [r["message_id"] for r in service.query(sql)]
        time.sleep(0.5)


def _metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_the_embedded_valkey_has_a_maxmemory_and_never_evicts(make_service) -> None:  # type: ignore[no-untyped-def]
    service: Service = make_service(env={"EVACTORS_REDIS_MAXMEMORY": str(96 << 20)}).start()
    config = _valkey(service).config_get("maxmemory*")
    assert config["maxmemory"] == str(96 << 20) and config["maxmemory-policy"] == "noeviction"
    default = make_service("default").start()  # no setting: a quarter of the machine's memory
    maxmemory = int(_valkey(default).config_get("maxmemory")["maxmemory"])
    assert 64 << 20 <= maxmemory <= 8 << 30
    metrics = default.metrics()
    time.sleep(1.5)
    metrics = default.metrics()
    assert _metric(metrics, "evactors_redis_maxmemory_bytes") == maxmemory
    assert _metric(metrics, "evactors_redis_used_memory_bytes") > 0


def test_a_backlog_over_its_high_water_mark_in_bytes_is_answered_503(make_service) -> None:  # type: ignore[no-untyped-def]
    service: Service = make_service(env={"EVACTORS_SERVER_HIGH_WATER_BYTES": str(200_000)}).start()
    service.query("DETACH TABLE evactors.events")  # the backlog stays in Redis
    answers: list[httpx.Response] = []
    big = {"note": "x" * 2000}
    for _ in range(100):
        r = service.batch([message("track", event="Load", properties=big) for _ in range(50)])
        answers.append(r)
        if r.status_code == 503:
            break
        time.sleep(0.05)
    last = answers[-1]
    assert last.status_code == 503, [a.status_code for a in answers]
    assert last.json()["error"] == "backlog_full" and "bytes" in last.json()["message"]
    assert last.headers["retry-after"] == "5"
    assert service.http.get(f"{service.url}/health/ready").status_code == 503
    assert _metric(service.metrics(), "evactors_backlog_bytes") > 200_000
    service.query("ATTACH TABLE evactors.events")
    deadline = time.monotonic() + 60
    while service.batch([message("track", event="Load")]).status_code != 200:
        assert time.monotonic() < deadline, "ingest did not accept again once the backlog drained"
        time.sleep(0.5)


def test_an_external_redis_that_evicts_is_refused_at_start_naming_the_setting(  # type: ignore[no-untyped-def]
        make_service, valkey, tmp_path: Path) -> None:
    client = redis.Redis(unix_socket_path=str(tmp_path / "v.sock"))
    client.config_set("maxmemory-policy", "allkeys-lru")
    url = f"unix://{tmp_path / 'v.sock'}"
    refused = run_cli("run", "--data-dir", str(tmp_path / "refused"), "--listen", "127.0.0.1:0",
                      "--redis-url", url, timeout=60)
    assert refused.returncode == 2, refused.stderr
    assert "redis.allow_eviction" in refused.stderr and "maxmemory-policy allkeys-lru" in refused.stderr
    # allowed explicitly: it starts, and an eviction is an error in the log and a metric
    client.config_set("maxmemory", str(8 << 20))
    service: Service = make_service("allowed", args=["--redis-url", url],
                                    env={"EVACTORS_REDIS_ALLOW_EVICTION": "true"}).start()
    assert "maxmemory-policy allkeys-lru" in service.log()
    time.sleep(1.5)
    for i in range(400):  # 40 KB values into an 8 MB Redis: it must evict
        client.set(f"filler:{i}", b"x" * 40_000)
    deadline = time.monotonic() + 10
    while _metric(service.metrics(), "evactors_redis_evicted_keys_total") == 0:
        assert time.monotonic() < deadline, service.log()[-2000:]
        time.sleep(0.3)
    assert "Redis evicted" in service.log()


@pytest.mark.slow
def test_a_full_redis_answers_503_and_once_freed_has_lost_and_doubled_nothing(make_service) -> None:  # type: ignore[no-untyped-def]
    """maxmemory small, ClickHouse held back so the backlog fills Redis: writes are refused
    with OOM, ingest answers 503 (never a 5xx of another kind), the actors retry with
    backoff; memory freed (CONFIG SET maxmemory), every acknowledged event is stored once,
    and the SDK's retries of acknowledged batches add nothing."""
    service: Service = make_service(env={
        "EVACTORS_REDIS_MAXMEMORY": str(12 << 20),
        "EVACTORS_SERVER_HIGH_WATER_BYTES": str(1 << 40),  # off: the OOM path is under test
    }).start()
    valkey = _valkey(service)
    # acknowledged before Redis fills: the SDK sends them again after it is freed
    retried = [[message("track", event="Load", anonymousId=f"retry-{i % 5}") for _ in range(40)]
               for i in range(10)]
    for batch in retried:
        assert service.batch(batch).status_code == 200
    service.query("DETACH TABLE evactors.events")
    assert service.proc is not None
    rss_before = rss_mb(service.proc.pid)
    with StallProbe(service) as probe, Sender(service, threads=3, batch=40, properties={"pad": "p" * 600}) as sender:
        deadline = time.monotonic() + 90
        while sender.refused < 30 or "OOM" not in service.log():
            assert time.monotonic() < deadline, (sender.refused, len(sender.acked), service.log()[-3000:])
            time.sleep(0.5)
        full_for = time.monotonic()
        time.sleep(3)  # keep sending into a full Redis
        refused_while_full = sender.refused
        # ClickHouse back while Redis is still full: the flusher's scripts run at OOM
        # (allow-oom) and free it, so ingest accepts again without anyone raising maxmemory
        service.query("ATTACH TABLE evactors.events")
        acked_before = len(sender.acked)
        while len(sender.acked) < acked_before + 2000:
            assert time.monotonic() < deadline + 90, "a full Redis did not drain by itself"
            time.sleep(0.5)
        valkey.config_set("maxmemory", str(256 << 20))  # and more memory
        time.sleep(3)
    assert time.monotonic() - full_for > 3 and refused_while_full >= 30
    for batch in retried:  # SDKs retry what they are not sure of: the same batches add nothing
        assert service.batch(batch).status_code == 200
    acked = sender.acked | {m["messageId"] for batch in retried for m in batch}
    stored = _stored_ids(service, acked)
    result = record_fault_result("Redis full (OOM), then memory freed", 1, acked, stored)
    other_5xx = [m for m in re.finditer(r'evactors_http_requests_total\{endpoint="\w+",status="(5\d\d)"\} (\S+)',
                                        service.metrics()) if m.group(1) != "503"]
    record_hostile_result("full Redis (12 MB maxmemory; events attempted)", len(sender.attempted),
                          int(sum(float(m.group(2)) for m in other_5xx)), probe.worst, rss_before,
                          rss_mb(service.proc.pid), acked, stored)
    where: dict[str, object] = {}
    if result["lost"]:  # where the missing ones are: still in a stream, or gone
        v = _valkey(service)
        where = {"streams": {k.decode(): v.xlen(k) for k in v.scan_iter(match="evx:*", _type="stream")},
                 "status": service.admin_request("GET", "/admin/status").json()}
    assert result["lost"] == 0 and result["doubled"] == 0, (result, where)
    assert set(stored) <= acked | sender.attempted and len(acked) > 500
    metrics = service.metrics()
    statuses = {m.group(1) for m in re.finditer(r'evactors_http_requests_total\{endpoint="batch",'
                                                r'status="(\d+)"\}', metrics)}
    assert statuses <= {"200", "503"}, statuses  # a full Redis is a 503, never a 500
    assert _metric(metrics, "evactors_redis_evicted_keys_total") == 0
    assert re.search(r'evactors_redis_errors_total\{operation="[^"]+"\} [1-9]', metrics), \
        "the actors met the OOM and retried"
    status = json.loads(service.admin_request("GET", "/admin/status").text)
    assert all(a["state"] == "running" and a["restarts"] == 0  # OOM is retried, not a crash
               for a in status["actors"].values()), status["actors"]
    assert status["backlog_events"] == 0  # the counters did not drift (no half-run script)


def test_raw_client_ips_leave_the_append_only_file_after_processing(make_service) -> None:  # type: ignore[no-untyped-def]
    service: Service = make_service(env={"EVACTORS_REDIS_AOF_REWRITE_SECONDS": "1"}).start()
    ip = "81.2.69.77"  # pii = remove (the default): no row keeps it

    def on_disk() -> bool:
        return any(ip.encode() in f.read_bytes()
                   for f in (service.data_dir / "redis").rglob("*") if f.is_file() and "aof" in f.name)

    for i in range(5):
        assert service.batch([message("track", event="Load", anonymousId=f"ip-{i}",
                                      context={"ip": ip})]).status_code == 200
    service.wait_rows("SELECT 1 FROM evactors.events WHERE name = 'Load'", 5)
    deadline = time.monotonic() + 20
    while on_disk():
        assert time.monotonic() < deadline, "the raw IP stayed in the AOF"
        time.sleep(0.5)
