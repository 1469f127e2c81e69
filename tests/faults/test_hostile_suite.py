"""The hostile-input suite (slow CI step): what an attacker on the network can send, each
case against its own service, with /health/live probed throughout. Each case records a
row of the summary table (conftest.record_hostile_result): attempts, 5xx seen, the longest
/health/live answer, RSS before and after, and the events acknowledged alongside, stored
exactly once. The fuzz test (test_fuzz.py) adds its row; a full Redis adds its own the
same way.

Load is bounded (hundreds to 10,000 sockets, seconds each) and stays on 127.0.0.0/8:
slow clients come from other loopback addresses (127.0.x.y) so that the per-IP cap
applies to them and not to the probe and the normal sender on 127.0.0.1."""

from __future__ import annotations

import base64
import gzip
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from conftest import Service, StallProbe, message, open_sockets, record_hostile_result, rss_mb

pytestmark = pytest.mark.slow


def _address(service: Service) -> tuple[str, int]:
    url = urlsplit(service.url)
    return url.hostname or "127.0.0.1", url.port or 80


def _source(i: int, per_ip: int = 50) -> str:
    """The i-th slow client's loopback address: ``per_ip`` clients share one."""
    n = i // per_ip
    return f"127.0.{1 + n // 250}.{2 + n % 250}"


