"""Live notifications, and a real ClickHouse outage: buffer, 503 past the high-water mark,
catch up exactly once."""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from conftest import CHROME, GB_IP, Service, message, run_cli
from evactors.store.clickhouse import SCHEMA_VERSION
from evactors.store.keys import Keys
from evactors.store.live import last_screen_view, live_visitors


def _redis(service: Service) -> redis.Redis:
    return redis.Redis(unix_socket_path=str(service.data_dir / "redis" / "valkey.sock"))


def test_received_and_saved_are_published_with_live_state(service: Service) -> None:
    client = _redis(service)
    pubsub = client.pubsub()
    pubsub.subscribe("event:received", "event:saved")
    time.sleep(1.2)  # the publisher re-reads subscriber counts every second
    msgs = [message("page", anonymousId="live-1", userId="user-1", name="Home",
                    properties={"path": "/home", "url": "https://x.io/home"},
                    context={"userAgent": CHROME, "ip": GB_IP}),
            message("track", anonymousId="live-1", userId="user-1", event="Clicked",
                    context={"ip": GB_IP})]
    assert service.batch(msgs).status_code == 200
    seen: dict[str, list[dict[str, Any]]] = {"event:received": [], "event:saved": []}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (seen["event:received"] and seen["event:saved"]):
        m = pubsub.get_message(timeout=0.5)
        if m and m["type"] == "message":
            body = json.loads(m["data"])
            rows = [dict(zip(body["columns"], row, strict=True)) for row in body["rows"]]
            seen[m["channel"].decode()].extend(rows)
    assert [r["name"] for r in seen["event:received"]] == ["Clicked"]  # the page view is held
    saved = seen["event:saved"][0]
    assert saved["name"] == "Clicked" and saved["profile_id"] == "user-1"
    assert saved["country"] == "GB" and saved["ip"] == ""
    # live visitors of the project, and the last screen view of the profile (31 min)
    keys = Keys("evx")
    assert live_visitors(client, keys, "project-a") == 1
    # a held view (its duration not known yet) is already the profile's last screen view
    assert last_screen_view(client, keys, "project-a", "user-1")["path"] == "/home"
    assert service.batch([message("page", anonymousId="live-1", userId="user-1", name="Next",
                                  properties={"path": "/next"})]).status_code == 200
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and last_screen_view(client, keys, "project-a", "user-1")["path"] != "/next":
        time.sleep(0.1)
    last = last_screen_view(client, keys, "project-a", "user-1")
    assert last is not None and last["path"] == "/next" and 0 < client.ttl("evx:lastsv:{project-a}:user-1") <= 31 * 60


def test_clickhouse_outage_buffers_then_catches_up_exactly_once(make_service) -> None:  # type: ignore[no-untyped-def]
    service: Service = make_service(env={"EVACTORS_SERVER_HIGH_WATER_EVENTS": "300"}).start()
    assert service.batch([message("track", event="Warmup")]).status_code == 200
    service.wait_rows("SELECT 1 FROM evactors.events", 1)
    service.query("DETACH TABLE evactors.events")  # inserts now fail: a real ClickHouse error
    accepted: list[str] = []
    refused = 0
    for i in range(20):
        msgs = [message("track", event="During", anonymousId=f"o-{i}") for _ in range(50)]
        r = service.batch(msgs)
        if r.status_code == 200:
            accepted += [m["messageId"] for m in msgs]
        else:
            assert r.status_code == 503, r.text
            assert r.json()["error"] == "backlog_full" and int(r.headers["retry-after"]) > 0
            refused += 1
        time.sleep(0.15)
    assert refused > 0 and len(accepted) >= 300
    assert "insert of" in service.log() and "failed" in service.log()
    metrics = service.metrics()
    assert "evactors_clickhouse_errors_total" in metrics
    ready = service.http.get(f"{service.url}/health/ready")
    assert ready.status_code == 503
    service.query("ATTACH TABLE evactors.events")
    rows = service.wait_rows("SELECT message_id FROM evactors.events WHERE name = 'During'",
                             len(accepted), timeout=60)
    ids = [r["message_id"] for r in rows]
    assert len(ids) == len(set(ids)) == len(accepted) and set(ids) == set(accepted)
    assert "succeeded after" in service.log()


def test_schema_version_is_recorded_and_migrate_is_idempotent(service: Service) -> None:
    versions = service.query("SELECT version FROM evactors.schema_migrations")
    assert sorted(v["version"] for v in versions) == list(range(1, SCHEMA_VERSION + 1))
    assert run_cli("migrate", "--data-dir", str(service.data_dir)).returncode == 0  # defers to service
    assert service.stop() == 0
    result = run_cli("migrate", "--data-dir", str(service.data_dir))
    assert result.returncode == 0 and f"schema version {SCHEMA_VERSION} (applied now: none)" in result.stdout
    result = run_cli("query", "--data-dir", str(service.data_dir), "--format", "tsv",
                     "SELECT count() FROM evactors.schema_migrations")
    assert result.returncode == 0 and result.stdout.strip() == str(SCHEMA_VERSION)
