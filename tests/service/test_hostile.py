"""Hostile input and access: each case is a clear 4xx or data stored safely, and the
service keeps serving everyone else."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlsplit

import httpx

from conftest import Service, message


def _address(service: Service) -> tuple[str, int]:
    url = urlsplit(service.url)
    return url.hostname or "127.0.0.1", url.port or 80


def test_slow_clients_are_cut_off_and_others_are_served(make_service) -> None:  # type: ignore[no-untyped-def]
    service: Service = make_service(env={"EVACTORS_SERVER_READ_TIMEOUT_SECONDS": "2"}).start()
    slow = []
    for _ in range(50):  # slowloris: start a request, never finish it
        s = socket.create_connection(_address(service))
        s.sendall(b"POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-Le")
        slow.append(s)
    assert service.batch([message("track", event="Meanwhile")]).status_code == 200
    deadline = time.monotonic() + 15
    closed = 0
    for s in slow:
        s.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            closed += s.recv(1024) == b""  # the server hung up on it
        except (TimeoutError, ConnectionResetError):
            closed += 0
        s.close()
    assert closed == len(slow)
    # our own kept-alive connection idled past the 2 s timeout too: the server closed it
    service.http.close()
    service.http = httpx.Client(timeout=30)
    service.wait_rows("SELECT 1 FROM evactors.events WHERE name = 'Meanwhile'", 1)


def test_huge_headers_deep_nesting_and_bad_bytes(service: Service) -> None:
    r = httpx.post(f"{service.url}/v1/track", content=b"{}", auth=("key-a", ""),
                   headers={"x-junk": "j" * 200_000})
    assert 400 <= r.status_code < 500
    nested = b'{"anonymousId":"a","event":"e","properties":' + b'{"a":' * 4_500 + b"1" + b"}" * 4_501
    r = service.post("/v1/track", raw=nested)
    assert r.status_code == 400 and "nested too deeply" in r.json()["message"]
    r = service.post("/v1/track", raw=b'{"anonymousId":"a\xff\xfe","event":"x"}')
    assert r.status_code == 400 and "not UTF-8" in r.json()["message"]
    r = service.post("/v1/track", raw=b'{"anonymousId":"a","event":"\\udc00"}')
    assert r.status_code == 400 and r.json()["error"] == "malformed_json"
    assert service.batch([message("track", event="Still fine")]).status_code == 200


def test_special_characters_are_stored_as_data(service: Service) -> None:
    odd = "a:b{s0}\"q'\n\\x\x00z"
    sqlish = "'; DROP TABLE evactors.events; --"
    msg = {"type": "track", "messageId": f"m{odd}", "anonymousId": f"anon{odd}", "userId": f"user{odd}",
           "event": f"Odd {sqlish}", "properties": {sqlish: odd, "evx:in": "{s1}", "nested": {odd: 1}}}
    assert service.batch([msg]).status_code == 200
    row = service.wait_rows("SELECT device_id, profile_id, message_id, name, properties FROM "
                            "evactors.events WHERE name LIKE 'Odd %'", 1)[0]
    assert row["device_id"] == f"anon{odd}" and row["profile_id"] == f"user{odd}"
    assert row["message_id"] == f"m{odd}" and row["name"] == f"Odd {sqlish}"
    assert row["properties"][sqlish] == odd and row["properties"]["evx:in"] == "{s1}"
    assert row["properties"][f"nested.{odd}"] == "1"
    assert service.batch([msg]).status_code == 200  # the same odd messageId deduplicates
    time.sleep(1.5)
    assert len(service.query("SELECT 1 FROM evactors.events WHERE name LIKE 'Odd %'")) == 1


def test_keys_do_not_cross_projects_or_open_admin(make_service) -> None:  # type: ignore[no-untyped-def]
    service: Service = make_service(write_keys={"key-a": "project-a", "key-b": "project-b"}).start()
    for path, method in (("/admin/query", "POST"), ("/admin/status", "GET")):
        r = service.http.request(method, f"{service.url}{path}", content=b"SELECT 1",
                                 headers={"authorization": "Bearer key-a"})
        assert r.status_code == 404  # not on the public listener at all
        r = service.admin_request(method, path, b"SELECT 1", token="key-a")
        assert r.status_code == 401  # a write key is no admin token
    read_b = service.read_key("project-b")
    with httpx.stream("GET", f"{service.url}/live/stream?key={read_b}", timeout=20) as stream:
        lines = stream.iter_lines()
        assert next(lines) == "event: hello"
        assert next(lines) == 'data: {"project":"project-b"}'
