"""Segment events over HTTP in, ClickHouse rows out, through the real service."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

from conftest import CHROME, GB_IP, GOOGLEBOT, HEADLESS, IPHONE, Service, message


def test_batch_lands_in_clickhouse_enriched_without_raw_pii(service: Service) -> None:
    ua = IPHONE
    t0 = datetime.now(UTC) - timedelta(minutes=5)

    def at(seconds: int) -> str:
        return (t0 + timedelta(seconds=seconds)).isoformat()

    batch = [
        message("page", anonymousId="visitor-1", name="Home", timestamp=at(0),
                context={"ip": GB_IP, "userAgent": ua,
                         "page": {"path": "/", "url": "https://shop.example/?utm_source=news",
                                  "referrer": "https://www.google.com/"},
                         "campaign": {"source": "news", "medium": "email", "name": "spring"},
                         "library": {"name": "analytics.js", "version": "4.1.0"}}),
        message("track", anonymousId="visitor-1", event="Added to Cart", timestamp=at(5),
                properties={"sku": "A-1", "price": 9.5, "tags": ["x", "y"], "meta": {"k": True}},
                context={"ip": GB_IP, "userAgent": ua}),
        message("page", anonymousId="visitor-1", name="Cart", timestamp=at(30),
                context={"ip": GB_IP, "userAgent": ua, "page": {"path": "/cart",
                                                                "url": "https://shop.example/cart"}}),
    ]
    r = service.batch(batch)
    assert r.status_code == 200, r.text
    assert r.json() == {"success": True}

    # A screen view is held in its session until its duration is final: until an event
    # comes more than the lateness window (60 s) after the next view, or the session ends.
    r = service.batch([
        message("page", anonymousId="visitor-1", name="Checkout", timestamp=at(95),
                context={"ip": GB_IP, "userAgent": ua, "page": {"path": "/checkout"}}),
        message("track", anonymousId="visitor-1", event="Paid", timestamp=at(160),
                context={"ip": GB_IP, "userAgent": ua})])
    assert r.status_code == 200
    rows = service.wait_rows(
        "SELECT * FROM evactors.events WHERE project_id = 'project-a' ORDER BY created_at, name", 4)
    by_name = {r["name"]: r for r in rows}
    assert set(by_name) == {"screen_view", "Added to Cart", "Paid"}
    view, track = rows[0], by_name["Added to Cart"]
    for row in rows:
        assert (row["country"], row["region"], row["city"]) == ("GB", "ENG", "Gamlingay")
        assert row["latitude"] and row["longitude"]
        assert row["browser"] == "Mobile Safari" and row["os"] == "iOS"
        assert row["device"] == "mobile" and row["brand"] == "Apple"
        assert row["ip"] == "" and row["user_agent"] == ""
        assert row["session_id"] and row["session_id"] == view["session_id"]
        assert row["device_id"] == "visitor-1" and row["project_id"] == "project-a"
        assert GB_IP not in str(row) and "iPhone OS" not in str(row)
    assert view["is_new_session"] == 1 and view["session_number"] == 1
    assert view["path"] == "/" and view["origin"] == "https://shop.example"
    assert view["referrer_name"] == "www.google.com"
    assert (view["utm_source"], view["utm_medium"], view["utm_campaign"]) == ("news", "email", "spring")
    assert view["sdk_name"] == "analytics.js"
    assert view["properties"]["name"] == "Home"
    assert view["type"] == "page"
    # The track event inherits path/origin from the screen view before it, and says which.
    assert track["properties"]["__inherit_from"] == view["id"]
    assert track["path"] == "/" and track["properties"]["sku"] == "A-1"
    assert track["properties"]["price"] == "9.5" and track["properties"]["tags.1"] == "y"
    assert track["properties"]["meta.k"] == "true"
    assert track["is_new_session"] == 0
    # Each saved view's duration is the time to the next one; /checkout is still held.
    views = [(r["path"], r["duration"]) for r in rows if r["name"] == "screen_view"]
    assert views == [("/", 30_000), ("/cart", 65_000)]
    assert by_name["Paid"]["path"] == "/checkout"


def test_every_segment_call_type(service: Service) -> None:
    now = datetime.now(UTC)
    calls = {
        "/v1/track": message("track", event="Order Completed", userId="u-1"),
        "/v1/page": message("page", name="Docs", properties={"path": "/docs", "url": "https://x.io/docs"}),
        "/v1/screen": message("screen", name="Settings", anonymousId="app-1"),
        "/v1/identify": message("identify", userId="u-1", traits={"email": "a@b.c", "plan": "pro"}),
        "/v1/group": message("group", userId="u-1", groupId="g-9", traits={"name": "ACME"}),
        "/v1/alias": {"type": "alias", "messageId": str(uuid.uuid4()), "userId": "u-1",
                      "previousId": "anon-1"},
    }
    for endpoint, body in calls.items():
        body = {**body, "timestamp": now.isoformat()}
        body.pop("type", None)  # the endpoint names the type
        r = service.post(endpoint, body)
        assert r.status_code == 200, (endpoint, r.text)
    # /v1/import is an alias of /v1/batch
    r = service.post("/v1/import", {"batch": [message("track", event="Imported", anonymousId="imp")]})
    assert r.status_code == 200, r.text
    rows = service.wait_rows("SELECT name, type, profile_id, properties FROM evactors.events "
                             "WHERE name != 'screen_view' ORDER BY name", 5)
    names = {r["name"]: r for r in rows}
    assert {"Order Completed", "identify", "group", "alias", "Imported"} <= set(names)
    assert names["group"]["properties"]["group_id"] == "g-9"
    assert names["alias"]["properties"]["previous_id"] == "anon-1"
    profiles = service.wait_rows("SELECT profile_id, traits FROM evactors.profiles", 1)
    assert profiles[0]["profile_id"] == "u-1" and profiles[0]["traits"]["plan"] == "pro"


def test_clock_skew_is_corrected_like_segment(service: Service) -> None:
    # The device clock is 1 hour fast: it stamped the event 10 s before sending it.
    device_now = datetime.now(UTC) + timedelta(hours=1)
    body = {"batch": [message("track", event="Skewed", anonymousId="skew",
                              timestamp=(device_now - timedelta(seconds=10)).isoformat())],
            "sentAt": device_now.isoformat()}
    assert service.post("/v1/batch", body).status_code == 200
    row = service.wait_rows("SELECT toUnixTimestamp64Milli(created_at) AS t, "
                            "toUnixTimestamp64Milli(received_at) AS r FROM evactors.events "
                            "WHERE name = 'Skewed'", 1)[0]
    assert abs((row["r"] - row["t"]) - 10_000) < 50, row


def test_duplicates_are_stored_once_and_bots_are_not_stored(service: Service) -> None:
    dup = message("track", event="Paid", anonymousId="buyer", context={"userAgent": CHROME})
    assert service.batch([dup, dup]).status_code == 200  # twice in one batch
    assert service.batch([dup]).status_code == 200  # and again later (an SDK retry)
    assert service.post("/v1/track", {k: v for k, v in dup.items() if k != "type"}).status_code == 200
    bots = [message("page", anonymousId=f"bot-{i}", context={"userAgent": ua})
            for i, ua in enumerate([GOOGLEBOT, HEADLESS, "curl/8.5.0"])]
    human = message("track", event="Human", anonymousId="human", context={"userAgent": CHROME})
    assert service.batch([*bots, human]).status_code == 200
    rows = service.wait_rows("SELECT name, message_id FROM evactors.events ORDER BY name", 2)
    assert [r["name"] for r in rows] == ["Human", "Paid"]
    assert rows[1]["message_id"] == dup["messageId"]
    assert not service.query("SELECT 1 FROM evactors.events WHERE device_id LIKE 'bot-%'")
    bots_kept = service.wait_rows("SELECT device_id, reason, user_agent, name FROM evactors.events_bots "
                                  "ORDER BY device_id", 3)
    assert [(b["device_id"], b["reason"]) for b in bots_kept] == [
        ("bot-0", "known-pattern"), ("bot-1", "headless"), ("bot-2", "crawler-list")]
    assert bots_kept[0]["user_agent"] == GOOGLEBOT and bots_kept[0]["name"] == "screen_view"
    # The session worker's counters reach the service's /metrics every half second.
    deadline = time.monotonic() + 5
    while "evactors_duplicates_total 3.0" not in (metrics := service.metrics()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert 'evactors_bots_total{reason="headless"} 1.0' in metrics
    assert "evactors_duplicates_total 3.0" in metrics


def test_segment_python_sdk_works_unchanged(service: Service) -> None:
    import segment.analytics as analytics

    client = analytics.Client("key-a", host=service.url, sync_mode=True, max_retries=1)
    client.identify("sdk-user", {"email": "sdk@example.com"})
    client.track("sdk-user", "SDK Event", {"n": 1})
    client.page("sdk-user", "Docs", "Intro", {"path": "/docs/intro", "url": "https://d.io/docs/intro"})
    client.flush()
    rows = service.wait_rows("SELECT name, profile_id, sdk_name FROM evactors.events "
                             "WHERE profile_id = 'sdk-user' ORDER BY name", 2)
    assert {r["name"] for r in rows} >= {"SDK Event", "identify"}
    assert all(r["sdk_name"] == "analytics-python" for r in rows)