def _basic(key: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{key}:".encode())


class Normal:
    """One well-behaved sender on 127.0.0.1: a small batch every ``every`` seconds; what
    was acknowledged, and every 5xx or failure."""

    def __init__(self, service: Service, event: str, key: str = "key-a", every: float = 0.2) -> None:
        self.service, self.event, self.key, self.every = service, event, key, every
        self.acked: set[str] = set()
        self.statuses: dict[Any, int] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                batch = [message("track", event=self.event, anonymousId=f"n-{uuid.uuid4().hex[:8]}")]
                try:
                    r = client.post(f"{self.service.url}/v1/batch", json={"batch": batch},
                                    auth=(self.key, ""))
                    status: Any = r.status_code
                except httpx.HTTPError as e:
                    status = type(e).__name__
                self.statuses[status] = self.statuses.get(status, 0) + 1
                if status == 200:
                    self.acked.add(batch[0]["messageId"])
                time.sleep(self.every)

    @property
    def failures(self) -> int:
        return sum(n for s, n in self.statuses.items() if not isinstance(s, int) or s >= 500)

    def __enter__(self) -> Normal:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(60)


def _stored_once(service: Service, event: str, acked: set[str], timeout: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout
    stored: list[str] = []
    while time.monotonic() < deadline:
        stored = [r["message_id"] for r in service.query(
            f"SELECT message_id FROM evactors.events WHERE name = '{event}'")]
        if acked <= set(stored):
            break
        time.sleep(0.3)
    time.sleep(0.5)
    return [r["message_id"] for r in service.query(
        f"SELECT message_id FROM evactors.events WHERE name = '{event}'")]


@contextmanager
def _watched(service: Service, event: str) -> Iterator[tuple[StallProbe, Normal, dict[str, float]]]:
    assert service.proc is not None
    rss = {"before": rss_mb(service.proc.pid)}
    with StallProbe(service) as probe, Normal(service, event) as normal:
        yield probe, normal, rss
    rss["after"] = rss_mb(service.proc.pid)


def _finish(service: Service, case: str, attempts: int, server_errors: int, probe: StallProbe,
            normal: Normal, rss: dict[str, float]) -> dict[str, Any]:
    stored = _stored_once(service, normal.event, normal.acked)
    result = record_hostile_result(case, attempts, server_errors + normal.failures, probe.worst,
                                   rss["before"], rss["after"], normal.acked, stored)
    assert normal.acked, normal.statuses  # the normal sender was served
    assert probe.worst > 0 and probe.errors == 0, (probe.worst, probe.errors)
    assert result["5xx"] == 0, (normal.statuses, result)
    assert result["once"] == result["acked"] and result["doubled"] == 0, result
    assert service.proc is not None and service.proc.poll() is None
    assert "Traceback" not in service.log()
    return result


def test_slowloris_headers_are_cut_off_and_others_served(make_service) -> None:  # type: ignore[no-untyped-def]
    service: Service = make_service(env={"EVACTORS_SERVER_READ_TIMEOUT_SECONDS": "4"}).start()
    assert service.proc is not None
    base = open_sockets(service.proc.pid)
    with _watched(service, "Beside slow headers") as (probe, normal, rss):
        socks = [socket.create_connection(_address(service), source_address=(_source(i), 0))
                 for i in range(500)]
        started = time.monotonic()
        while time.monotonic() - started < 10:  # a header byte per socket every second
            for s in socks:
                try:
                    s.send(b"X")
                except OSError:
                    pass
            time.sleep(1)
        left = open_sockets(service.proc.pid) - base
    for s in socks:
        s.close()
    _finish(service, "slowloris headers (500 sockets, 1 B/s)", len(socks), 0, probe, normal, rss)
    assert left <= 5, left  # all cut at the 4 s header deadline


def test_slowloris_bodies_get_408_and_memory_stays_bounded(make_service) -> None:  # type: ignore[no-untyped-def]
    service: Service = make_service(env={"EVACTORS_LIMITS_BODY_TIMEOUT_SECONDS": "3",
                                         "EVACTORS_LIMITS_MIN_BODY_BYTES_PER_SECOND": "200000"}).start()
    statuses: dict[int, int] = {}
    with _watched(service, "Beside slow bodies") as (probe, normal, rss):
        socks = []
        for i in range(500):
            s = socket.create_connection(_address(service), source_address=(_source(i), 0))
            s.sendall(b"POST /v1/batch HTTP/1.1\r\nHost: x\r\nAuthorization: " + _basic("key-a")
                      + b"\r\nContent-Length: 500000\r\n\r\n{\"batch\":[")
            s.setblocking(False)
            socks.append(s)
        started = time.monotonic()
        answers: dict[int, bytes] = {}
        while time.monotonic() - started < 12 and len(answers) < len(socks):
            for i, s in enumerate(socks):  # 100 bytes a second each: far below the rate
                if i in answers:
                    continue
                try:
                    s.send(b" " * 100)
                except OSError:
                    pass
                try:
                    answers[i] = s.recv(4096) or b"closed"
                except BlockingIOError:
                    pass
                except OSError:
                    answers[i] = b"reset"
            time.sleep(1)
    for data in answers.values():
        code = int(data[9:12]) if data.startswith(b"HTTP/1.1 ") else 0
        statuses[code] = statuses.get(code, 0) + 1
    for s in socks:
        s.close()
    server_errors = sum(n for code, n in statuses.items() if code >= 500 and code != 503)
    _finish(service, "slowloris bodies (500 × 500 KB at 100 B/s)", len(socks), server_errors,
            probe, normal, rss)
    assert len(answers) == len(socks), statuses  # every one answered or closed within 12 s
    assert set(statuses) <= {408, 503, 0}, statuses  # 408 at the deadline, 503 past the budget
    assert rss["after"] - rss["before"] < 150, rss


def test_1500_slow_clients_are_bounded_in_connections_and_memory(make_service) -> None:  # type: ignore[no-untyped-def]
    service: Service = make_service().start()
    assert service.proc is not None
    pid = service.proc.pid
    peak = 0
    with _watched(service, "Beside 1500 slow clients") as (probe, normal, rss):
        socks = []
        for i in range(1500):  # unauthenticated uploads: the key, if any, would be in the body
            s = socket.create_connection(_address(service), source_address=(_source(i, 10), 0))
            s.sendall(b"POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 500000\r\n\r\n{\"batch\":[")
            s.setblocking(False)
            socks.append(s)
        started = time.monotonic()
        while time.monotonic() - started < 45:
            for s in socks:
                try:
                    s.send(b" " * 1000)
                except OSError:
                    pass
            peak = max(peak, open_sockets(pid))
            time.sleep(2)
        left = open_sockets(pid)
    for s in socks:
        s.close()
    print(f"\n1500 slow clients: server sockets peak {peak}, after 45 s {left}; "
          f"RSS {rss['before']:.0f} → {rss['after']:.0f} MB; /health/live worst {probe.worst:.2f} s")
    _finish(service, "1500 slow uploads, no key (1 KB/2 s)", len(socks), 0, probe, normal, rss)
    assert peak < 400, peak  # the body budget (128 MB = 268 × 500 KB) refuses the rest at once
    assert left < 30, left  # the admitted ones cut at 10 s + 500 KB / 20 KB/s = 35 s
    assert rss["after"] - rss["before"] < 150, rss


def test_huge_and_many_headers_get_4xx(make_service) -> None:  # type: ignore[no-untyped-def]
    service: Service = make_service().start()
    statuses: dict[int, int] = {}
    with _watched(service, "Beside huge headers") as (probe, normal, rss):
        with httpx.Client(timeout=30) as client:
            for i in range(200):
                if i % 2:
                    headers = {"x-junk": "j" * (200_000 + i)}
                else:
                    headers = {f"x-h{j}": "v" * 100 for j in range(1000)}
                try:
                    r = client.post(f"{service.url}/v1/track", content=b"{}", auth=("key-a", ""),
                                    headers=headers)
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                except httpx.HTTPError:
                    statuses[0] = statuses.get(0, 0) + 1
    server_errors = sum(n for code, n in statuses.items() if code >= 500)
    _finish(service, "huge headers (200 KB, 1000 headers)", 200, server_errors, probe, normal, rss)
    assert all(400 <= code < 500 or code == 0 for code in statuses), statuses


def test_gzip_bombs_get_413_without_inflating(make_service) -> None:  # type: ignore[no-untyped-def]
    service: Service = make_service().start()
    bomb = gzip.compress(b"[" * (200 << 20), compresslevel=9)  # 200 MB → ~200 KB
    members = gzip.compress(b" " * (400 << 10)) * 3  # each member under the limit, together not
    statuses: dict[int, int] = {}
    with _watched(service, "Beside gzip bombs") as (probe, normal, rss):
        with httpx.Client(timeout=30) as client:
            for i in range(60):
                body = bomb if i % 2 else members
                r = client.post(f"{service.url}/v1/batch", content=body, auth=("key-a", ""),
                                headers={"content-encoding": "gzip"})
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
    _finish(service, "gzip bombs (200 MB in 200 KB, members)", 60,
            sum(n for c, n in statuses.items() if c >= 500), probe, normal, rss)
    assert statuses == {413: 60}, statuses
    assert rss["after"] - rss["before"] < 100, rss


def test_redos_user_agents_neither_stall_nor_lose_events(make_service) -> None:  # type: ignore[no-untyped-def]
    service: Service = make_service().start()
    shapes = ["Tizen" * 12_000, "WebOS " * 10_000, "Mozilla/5.0 (" + "a; " * 20_000,
              "SmartTV" + " " * 60_000 + "x", "Nexus 7" * 8_000, "\\bTV" * 15_000]
    sent: set[str] = set()
    attempts = 0
    with _watched(service, "Beside ReDoS UAs") as (probe, normal, rss), httpx.Client(timeout=60) as client:
        for round_ in range(20):
            for shape in shapes:
                batch = [message("track", event="ReDoS UA", anonymousId=f"r-{round_}-{i}",
                                 context={"userAgent": f"{i}{shape}"[:25_000]}) for i in range(8)]
                r = client.post(f"{service.url}/v1/batch", json={"batch": batch}, auth=("key-a", ""),
                                headers={"user-agent": shape[:60_000].strip()})
                attempts += 1
                assert r.status_code == 200, r.text
                sent |= {m["messageId"] for m in batch}
    stored = _stored_once(service, "ReDoS UA", sent, timeout=60)
    record_hostile_result("ReDoS user agents (60 KB header, 25 KB body)", attempts, 0, probe.worst,
                          rss["before"], rss["after"], sent, stored)
    _finish(service, "  … normal events beside them", attempts, 0, probe, normal, rss)
    assert set(stored) == sent and len(stored) == len(sent)
    assert probe.worst < 1.0, probe.worst  # before: 7.2 s for one such request


def test_10k_idle_connections_are_held_released_and_others_served(make_service) -> None:  # type: ignore[no-untyped-def]
    service: Service = make_service(env={"EVACTORS_SERVER_READ_TIMEOUT_SECONDS": "60"}).start()
    assert service.proc is not None
    pid = service.proc.pid
    base = open_sockets(pid)
    with _watched(service, "Beside 10k idle") as (probe, normal, rss):
        socks = []
        for i in range(9_900):  # the default cap is 10,000; the probe and sender need two
            socks.append(socket.create_connection(_address(service), source_address=(_source(i, 200), 0)))
        held, deadline = 0, time.monotonic() + 30
        while held < 9_900 and time.monotonic() < deadline:  # the kernel's queue hands them over
            time.sleep(0.5)
            held = open_sockets(pid) - base
        time.sleep(2)  # served while they are all held
        for s in socks:
            s.close()
        left, deadline = held, time.monotonic() + 20
        while left > 5 and time.monotonic() < deadline:  # released when their clients go
            time.sleep(0.5)
            left = open_sockets(pid) - base
    print(f"\n10k idle: {held} held at once, {left} left 0–20 s after their clients closed")
    _finish(service, "10k idle connections", len(socks), 0, probe, normal, rss)
    assert held >= 9_900, held
    assert left <= 5, left


def test_rate_limit_floods_get_429_while_other_keys_are_served(make_service) -> None:  # type: ignore[no-untyped-def]
    service: Service = make_service(
        write_keys={"key-a": "project-a", "key-b": "project-b"},
        env={"EVACTORS_LIMITS_DEVICE_EVENTS_PER_SECOND": "50", "EVACTORS_LIMITS_DEVICE_BURST_EVENTS": "200",
             "EVACTORS_LIMITS_KEY_EVENTS_PER_SECOND": "500", "EVACTORS_LIMITS_KEY_BURST_EVENTS": "2000"}).start()
    lock = threading.Lock()
    statuses: dict[int, int] = {}
    acked: set[str] = set()
    retry_afters: set[str] = set()
    stop = threading.Event()

    def flood(worker: int) -> None:
        with httpx.Client(timeout=30) as client:
            n = 0
            while not stop.is_set():
                n += 1
                device = "one-device" if worker < 2 else f"d-{worker}-{n}"  # one id, then many
                batch = [message("track", event="Flood", anonymousId=device) for _ in range(20)]
                r = client.post(f"{service.url}/v1/batch", json={"batch": batch}, auth=("key-a", ""))
                with lock:
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    if r.status_code == 200:
                        acked.update(m["messageId"] for m in batch)
                    elif r.status_code == 429:
                        retry_afters.add(r.headers.get("retry-after", ""))

    with _watched(service, "Beside floods") as (probe, normal, rss):
        normal.key = "key-b"  # another project's sender
        threads = [threading.Thread(target=flood, args=(w,), daemon=True) for w in range(4)]
        for t in threads:
            t.start()
        time.sleep(8)
        stop.set()
        for t in threads:
            t.join(30)
    stored = _stored_once(service, "Flood", acked, timeout=60)
    attempts = sum(statuses.values())
    record_hostile_result("rate-limit floods (one device, one key)", attempts,
                          sum(n for c, n in statuses.items() if c >= 500), probe.worst,
                          rss["before"], rss["after"], acked, stored)
    _finish(service, "  … another key beside them", attempts, 0, probe, normal, rss)
    assert statuses.get(429, 0) > 0 and statuses.get(200, 0) > 0, statuses
    assert set(statuses) <= {200, 429}, statuses
    assert "" not in retry_afters and all(int(v) >= 1 for v in retry_afters), retry_afters
    assert set(stored) == acked and len(stored) == len(acked)
    assert len(acked) <= 2000 + 500 * 12, len(acked)  # burst + rate × the flood's seconds (with slack)
    assert json.loads(service.http.get(f"{service.url}/health/live").text)["status"] == "live"
