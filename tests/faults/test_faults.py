"""The fault suite: real faults under load — kill -9 of the service, Redis killed and
restarted, ClickHouse refusing part of a flush — and after each, every acknowledged event
is in ClickHouse exactly once. Slow: CI runs it in its own step. A summary table is printed
at the end of the run (conftest.record_fault_result)."""

from __future__ import annotations

import os
import random
import signal
import time
from typing import Any

import pytest

from conftest import CHROME, GOOGLEBOT, Sender, Service, message, record_fault_result

pytestmark = pytest.mark.slow


def _stored_ids(service: Service, sql: str, expected: set[str], timeout: float = 90) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        ids = [r["message_id"] for r in service.query(sql)]
        if expected <= set(ids) or time.monotonic() > deadline:
            time.sleep(0.5)
            return [r["message_id"] for r in service.query(sql)]
        time.sleep(0.25)


def _assert_exactly_once(result: dict[str, Any]) -> None:
    assert result["lost"] == 0 and result["doubled"] == 0, result


def test_kill_9_at_random_moments_under_load(make_service) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(20)
    service: Service = make_service().start()
    acked: set[str] = set()
    attempted: set[str] = set()
    trials = 20
    for _ in range(trials):
        with Sender(service, threads=3, batch=25) as sender:
            time.sleep(rng.uniform(0.3, 1.5))  # a random moment, mid-traffic
            assert service.proc is not None
            service.proc.send_signal(signal.SIGKILL)
            service.proc.wait(30)
        acked |= sender.acked
        attempted |= sender.attempted
        service.start()  # the orphaned Valkey is stopped cleanly; the replay runs
    stored = _stored_ids(service, "SELECT message_id FROM evactors.events WHERE name = 'Load'", acked)
    result = record_fault_result("kill -9 of the service, random moments", trials, acked, stored)
    _assert_exactly_once(result)
    assert set(stored) <= attempted and len(acked) > 1000


def _valkey_pid(service: Service) -> int:
    return int((service.data_dir / "redis" / "valkey.pid").read_text().strip())


def _wait_valkey_back(service: Service, old_pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pid = _valkey_pid(service)
            if pid != old_pid and service.http.get(f"{service.url}/health/ready").status_code == 200:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise AssertionError("embedded valkey did not come back:\n" + service.log()[-3000:])


def test_redis_killed_and_restarted_under_load(make_service) -> None:  # type: ignore[no-untyped-def]
    """kill -9 of Valkey (strict durability: appendfsync always), then a graceful restart."""
    service: Service = make_service(env={"EVACTORS_REDIS_DURABILITY": "strict"}).start()
    with Sender(service, threads=3, batch=25) as sender:
        for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGKILL):
            time.sleep(1.0)
            pid = _valkey_pid(service)
            os.kill(pid, sig)
            _wait_valkey_back(service, pid)
        time.sleep(1.0)
    log = service.log()
    assert log.count("embedded valkey died") == 3 and "embedded valkey is back" in log
    stored = _stored_ids(service, "SELECT message_id FROM evactors.events WHERE name = 'Load'",
                         sender.acked)
    result = record_fault_result("Valkey kill -9 ×2 + graceful restart (strict)", 3, sender.acked, stored)
    _assert_exactly_once(result)
    assert len(sender.acked) > 300 and sender.refused > 0  # it said 503 while Redis was away


def test_clickhouse_refuses_part_of_a_multi_chunk_flush(make_service) -> None:  # type: ignore[no-untyped-def]
    """events_bots is detached: each flush inserts its events chunk, then fails on the bots
    chunk and is retried with the same tokens — the events must not double."""
    service: Service = make_service(env={"EVACTORS_FLUSH_CHUNK_ROWS": "60"}).start()
    acked_humans: set[str] = set()
    acked_bots: set[str] = set()
    service.query("DETACH TABLE evactors.events_bots")
    for i in range(30):
        humans = [message("track", event="Load", anonymousId=f"h{i % 5}", context={"userAgent": CHROME})
                  for _ in range(20)]
        bots = [message("track", event="Bot", anonymousId=f"b{i % 3}", context={"userAgent": GOOGLEBOT})
                for _ in range(5)]
        if service.batch(humans + bots).status_code == 200:
            acked_humans |= {m["messageId"] for m in humans}
            acked_bots |= {m["messageId"] for m in bots}
        if i == 20:
            service.query("ATTACH TABLE evactors.events_bots")
        time.sleep(0.1)
    assert "insert of" in service.log() and "events_bots failed" in service.log()
    events = _stored_ids(service, "SELECT message_id FROM evactors.events WHERE name = 'Load'",
                         acked_humans)
    bots = _stored_ids(service, "SELECT message_id FROM evactors.events_bots", acked_bots)
    result = record_fault_result("ClickHouse fails mid multi-table flush", 1,
                                 acked_humans | acked_bots, events + bots)
    _assert_exactly_once(result)


def test_clickhouse_away_for_minutes_buffers_refuses_and_catches_up(make_service) -> None:  # type: ignore[no-untyped-def]
    service: Service = make_service(env={"EVACTORS_SERVER_HIGH_WATER_EVENTS": "6000"}).start()
    assert service.proc is not None
    rss = lambda: int(next(line.split()[1] for line in open(f"/proc/{service.proc.pid}/status")  # noqa: E731
                           if line.startswith("VmRSS:"))) / 1024
    service.wait_rows("SELECT 1 FROM evactors.schema_migrations", 1)
    rss_before = rss()
    service.query("DETACH TABLE evactors.events")
    with Sender(service, threads=2, batch=20) as sender:
        time.sleep(90)  # ClickHouse refuses every insert for a minute and a half
        status = service.http.get(f"{service.url}/health/ready")
        rss_during = rss()
    assert status.status_code == 503 and sender.refused > 0  # backpressure, not loss
    log = service.log()
    assert "insert of" in log and "retrying in 30.0s" in log  # backed off to the cap
    service.query("ATTACH TABLE evactors.events")
    stored = _stored_ids(service, "SELECT message_id FROM evactors.events WHERE name = 'Load'",
                         sender.acked, timeout=120)
    result = record_fault_result("ClickHouse refusing inserts for 90 s", 1, sender.acked, stored)
    _assert_exactly_once(result)
    assert len(sender.acked) >= 6000
    assert rss_during < rss_before + 200, (rss_before, rss_during)  # the backlog is in Redis
    assert "succeeded after" in service.log()
