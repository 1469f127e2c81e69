"""Auth and bad input: clear 4xx JSON errors, and nothing else is lost."""

from __future__ import annotations

import gzip
import json

from conftest import CHROME, Service, message


def test_auth_rejects_missing_and_unknown_keys(make_service) -> None:  # type: ignore[no-untyped-def]
    service = make_service(write_keys={"key-a": "project-a", "key-b": "project-b"}).start()
    body = {"batch": [message("track", event="E")]}
    r = service.post("/v1/batch", body, key=None)
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    assert "missing" in r.json()["message"]
    r = service.post("/v1/batch", body, key="key-zzz")
    assert r.status_code == 401 and "unknown write key" in r.json()["message"]
    # writeKey in the body is accepted as Segment documents it
    r = service.post("/v1/batch", {**body, "writeKey": "key-b"}, key=None)
    assert r.status_code == 200, r.text
    # each key writes to its own project only
    assert service.batch([message("track", event="From A", anonymousId="x")], key="key-a").status_code == 200
    assert service.batch([message("track", event="From B", anonymousId="x")], key="key-b").status_code == 200
    rows = service.wait_rows("SELECT project_id, name FROM evactors.events ORDER BY name", 3)
    assert {(r["project_id"], r["name"]) for r in rows} == {
        ("project-b", "E"), ("project-a", "From A"), ("project-b", "From B")}


def test_bad_input_gets_a_clear_error_and_the_rest_is_kept(service: Service) -> None:
    def error(r, status: int, code: str) -> dict:  # type: ignore[no-untyped-def]
        assert r.status_code == status, r.text
        assert r.headers["content-type"] == "application/json"
        body = r.json()
        assert body["success"] is False and body["error"] == code, body
        return body

    error(service.post("/v1/batch", raw=b'{"batch": [ {"type": '), 400, "malformed_json")
    error(service.post("/v1/track", raw=b"not json at all"), 400, "malformed_json")
    body = error(service.post("/v1/track", {"anonymousId": "a", "event": 42}), 400, "invalid_event")
    assert body["field"] == "event" and "str" in body["message"]
    body = error(service.post("/v1/track", {"event": "No Ids"}), 400, "invalid_event")
    assert body["field"] == "userId" and "anonymousId" in body["message"]
    body = error(service.post("/v1/track", {"anonymousId": "a", "event": "E",
                                            "timestamp": "yesterday"}), 400, "invalid_event")
    assert body["field"] == "timestamp"
    body = error(service.post("/v1/batch", {"batch": "nope"}), 400, "invalid_batch")
    assert body["field"] == "batch"
    # Segment's limits: 32 KB per event, 500 KB per batch
    big_event = message("track", event="Big", properties={"blob": "x" * 33_000})
    body = error(service.post("/v1/track", big_event), 400, "event_too_large")
    assert "32 KB" in body["message"]
    huge = {"batch": [message("track", event="E", properties={"blob": "y" * 20_000}) for _ in range(30)]}
    body = error(service.post("/v1/batch", huge), 413, "batch_too_large")
    assert "500 KB" in body["message"]
    # gzip: a broken stream is refused, a gzip bomb is cut off at the limit
    error(service.post("/v1/batch", raw=b"\x1f\x8b\x08\x00garbage", headers={"content-encoding": "gzip"}),
          400, "bad_gzip")
    bomb = gzip.compress(b'{"batch": [' + b" " * 50_000_000 + b"]}")
    assert len(bomb) < 500_000
    error(service.post("/v1/batch", raw=bomb, headers={"content-encoding": "gzip"}), 413, "batch_too_large")
    error(service.post("/v1/batch", raw=b"{}", headers={"content-encoding": "br"}), 415, "unsupported_encoding")
    # unknown endpoint, wrong method
    assert service.post("/v2/track", {}).status_code == 404
    assert service.http.get(f"{service.url}/v1/track").status_code == 405

    # a batch with some bad messages: the valid ones are stored, the reply says what was not
    good = [message("track", event=f"Good {i}", anonymousId="mixed", context={"userAgent": CHROME})
            for i in range(3)]
    bad = [{"type": "track", "anonymousId": "mixed"},  # no event name
           {"type": "teleport", "anonymousId": "mixed"},  # unknown type
           {"type": "track", "event": "E", "anonymousId": ["not", "a", "string"]},
           message("track", event="Too big", properties={"blob": "z" * 40_000})]
    r = service.batch([good[0], bad[0], good[1], bad[1], bad[2], good[2], bad[3]])
    body = error(r, 400, "invalid_events")
    assert body["accepted"] == 3
    rejected = {x["index"]: x for x in body["rejected"]}
    assert set(rejected) == {1, 3, 4, 6}
    assert rejected[1]["field"] == "event"
    assert rejected[3]["field"] == "type" and "teleport" in rejected[3]["error"]
    assert rejected[4]["field"] == "anonymousId"
    assert "32 KB" in rejected[6]["error"]

    # gzip bodies are accepted, and the service still serves normally
    r = service.batch([message("track", event="Zipped", anonymousId="mixed")], gzipped=True)
    assert r.status_code == 200, r.text
    rows = service.wait_rows("SELECT name FROM evactors.events ORDER BY name", 4)
    assert [r["name"] for r in rows] == ["Good 0", "Good 1", "Good 2", "Zipped"]


def test_retries_without_message_id_are_deduplicated_and_odd_values_rejected(service: Service) -> None:
    no_id = {"type": "track", "event": "No Id", "anonymousId": "retry", "properties": {"n": 1}}
    for _ in range(3):  # an SDK retrying the same request: same bytes, same derived id
        assert service.batch([no_id]).status_code == 200
    r = service.batch([no_id, {**no_id, "properties": {"huge": 2**70}},
                       {**no_id, "timestamp": "1970-01-02T00:00:00Z"}])
    body = r.json()
    assert r.status_code == 400 and body["accepted"] == 1
    assert {x["field"] for x in body["rejected"]} == {"properties", "timestamp"}
    # message 0 of the last request has the same bytes and place as before: the same id
    assert service.batch([message("track", event="Marker", anonymousId="retry")]).status_code == 200
    service.wait_rows("SELECT 1 FROM evactors.events WHERE name = 'Marker'", 1)
    assert len(service.query("SELECT message_id FROM evactors.events WHERE name = 'No Id'")) == 1


def test_cors_preflight_for_browser_sdks(service: Service) -> None:
    r = service.http.options(f"{service.url}/v1/batch", headers={
        "origin": "https://shop.example", "access-control-request-method": "POST"})
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == "*"
    assert "authorization" in r.headers["access-control-allow-headers"].lower()


def test_health_and_metrics(service: Service) -> None:
    assert service.http.get(f"{service.url}/health/live").status_code == 200
    assert service.http.get(f"{service.url}/health/ready").json() == {"status": "ready"}
    service.batch([message("track", event="Counted")])
    metrics = service.metrics()
    assert 'evactors_events_accepted_total{project="project-a"} 1.0' in metrics
    assert json.dumps  # keep import used
