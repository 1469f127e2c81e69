"""Every protocol at the HTTP level: CORS (echoed headers, bounds, per-project origins, 404s),
RudderStack's fallback headers, PostHog's body forms and start-up calls, OpenPanel's retries,
and bad input of each answered with a 4xx naming the problem, never a 5xx."""

from __future__ import annotations

import base64
import gzip
import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from conftest import CHROME, GB_IP, Service

KEYS = {"key-a": "project-a", "key-b": "project-b"}
ORIGIN = "http://shop.example"


@pytest.fixture
def svc(make_service: Any) -> Service:
    # a session's last screen view is held until the session ends: 3 s idle ends it here
    return make_service(write_keys=KEYS, env={
        "EVACTORS_PIPELINE_LATENESS_SECONDS": "0", "EVACTORS_PIPELINE_SESSION_TIMEOUT_SECONDS": "3",
        "EVACTORS_CORS_ORIGINS": '{ project-a = ["http://shop.example"] }',
        "EVACTORS_OPENPANEL_CLIENTS": '{ "op-a" = "project-a", "op-srv" = "project-a" }',
        "EVACTORS_OPENPANEL_SECRETS": '{ "op-srv" = "s3cret" }'}).start()


def _events(service: Service, expected: int, project: str = "project-a") -> list[dict[str, Any]]:
    return service.wait_rows("SELECT message_id, name, type, device_id, profile_id, path, browser, created_at "
                             f"FROM evactors.events WHERE project_id = '{project}' AND message_id != '' "
                             "ORDER BY message_id", expected)


def test_preflight_echoes_requested_headers_within_bounds_and_allows_no_credentials(svc: Service) -> None:
    asked = "authorization, content-type, x-retry-count, anonymousid, sentat, rsa-retry-attempt, x-new-header"
    r = httpx.options(f"{svc.url}/v1/t", headers={"origin": ORIGIN, "access-control-request-method": "POST",
                                                   "access-control-request-headers": asked})
    assert r.status_code == 204
    assert r.headers["access-control-allow-headers"] == asked
    assert r.headers["access-control-allow-origin"] == "*"  # project-b allows any origin
    assert r.headers["access-control-max-age"] == "7200"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "access-control-allow-credentials" not in r.headers
    too_many = ", ".join(f"x-h{i}" for i in range(40))
    r = httpx.options(f"{svc.url}/v1/t", headers={"origin": ORIGIN, "access-control-request-headers": too_many})
    assert "x-h39" not in r.headers["access-control-allow-headers"]
    assert "AnonymousId" in r.headers["access-control-allow-headers"]  # the known SDKs' headers instead
    too_long = "x-" + "a" * 2000
    r = httpx.options(f"{svc.url}/e/", headers={"origin": ORIGIN, "access-control-request-headers": too_long})
    assert r.status_code == 204 and too_long not in r.headers["access-control-allow-headers"]
    r = httpx.options(f"{svc.url}/v1/t", headers={"origin": ORIGIN, "access-control-request-headers": "bad header"})
    assert "bad header" not in r.headers["access-control-allow-headers"]
    # a 404, a 401 and a 405 are readable by the page too
    for method, path in [("POST", "/nowhere"), ("POST", "/v1/t"), ("GET", "/v1/t"), ("POST", "/track")]:
        r = httpx.request(method, f"{svc.url}{path}", headers={"origin": ORIGIN}, content=b"{}")
        assert 400 <= r.status_code < 500 and r.headers["access-control-allow-origin"] == "*", (path, r.text)
    # the admin routes are not for browsers
    assert "access-control-allow-origin" not in httpx.options(f"{svc.url}/admin/query").headers


def test_an_origin_a_project_does_not_list_is_refused_and_stores_nothing(svc: Service) -> None:
    track = {"type": "track", "event": "E", "anonymousId": "a1", "messageId": "m-origin"}
    r = svc.post("/v1/track", track, headers={"origin": "http://evil.example"})
    assert r.status_code == 403 and r.json()["error"] == "origin_not_allowed"
    r = svc.post("/v1/track", {**track, "messageId": "m-ok"}, headers={"origin": ORIGIN})
    assert r.status_code == 200
    r = svc.post("/v1/track", {**track, "messageId": "m-b"}, key="key-b", headers={"origin": "http://evil.example"})
    assert r.status_code == 200  # project-b lists no origins: any
    r = httpx.post(f"{svc.url}/e/", headers={"origin": "http://evil.example"},
                   json={"api_key": "key-a", "batch": [{"event": "x", "distinct_id": "d", "uuid": str(uuid.uuid4())}]})
    assert r.status_code == 403
    assert [e["message_id"] for e in _events(svc, 1)] == ["m-ok"]


