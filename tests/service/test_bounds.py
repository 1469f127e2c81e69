"""Every request bounded before it costs anything (issue 16, items 1, 2 and 8): a long user
agent, slow headers and bodies, too many connections, floods from one key or one device,
and the small ones (a non-ASCII Bearer token, /metrics, gzip members, h2c, SIGHUP with no
keys, the generated key printed once). Each answer is a clear 4xx/503 with a JSON error,
and everyone else is still served."""

from __future__ import annotations

import base64
import gzip
import json
import signal
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from conftest import Service, StallProbe, message


def _address(service: Service) -> tuple[str, int]:
    url = urlsplit(service.url)
    return url.hostname or "127.0.0.1", url.port or 80


def _connect(service: Service, source: str = "127.0.0.1", timeout: float = 10) -> socket.socket:
    return socket.create_connection(_address(service), timeout=timeout, source_address=(source, 0))


def _status(sock: socket.socket, timeout: float) -> tuple[int, bytes]:
    """The status and body of the first answer on ``sock`` (0: closed without one)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        pass
    if not data.startswith(b"HTTP/1.1 "):
        return 0, data
    return int(data[9:12]), data.partition(b"\r\n\r\n")[2]


def _length(data: bytes) -> int:
    for line in data.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def _basic(key: str) -> str:
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()


# --- item 1: user agents -----------------------------------------------------------------

def test_device_type_is_linear_in_the_length_of_the_user_agent() -> None:
    from evactors.enrichment.useragent import device_type

    for ua in ("Tizen" * 6000, "WebOS " * 10_000, "Mozilla/5.0 " + "a" * 60_000):
        started = time.perf_counter()
        device_type(ua, "")
        assert time.perf_counter() - started < 0.05, ua[:20]  # Python re: 1.6 s for the first


def test_every_pattern_run_on_a_user_agent_is_re2() -> None:
    from evactors.enrichment import bots, useragent

    patterns = [useragent._TV, useragent._CONSOLE, useragent._WEARABLE, useragent._TABLET,
                useragent._MOBILE, bots.SEED, bots.HEADLESS, bots.SERVER_SDK, bots.HTTP_CLIENT,
                bots.CRAWLERS]
    assert all(type(p).__module__.startswith("re2") for p in patterns), \
        [type(p).__module__ for p in patterns]  # bots._compile falls back to re silently


def test_a_60_kb_user_agent_is_cut_to_1_kb_and_does_not_stall_the_service(make_service) -> None:  # type: ignore[no-untyped-def]
    service: Service = make_service(env={"EVACTORS_PIPELINE_PII": "keep"}).start()
    long_header = "Mozilla/5.0 " + "Tizen" * 12_000
    with StallProbe(service) as probe:
        started = time.monotonic()
        r = service.http.post(f"{service.url}/v1/track", auth=("key-a", ""),
                              json={"anonymousId": "ua-1", "event": "Long header UA"},
                              headers={"user-agent": long_header[:60_000]})
        header_ack = time.monotonic() - started
        started = time.monotonic()
        body = {"anonymousId": "ua-2", "event": "Long body UA", "context": {"userAgent": "Tizen" * 6000}}
        r2 = service.post("/v1/track", body)
        body_ack = time.monotonic() - started
        rows = service.wait_rows("SELECT name, user_agent FROM evactors.events WHERE name LIKE 'Long %'", 2)
    assert r.status_code == 200 and r2.status_code == 200
    assert header_ack < 1.0 and body_ack < 1.0, (header_ack, body_ack)  # 7.2 s and 1.6 s before
    assert 0 < probe.worst < 0.5, probe.worst  # measured, and short
    assert {row["name"]: len(row["user_agent"]) for row in rows} == {"Long header UA": 1024,
                                                                     "Long body UA": 1024}


# --- item 2: slow clients, connections, rates --------------------------------------------

def test_an_unknown_key_in_the_header_is_refused_before_the_body_is_sent(service: Service) -> None:
    sock = _connect(service)
    sock.sendall(b"POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: " + _basic("not-a-key").encode() + b"\r\nContent-Length: 500000\r\n\r\n")
    started = time.monotonic()
    status, body = _status(sock, timeout=5)  # before: waited for 500 KB that never came
    assert status == 401 and json.loads(body)["error"] == "unauthorized"
    assert time.monotonic() - started < 2
    sock.close()


def test_a_body_trickled_in_gets_408_at_its_total_deadline(make_service) -> None:  # type: ignore[no-untyped-def]
    service: Service = make_service(env={"EVACTORS_LIMITS_BODY_TIMEOUT_SECONDS": "2",
                                         "EVACTORS_LIMITS_MIN_BODY_BYTES_PER_SECOND": "100000"}).start()
    sock = _connect(service)
    sock.sendall(b"POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: " + _basic("key-a").encode() + b"\r\nContent-Length: 1000\r\n\r\n")
    started = time.monotonic()
    sock.setblocking(False)
    answered = b""
    while time.monotonic() - started < 15 and not answered:  # a byte every 0.3 s: each read
        try:                                                 # is well within read_timeout
            sock.send(b" ")
        except OSError:
            break
        time.sleep(0.3)
        try:
            answered = sock.recv(65536)
        except BlockingIOError:
            pass
        except OSError:
            break
    elapsed = time.monotonic() - started
    assert answered.startswith(b"HTTP/1.1 408"), answered[:200]
    assert b'"error":"body_timeout"' in answered
    assert elapsed < 5, elapsed  # 2 s + 1000 B at 100 KB/s, then the answer
    sock.close()
    assert service.batch([message("track", event="After slow body")]).status_code == 200


def test_headers_trickled_in_are_cut_off_at_the_header_deadline(make_service) -> None:  # type: ignore[no-untyped-def]
    service: Service = make_service(env={"EVACTORS_SERVER_READ_TIMEOUT_SECONDS": "3"}).start()
    sock = _connect(service)
    started = time.monotonic()
    closed = False
    request = b"POST /v1/batch HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 200
    for byte in request:  # one byte every 0.2 s: never 3 s without one
        try:
            sock.send(bytes([byte]))
            sock.settimeout(0.2)
            if sock.recv(1024) == b"":
                closed = True
                break
        except TimeoutError:
            continue
        except OSError:
            closed = True
            break
    assert closed and time.monotonic() - started < 6, time.monotonic() - started
    sock.close()


def test_connections_past_the_per_ip_and_total_caps_are_refused_and_others_served(make_service) -> None:  # type: ignore[no-untyped-def]
    service: Service = make_service(env={"EVACTORS_LIMITS_MAX_CONNECTIONS_PER_IP": "20",
                                         "EVACTORS_LIMITS_MAX_CONNECTIONS": "40"}).start()
    held = [_connect(service, "127.0.0.2") for _ in range(20)]
    time.sleep(0.3)
    extra = _connect(service, "127.0.0.2")
    status, body = _status(extra, timeout=5)
    assert status == 429 and json.loads(body)["error"] == "too_many_connections"
    with httpx.Client(timeout=10) as other:  # another address is served meanwhile
        r = other.post(f"{service.url}/v1/batch", auth=("key-a", ""),
                       json={"batch": [message("track", event="Other address")]})
        assert r.status_code == 200
    held += [_connect(service, f"127.0.0.{3 + i // 10}") for i in range(20)]  # 40 open
    time.sleep(0.3)
    full = _connect(service, "127.0.0.9")
    assert _status(full, timeout=5)[0] == 503
    for sock in [*held, extra, full]:
        sock.close()
    time.sleep(0.5)
    r = service.batch([message("track", event="After the caps")])
    assert r.status_code == 200, r.text
    assert service.proc is not None and service.proc.poll() is None


def test_a_flooding_device_gets_429_with_retry_after_while_other_devices_are_served(make_service) -> None:  # type: ignore[no-untyped-def]
    service: Service = make_service(env={"EVACTORS_LIMITS_DEVICE_EVENTS_PER_SECOND": "2",
                                         "EVACTORS_LIMITS_DEVICE_BURST_EVENTS": "20"}).start()
    flood = [message("track", event="Flood", anonymousId="flooder") for _ in range(20)]
    assert service.batch(flood).status_code == 200  # the burst
    more = [message("track", event="Flood", anonymousId="flooder") for _ in range(10)]
    r = service.batch(more)
    assert r.status_code == 429 and r.json()["error"] == "rate_limited", r.text
    assert 1 <= int(r.headers["retry-after"]) <= 10
    calm = [message("track", event="Calm", anonymousId="calm")]
    assert service.batch(calm).status_code == 200
    service.wait_rows("SELECT 1 FROM evactors.events WHERE name = 'Calm'", 1)
    time.sleep(1)
    assert len(service.query("SELECT 1 FROM evactors.events WHERE name = 'Flood'")) == 20  # none of the 429


def test_a_flooding_key_gets_429_before_its_body_is_read_while_other_keys_are_served(make_service) -> None:  # type: ignore[no-untyped-def]
    service: Service = make_service(write_keys={"key-a": "project-a", "key-b": "project-b"},
                                    env={"EVACTORS_LIMITS_KEY_EVENTS_PER_SECOND": "1",
                                         "EVACTORS_LIMITS_KEY_BURST_EVENTS": "30"}).start()
    batch = [message("track", event="Key flood", anonymousId=f"d{i}") for i in range(30)]
    assert service.batch(batch).status_code == 200
    r = service.batch([message("track", event="Key flood")])
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1, r.text
    sock = _connect(service)  # the key's bucket is empty: refused before any body byte
    sock.sendall(b"POST /v1/batch HTTP/1.1\r\nHost: x\r\nAuthorization: " + _basic("key-a").encode()
                 + b"\r\nContent-Length: 100000\r\n\r\n")
    assert _status(sock, timeout=5)[0] == 429
    sock.close()
    assert service.batch([message("track", event="Key b")], key="key-b").status_code == 200


def test_too_many_bodies_in_flight_get_503_and_memory_stays_bounded(make_service) -> None:  # type: ignore[no-untyped-def]
    service: Service = make_service(env={"EVACTORS_LIMITS_MAX_PENDING_BODY_BYTES": "100000"}).start()
    slow = _connect(service)
    slow.sendall(b"POST /v1/batch HTTP/1.1\r\nHost: x\r\nAuthorization: " + _basic("key-a").encode()
                 + b"\r\nContent-Length: 90000\r\n\r\n{")
    time.sleep(0.3)
    r = service.post("/v1/batch", raw=b"{" + b" " * 20_000 + b'"batch":[]}')
    assert r.status_code == 503 and r.json()["error"] == "busy" and "retry-after" in r.headers
    slow.close()
    time.sleep(0.3)
    assert service.batch([message("track", event="After the budget")]).status_code == 200


# --- item 8: the small ones ---------------------------------------------------------------

def test_a_bearer_token_that_is_not_ascii_is_a_401_not_a_500(service: Service) -> None:
    for path, method in (("/admin/status", "GET"), ("/admin/query", "POST")):
        r = service.admin_request(method, path, b"SELECT 1", token="caf\u00e9-\u00ff")
        assert r.status_code == 401, (path, r.status_code, r.text)
    assert "Traceback" not in service.log()


def test_metrics_are_not_on_the_public_listener(service: Service) -> None:
    r = service.http.get(f"{service.url}/metrics")  # project ids and volumes: admin listener only
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    assert "evactors_events_accepted" in service.metrics()


def test_gzip_with_trailing_junk_is_refused_and_several_members_are_joined(service: Service) -> None:
    body = json.dumps({"batch": [message("track", event="Two members")]}).encode()
    half = len(body) // 2
    r = service.post("/v1/batch", raw=gzip.compress(body[:half]) + gzip.compress(body[half:]),
                     headers={"content-encoding": "gzip"})
    assert r.status_code == 200, r.text
    junk = json.dumps({"batch": [message("track", event="Junk after")]}).encode()
    r = service.post("/v1/batch", raw=gzip.compress(junk) + b"junk", headers={"content-encoding": "gzip"})
    assert r.status_code == 400 and r.json()["error"] == "bad_gzip", r.text
    service.wait_rows("SELECT 1 FROM evactors.events WHERE name = 'Two members'", 1)
    assert not service.query("SELECT 1 FROM evactors.events WHERE name = 'Junk after'")


def _h2c_upgrade(service: Service) -> bytes:
    sock = _connect(service)
    sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                 b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n")
    status, body = _status(sock, timeout=5)
    sock.close()
    return f"{status} ".encode() + body


def test_http2_cleartext_is_off_unless_configured(make_service) -> None:  # type: ignore[no-untyped-def]
    service: Service = make_service().start()
    answer = _h2c_upgrade(service)
    assert answer.startswith(b"200 ") and b'"live"' in answer, answer[:200]
    on: Service = make_service("h2c", env={"EVACTORS_SERVER_HTTP2_CLEARTEXT": "true"}).start()
    assert _h2c_upgrade(on).startswith(b"101 ")


def test_sighup_with_no_write_keys_revokes_the_configured_ones(make_service, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    conf = tmp_path / "evactors.toml"
    conf.write_text('[write_keys]\nold-key = "project-a"\n')
    service: Service = make_service(write_keys={}, args=["--config", str(conf)]).start()
    body = {k: v for k, v in message("track", event="E").items() if k != "type"}
    assert service.post("/v1/track", body, key="old-key").status_code == 200
    conf.write_text("")  # the last key removed
    assert service.proc is not None
    service.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while "every configured key is revoked" not in service.log():
        assert time.monotonic() < deadline, service.log()[-2000:]
        time.sleep(0.05)
    assert service.post("/v1/track", body, key="old-key").status_code == 401
    generated = (service.data_dir / "write_key").read_text().strip().partition("=")[0]
    assert service.post("/v1/track", body, key=generated).status_code == 200  # as a restart would


def test_the_generated_write_key_is_printed_only_when_it_is_made(make_service) -> None:  # type: ignore[no-untyped-def]
    service: Service = make_service(write_keys={}).start()
    key = (service.data_dir / "write_key").read_text().strip().partition("=")[0]
    assert service.log().count(f"write key: {key}") == 1
    assert service.stop() == 0
    service.start()
    assert service.log().count(f"write key: {key}") == 1  # not again on the second start


def test_headers_far_over_64_kb_get_431_with_a_json_error(service: Service) -> None:
    r = httpx.post(f"{service.url}/v1/track", content=b"{}", auth=("key-a", ""),
                   headers={"x-junk": "j" * 200_000})
    assert r.status_code == 431 and r.json()["error"] == "headers_too_large", r.text
    assert service.batch([message("track", event="After huge headers")]).status_code == 200


def test_clients_that_hang_up_mid_body_never_bring_the_service_down(service: Service) -> None:
    # hypercorn answers the broken request (400) while closing the connection from another
    # task: two senders on one socket, BusyResourceError, and the listener's nursery ended
    for _ in range(40):
        sock = _connect(service)
        sock.sendall(b"POST /v1/batch HTTP/1.1\r\nHost: x\r\nAuthorization: " + _basic("key-a").encode()
                     + b"\r\nContent-Length: 90000\r\n\r\n{")
        time.sleep(0.02)
        sock.close()
    time.sleep(0.5)
    assert service.proc is not None and service.proc.poll() is None
    assert "Traceback" not in service.log()
    assert service.batch([message("track", event="After hang-ups")]).status_code == 200
