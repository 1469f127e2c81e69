"""Fuzzing the HTTP API: ≥ 100,000 generated and mutated requests. Never a 5xx, never a
crash, memory bounded, and the valid events sent alongside all stored exactly once.

Hypothesis generates a corpus of structured requests (Segment-shaped messages with every
field possibly wrong, arbitrary JSON, gzip, broken encodings, deep nesting); a seeded
mutator derives the 100,000 requests from it (byte flips, truncations, insertions, splices),
sent by 8 threads. Two steps because hypothesis's own bookkeeping is too slow for 100k."""

from __future__ import annotations

import gzip
import json
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Service, StallProbe, message, record_fault_result, record_hostile_result

pytestmark = pytest.mark.slow

CORPUS, REQUESTS = 2_000, 100_000

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=False) | st.text(max_size=40)
           | st.sampled_from(["", "track", "page", "identify", "alias", "group", "screen",
                              "2024-01-01T00:00:00Z", "not-a-date", "\x00", "x" * 40_000]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=5), max_leaves=15)
# Segment-shaped messages with every field possibly wrong
fields = st.fixed_dictionaries({}, optional={
    k: json_values for k in ("type", "messageId", "anonymousId", "userId", "event", "name",
                             "properties", "traits", "context", "timestamp", "sentAt",
                             "originalTimestamp", "previousId", "groupId", "writeKey")})
bodies = st.one_of(json_values, fields, st.fixed_dictionaries({"batch": st.lists(fields, max_size=6)}),
                   st.fixed_dictionaries({"batch": json_values}))


@st.composite
def requests(draw: Any) -> tuple[str, bytes, dict[str, str], bool]:
    endpoint = draw(st.sampled_from(["/v1/track", "/v1/page", "/v1/screen", "/v1/identify",
                                     "/v1/group", "/v1/alias", "/v1/batch", "/v1/import",
                                     "/v1/nope", "/live/stream", "/admin/query"]))
    raw = json.dumps(draw(bodies)).encode()
    mutation = draw(st.sampled_from(["none", "flip", "truncate", "insert", "gzip", "badgzip",
                                     "utf8", "deep"]))
    headers: dict[str, str] = {}
    if mutation == "flip" and raw:
        i = draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + bytes([draw(st.integers(0, 255))]) + raw[i + 1:]
    elif mutation == "truncate":
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif mutation == "insert":
        i = draw(st.integers(0, len(raw)))
        raw = raw[:i] + draw(st.binary(max_size=16)) + raw[i:]
    elif mutation == "gzip":
        raw, headers["content-encoding"] = gzip.compress(raw), "gzip"
    elif mutation == "badgzip":
        raw, headers["content-encoding"] = gzip.compress(raw)[:-4] + b"junk", "gzip"
    elif mutation == "utf8":
        raw = raw.replace(b'"', b'"\xff\xfe', 1)
    elif mutation == "deep":
        raw = b'{"batch":' + b"[" * 3000 + b"]" * 3000 + b"}"
    authorized = draw(st.booleans())
    return endpoint, raw, headers, authorized


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_fuzz_the_http_api(service: Service) -> None:
    assert service.proc is not None
    pid = service.proc.pid
    local = threading.local()
    lock = threading.Lock()
    statuses: dict[int, int] = {}
    server_errors: list[tuple[str, int, bytes]] = []
    acked: set[str] = set()
    sent = [0]

    def send(request: tuple[str, bytes, dict[str, str], bool]) -> None:
        client = getattr(local, "client", None) or httpx.Client(timeout=30)
        local.client = client
        endpoint, raw, headers, authorized = request
        r = client.post(f"{service.url}{endpoint}", content=raw, headers=headers,
                        auth=("key-a", "") if authorized else None)
        with lock:
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            sent[0] += 1
            if r.status_code >= 500:
                server_errors.append((endpoint, r.status_code, raw[:200]))

    def send_valid() -> None:
        msg = message("track", event="Valid", anonymousId=f"fz-{uuid.uuid4().hex[:6]}")
        r = httpx.post(f"{service.url}/v1/batch", json={"batch": [msg]}, auth=("key-a", ""), timeout=30)
        if r.status_code == 200:
            with lock:
                acked.add(msg["messageId"])

    corpus: list[tuple[str, bytes, dict[str, str], bool]] = []

    @settings(max_examples=CORPUS, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(requests())
    def collect(request: tuple[str, bytes, dict[str, str], bool]) -> None:
        corpus.append(request)

    collect()
    rng = random.Random(7)

    def mutated() -> tuple[str, bytes, dict[str, str], bool]:
        endpoint, raw, headers, authorized = rng.choice(corpus)
        op = rng.random()
        if raw and op < 0.25:
            i = rng.randrange(len(raw))
            raw = raw[:i] + bytes([rng.randrange(256)]) + raw[i + 1:]
        elif raw and op < 0.4:
            raw = raw[: rng.randrange(len(raw))]
        elif op < 0.55:
            other = rng.choice(corpus)[1]
            raw = raw[: rng.randrange(len(raw) + 1)] + other[rng.randrange(len(other) + 1):]
        return endpoint, raw, headers, authorized

    service.batch([message("track", event="Warmup")])
    rss_start = _rss_mb(pid)
    started = time.monotonic()

    def worker(count: int) -> None:
        for i in range(count):
            send(mutated())
            if i % 20 == 0:
                send_valid()

    with StallProbe(service, interval=0.1) as probe, ThreadPoolExecutor(8) as pool:
        for future in [pool.submit(worker, REQUESTS // 8) for _ in range(8)]:
            future.result()
    seconds = time.monotonic() - started
    rss_end = _rss_mb(pid)
    print(f"\nfuzz: {sent[0]} requests in {seconds:.0f}s, statuses {dict(sorted(statuses.items()))}, "
          f"RSS {rss_start:.0f} → {rss_end:.0f} MB")
    assert sent[0] >= 100_000
    assert not server_errors, server_errors[:5]
    assert service.proc.poll() is None and "Traceback" not in service.log()
    assert rss_end < rss_start + 300, (rss_start, rss_end)  # bounded: caches are LRUs
    deadline = time.monotonic() + 60
    while True:
        stored = [r["message_id"] for r in service.query(
            "SELECT message_id FROM evactors.events WHERE name = 'Valid'")]
        if acked <= set(stored) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    result = record_fault_result("fuzz: 100k hostile requests, valid alongside", 1, acked, stored)
    record_hostile_result("fuzz (100k generated and mutated requests)", sent[0], len(server_errors),
                          probe.worst, rss_start, rss_end, acked, stored)
    assert result["lost"] == 0 and result["doubled"] == 0, result