def test_restricted_origins_are_echoed_with_vary(make_service: Any) -> None:
    service = make_service(write_keys={"key-a": "project-a"},
                           env={"EVACTORS_CORS_ORIGINS": '{ project-a = ["http://shop.example"] }'}).start()
    r = httpx.options(f"{service.url}/v1/t", headers={"origin": ORIGIN, "access-control-request-headers": "a"})
    assert r.headers["access-control-allow-origin"] == ORIGIN and "Origin" in r.headers["vary"]
    r = httpx.options(f"{service.url}/v1/t", headers={"origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_rudderstack_headers_are_the_fallback_anonymous_id_and_sent_at(svc: Service) -> None:
    now = datetime.now(UTC)
    client_time = now - timedelta(hours=1)  # the client's clock is an hour behind...
    sent_at = client_time + timedelta(seconds=10)  # ...and the event was made 10 s before sending
    headers = {"anonymousid": base64.b64encode(b"anon-from-header").decode(),
               "sentat": sent_at.isoformat()}
    body = {"event": "Saved", "messageId": "m-rs", "timestamp": client_time.isoformat(), "channel": "web"}
    r = svc.post("/v1/track", body, headers=headers)
    assert r.status_code == 200, r.text
    r = svc.post("/v1/t", {"event": "Kept", "messageId": "m-rs2", "anonymousId": "own"}, headers=headers)
    assert r.status_code == 200
    rows = {e["message_id"]: e for e in _events(svc, 2)}
    assert rows["m-rs"]["device_id"] == "anon-from-header" and rows["m-rs2"]["device_id"] == "own"
    stored = datetime.fromisoformat(str(rows["m-rs"]["created_at"])).replace(tzinfo=UTC)
    assert abs((stored - (now - timedelta(seconds=10))).total_seconds()) < 5, stored
    props = svc.query("SELECT properties FROM evactors.events WHERE message_id = 'm-rs'")[0]["properties"]
    assert props["channel"] == "web"
    for name, value in [("anonymousid", "%%%"), ("sentat", "yesterday")]:
        r = svc.post("/v1/track", body, headers={name: value})
        assert r.status_code == 400 and r.json()["error"] == "invalid_header", r.text
        assert r.json()["field"].lower() == name


def test_segment_short_paths_and_telemetry(svc: Service) -> None:
    for path, fields in [("/v1/t", {"event": "T"}), ("/v1/p", {"name": "Home"}), ("/v1/i", {"userId": "u"}),
                         ("/v1/g", {"groupId": "g"}), ("/v1/a", {"userId": "u2", "previousId": "u"})]:
        r = svc.post(path, {**fields, "anonymousId": "short", "messageId": f"m{path}"},
                     headers={"content-type": "text/plain"})
        assert r.status_code == 200, (path, r.text)
    r = svc.post("/v1/b", {"batch": [{"type": "track", "event": "B", "anonymousId": "short", "messageId": "mb"}]})
    assert r.status_code == 200
    r = svc.post("/v1/m", {"series": [{"type": "Counter", "metric": "analytics_js.invoke", "value": 1}]}, key=None)
    assert r.status_code == 200
    assert svc.post("/v1/m", raw=b"not json", key=None).status_code == 200  # telemetry: counted, never an error
    assert svc.post("/rsaMetrics", raw=b"{}", key=None).status_code == 200
    assert len(_events(svc, 6)) == 6


def _ph_event(event: str, **props: Any) -> dict[str, Any]:
    return {"event": event, "uuid": str(uuid.uuid4()), "timestamp": datetime.now(UTC).isoformat(),
            "properties": {"distinct_id": "ph-d", "$device_id": "ph-d", "$raw_user_agent": CHROME, "$ip": GB_IP,
                           "$current_url": "https://shop.example/a/b?x=1", "$pathname": "/a/b", **props}}


def test_posthog_body_forms_are_all_read(svc: Service) -> None:
    url = svc.url
    sent: list[str] = []

    def batch(*events: dict[str, Any]) -> dict[str, Any]:
        sent.extend(e["uuid"] for e in events)
        return {"api_key": "key-a", "batch": list(events), "sent_at": datetime.now(UTC).isoformat()}

    forms = [
        ("/e/?ver=1.449&compression=gzip-js", gzip.compress(json.dumps(batch(_ph_event("$pageview"))).encode()),
         "text/plain"),
        ("/i/v0/e/", gzip.compress(json.dumps(batch(_ph_event("gz"))).encode()), "text/plain"),  # magic bytes only
        ("/batch/", json.dumps(batch(_ph_event("plain"))).encode(), "application/json"),
        ("/capture/", b"data=" + base64.b64encode(json.dumps(batch(_ph_event("form"))).encode()).replace(b"+", b"%2B"),
         "application/x-www-form-urlencoded"),
        ("/e/?compression=base64", b"data=" + base64.b64encode(json.dumps(batch(_ph_event("b64"))).encode()),
         "application/x-www-form-urlencoded"),
    ]
    single = _ph_event("single", token="key-a")
    sent.append(single["uuid"])
    forms.append(("/capture", json.dumps(single).encode(), "application/json"))
    array = [_ph_event("in-array", token="key-a")]
    sent.append(array[0]["uuid"])
    forms.append(("/e", json.dumps(array).encode(), "text/plain"))
    for path, body, kind in forms:
        r = httpx.post(f"{url}{path}", content=body, headers={"content-type": kind, "origin": ORIGIN})
        assert r.status_code == 200 and r.json() == {"status": 1}, (path, r.text)
        assert r.headers["access-control-allow-origin"] == "*"
    rows = _events(svc, len(sent))
    assert sorted(r["message_id"] for r in rows) == sorted(sent)
    assert {r["path"] for r in rows} == {"/a/b"} and {r["browser"] for r in rows} == {"Chrome"}
    # the SDK's start-up calls: a valid, empty configuration
    flags = httpx.post(f"{url}/flags/?v=2", content=b'{"token": "key-a"}').json()
    assert flags["featureFlags"] == {} and flags["flags"] == {}
    assert httpx.post(f"{url}/decide/?v=4", content=b"{}").json()["featureFlags"] == {}
    assert httpx.get(f"{url}/array/key-a/config").json()["sessionRecording"] is False
    assert httpx.get(f"{url}/array/key-a/config.js").status_code == 200


def test_a_posthog_token_never_reaches_another_project(svc: Service) -> None:
    mine, foreign = _ph_event("mine"), _ph_event("foreign", token="key-b")
    r = httpx.post(f"{svc.url}/batch/", json={"api_key": "key-a", "batch": [mine, foreign]})
    assert r.status_code == 400 and r.json()["accepted"] == 1
    assert r.json()["rejected"][0]["field"] == "properties.token"
    assert [e["message_id"] for e in _events(svc, 1)] == [mine["uuid"]]
    time.sleep(1)
    assert svc.query("SELECT count() AS n FROM evactors.events WHERE project_id = 'project-b'")[0]["n"] == 0


def test_posthog_mapping_of_identify_alias_group_and_screen(svc: Service) -> None:
    events = [
        {**_ph_event("$identify", **{"$anon_distinct_id": "ph-d"}), "distinct_id": "ph-user",
         "$set": {"email": "e@example.com"}, "$set_once": {"first": "yes"}},
        {**_ph_event("$create_alias", alias="ph-new"), "distinct_id": "ph-user"},
        _ph_event("$groupidentify", **{"$group_type": "company", "$group_key": "acme",
                                       "$group_set": {"name": "Acme"}}),
        _ph_event("$screen", **{"$screen_name": "Settings"}),
    ]
    r = httpx.post(f"{svc.url}/batch/", json={"api_key": "key-a", "batch": events})
    assert r.status_code == 200, r.text
    rows = {e["message_id"]: e for e in _events(svc, 4)}
    assert [rows[e["uuid"]]["type"] for e in events] == ["identify", "alias", "group", "screen"]
    assert rows[events[0]["uuid"]]["profile_id"] == "ph-user"
    profiles = svc.wait_rows("SELECT profile_id, traits FROM evactors.profiles", 1)
    assert profiles[0]["traits"] == {"email": "e@example.com", "first": "yes"}


@pytest.mark.parametrize(("path", "body", "headers", "status", "error"), [
    ("/e/", b"{not json", {}, 400, "malformed_json"),
    ("/e/", b"\x1f\x8b\x08garbage", {}, 400, "bad_gzip"),
    ("/e/", b"data=***", {"content-type": "application/x-www-form-urlencoded"}, 400, "malformed_json"),
    ("/e/", b'{"batch": []}', {}, 400, "invalid_batch"),
    ("/e/", b'{"batch": [{"event": "x", "distinct_id": "d"}]}', {}, 401, "unauthorized"),
    ("/e/?compression=lz64", b'{"api_key": "key-a", "batch": []}', {}, 415, "unsupported_encoding"),
    ("/batch/", b'{"api_key": "key-a", "batch": [{"distinct_id": "d"}]}', {}, 400, "invalid_events"),
    ("/batch/", b'{"api_key": "key-a", "batch": [{"event": "x"}]}', {}, 400, "invalid_events"),
    ("/batch/", b'{"api_key": "key-a", "batch": 5}', {}, 400, "invalid_batch"),
    ("/e/?token=key-a", b"[" + b"[" * 3000 + b"]" * 3000 + b"]", {}, 400, "malformed_json"),
    ("/e/", b'{"api_key": "key-a", "batch": [{"event": "x", "distinct_id": "d", "properties": '
     b'{"$current_url": "http://[::1/x"}, "timestamp": "not a time"}]}', {}, 400, "invalid_events"),
    ("/track", b'{"type": "track", "payload": {"name": "x"}}', {}, 401, "unauthorized"),
    ("/track", b'{"type": "track", "payload": {"name": "x"}}', {"openpanel-client-id": "nope"}, 401, "unauthorized"),
    ("/track", b'{"type": "track"}', {"openpanel-client-id": "op-srv"}, 401, "unauthorized"),
    ("/track", b"{oops", {"openpanel-client-id": "op-a"}, 400, "malformed_json"),
    ("/track", b'{"type": "explode", "payload": {}}', {"openpanel-client-id": "op-a"}, 400, "invalid_event"),
    ("/track", b'{"type": "track", "payload": {"name": ""}}', {"openpanel-client-id": "op-a"}, 400, "invalid_event"),
    ("/track", b'{"type": "alias", "payload": {"alias": "x"}}', {"openpanel-client-id": "op-a"}, 400, "invalid_event"),
    ("/track", b'{"type": "track", "payload": 5}', {"openpanel-client-id": "op-a"}, 400, "invalid_event"),
])
def test_bad_input_of_each_protocol_gets_a_4xx_naming_the_problem(
        svc: Service, path: str, body: bytes, headers: dict[str, str], status: int, error: str) -> None:
    r = httpx.post(f"{svc.url}{path}", content=body, headers=headers)
    assert r.status_code == status and r.json()["error"] == error, r.text


def test_openpanel_identical_body_within_the_window_is_one_event(svc: Service) -> None:
    headers = {"openpanel-client-id": "op-a", "user-agent": CHROME, "origin": ORIGIN}
    body = {"type": "track", "payload": {"name": "clicked", "properties": {"__path": "https://shop.example/x"}}}
    answers = [httpx.post(f"{svc.url}/track", json=body, headers=headers) for _ in range(3)]
    assert all(a.status_code == 200 for a in answers)
    assert len({a.json()["deviceId"] for a in answers}) == 1
    other = {"type": "track", "payload": {"name": "clicked", "properties": {"__path": "https://shop.example/y"}}}
    assert httpx.post(f"{svc.url}/track", json=other, headers=headers).status_code == 200
    other_agent = {**headers, "user-agent": CHROME.replace("120", "121")}  # another visitor, same body
    assert httpx.post(f"{svc.url}/track", json=body, headers=other_agent).status_code == 200
    rows = _events(svc, 3)
    time.sleep(1)
    assert len(_events(svc, 3)) == 3
    assert sorted(r["path"] for r in rows) == ["/x", "/x", "/y"]
    server = {"openpanel-client-id": "op-srv", "openpanel-client-secret": "s3cret"}
    assert httpx.post(f"{svc.url}/track", json=body, headers=server).status_code == 200
    wrong = {**server, "openpanel-client-secret": "nope"}
    r = httpx.post(f"{svc.url}/track", json=body, headers=wrong)
    assert r.status_code == 401 and "secret" in r.json()["message"]


def test_a_segment_message_naming_another_write_key_is_refused_not_stored_elsewhere(svc: Service) -> None:
    batch = [{"type": "track", "event": "Mine", "anonymousId": "a", "messageId": "m-mine", "writeKey": "key-a"},
             {"type": "track", "event": "Theirs", "anonymousId": "a", "messageId": "m-theirs", "writeKey": "key-b"}]
    r = svc.batch(batch)
    assert r.status_code == 400 and r.json()["rejected"][0]["field"] == "writeKey", r.text
    assert [e["message_id"] for e in _events(svc, 1)] == ["m-mine"]
    assert svc.query("SELECT count() AS n FROM evactors.events WHERE project_id = 'project-b'")[0]["n"] == 0
