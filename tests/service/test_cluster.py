"""Instances on a Valkey cluster of the test's own (3 masters, 3 replicas, on loopback):
ingest spread over lanes in every master's slots, shards by lease, requests to any
instance, every acknowledged event stored exactly once — and, in the slow fault test, so
through kill -9 of instances, an instance joining and one leaving, slots moving and a master
killed and replaced by its replica, with every row (sessions included) as the oracle says."""

from __future__ import annotations

import random
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_instances import LEASE_SECONDS, instance, lease_holders
from test_oracle import CLOSE_ON_SHUTDOWN, L, T, compare_rows, read

from conftest import message, record_fault_result, run_cli
from evactors.harness.oracle import Oracle
from evactors.harness.traffic import BAD, Request, TrafficSpec, generate
from evactors.harness.valkey_cluster import LocalValkeyCluster
from evactors.store.redis_io import sync_client

SHARDS = 4


@pytest.fixture
def valkey_cluster(tmp_path: Path) -> Any:
    with LocalValkeyCluster(tmp_path / "cluster", masters=3, replicas_per_master=1) as cluster:
        yield cluster


def cluster_env(cluster: Any, roles: str, wait_replicas: int = 0) -> dict[str, str]:
    return {"EVACTORS_REDIS_URL": cluster.url, "EVACTORS_ROLES": roles,
            "EVACTORS_REDIS_WAIT_REPLICAS": str(wait_replicas), "EVACTORS_REDIS_INGEST_LANES": "6",
            "EVACTORS_PIPELINE_SESSION_SHARDS": str(SHARDS),
            "EVACTORS_PIPELINE_LEASE_SECONDS": str(LEASE_SECONDS),
            "EVACTORS_PIPELINE_REPLAY_AFTER_SECONDS": "5", "EVACTORS_REDIS_TIMEOUT_SECONDS": "2"}


def holders(cluster: Any) -> list[str]:
    return lease_holders(sync_client(cluster.url, 2), SHARDS)


def test_one_instance_on_a_cluster_stores_every_event_once(make_service: Any, valkey_cluster: Any) -> None:
    service = make_service("a", env=cluster_env(valkey_cluster, "ingest,sessions,flusher", 1)).start()
    sent = [message(anonymousId=f"v{i % 7}") for i in range(120)]
    for i in range(0, len(sent), 10):
        assert service.batch(sent[i:i + 10]).status_code == 200
    rows = service.wait_rows("SELECT message_id FROM evactors.events", len(sent))
    assert sorted(r["message_id"] for r in rows) == sorted(m["messageId"] for m in sent)
    # the ingest entries were spread over the lanes, which live on every master
    client = sync_client(valkey_cluster.url, 2)
    try:
        counters = [client.get(f"evx:{{i{i}}}:in:n") for i in range(6)]
        assert sum(counters is not None for counters in counters) >= 3, counters
        masters = {valkey_cluster.master_of_slot(client.keyslot(f"evx:{{i{i}}}:in")).port for i in range(6)}
        assert len(masters) == 3
        # an alias link (another slot than its shard's) is written once its commit is, and
        # nothing stays pending
        assert service.batch([message("alias", anonymousId="v0", previousId="v0", userId="u0")]).status_code == 200
        deadline = time.monotonic() + 10
        while client.get("evx:alias:project-a:v0") != b"u0":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert not any(client.hlen(f"evx:{{s{s}}}:aliases") for s in range(SHARDS))
    finally:
        client.close()
    assert all(h.startswith(instance(service) + "/") for h in holders(valkey_cluster))
    # the command line reads the cluster too
    live = run_cli("live", "--project", "project-a", "--data-dir", str(service.data_dir),
                   env={"EVACTORS_REDIS_URL": valkey_cluster.url, "EVACTORS_REDIS_INGEST_LANES": "6",
                        "EVACTORS_PIPELINE_SESSION_SHARDS": str(SHARDS)})
    assert live.returncode == 0, live.stderr
    # 7 visitors, and u0 once the publisher (a write a second) has seen its alias
    assert re.search(r"\b[78] live visitor\(s\)", live.stdout) and "0 exact" in live.stdout, live.stdout


class OracleTraffic:
    """The oracle's generated traffic (late events, identify/alias, second devices, bots,
    duplicates, invalid messages) from a few senders, each posting its requests one after
    another, each to a live instance at random, and, unanswered (a killed instance, a 503),
    again to another until answered, as an SDK behind a load balancer would: the oracle is
    fed each request once it is answered."""

    def __init__(self, services: list[Any]) -> None:
        self.services = services
        self.oracle = Oracle(T, L)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.acked: set[str] = set()
        self.requests = 0
        self.errors: list[str] = []

    def post(self, client: httpx.Client, rng: random.Random, item: Request) -> int:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            live = [s for s in self.services if s.proc is not None and s.proc.poll() is None]
            try:
                r = client.post(f"{rng.choice(live).url}/v1/batch", content=item.body, auth=(item.project_key, ""),
                                headers={"content-type": "application/json"})
                if r.status_code in (200, 400):
                    return r.status_code
            except (httpx.HTTPError, IndexError):
                pass
            time.sleep(0.05)
        return 0

    def run(self, seed: int) -> None:
        spec = TrafficSpec(seed=seed, users=1_000_000, p_late=0.2, p_identify=0.3, p_alias=0.1, p_bot=0.03,
                           p_duplicate=0.05, p_bad=0.02, p_second_device=0.1, window=16)
        rng, client = random.Random(seed), httpx.Client(timeout=10)
        for item in generate(spec):
            if self.stop.is_set():
                return
            assert isinstance(item, Request)  # no re-maps (remap_fraction 0)
            status = self.post(client, rng, item)
            if status != (400 if item.has_bad else 200):
                self.errors.append(f"request {item.messages[0].get('messageId')}: answered {status}")
                return
            with self.lock:
                self.oracle.feed(item)
                self.requests += 1
                self.acked |= {str(m["messageId"]) for m, kind in zip(item.messages, item.kinds, strict=True)
                               if kind != BAD}


@pytest.mark.slow
def test_instances_on_a_cluster_through_kills_joins_leaves_and_a_master_failover(
        make_service: Any, valkey_cluster: Any) -> None:
    """Three instances (ingest, sessions) and a flusher on the cluster, the oracle's traffic
    to the three at random: ten kill -9 of an instance at random moments (each brought back),
    one joining and one leaving gracefully, two slots moved to another master, and a master
    killed (its replica promoted, then it comes back as a replica). Writes wait for a replica
    (redis.wait_replicas 1). Every answered event is stored once, and every row — events,
    sessions, durations, inheritance, profiles, daily aggregates — is what the oracle says."""
    rng = random.Random(18)
    flusher = make_service("f", env=cluster_env(valkey_cluster, "flusher", 1)).start()
    nodes = [make_service(n, env=cluster_env(valkey_cluster, "ingest,sessions", 1)).start() for n in "abc"]
    load = OracleTraffic(nodes)
    senders = [threading.Thread(target=load.run, args=(seed,), daemon=True) for seed in (181, 182, 183)]
    for t in senders:
        t.start()
    takeovers: list[float] = []
    try:
        for _kill in range(10):
            time.sleep(rng.uniform(0.5, 3.0))
            owners = [s for s in nodes if any(h.startswith(instance(s) + "/") for h in holders(valkey_cluster))]
            victim = rng.choice(owners or nodes)
            held = [i for i, h in enumerate(holders(valkey_cluster)) if h.startswith(instance(victim) + "/")]
            victim.stop(signal.SIGKILL)
            killed = time.monotonic()
            while True:  # its shards held by another live instance
                now = holders(valkey_cluster)
                if all(now[i] and not now[i].startswith(instance(victim) + "/") for i in held):
                    break
                assert time.monotonic() - killed < LEASE_SECONDS + 15, now
                time.sleep(0.05)
            takeovers.append(time.monotonic() - killed)
            victim.start()
        # one joins, one leaves gracefully (its shards handed over)
        d = make_service("d", env=cluster_env(valkey_cluster, "ingest,sessions", 1)).start()
        nodes.append(d)
        time.sleep(3)
        leaving = nodes.pop(0)
        load.services = list(nodes)
        assert leaving.stop(signal.SIGTERM) == 0
        time.sleep(2)
        # resharding under load: the slots of a shard and of an ingest lane move to another
        # master (ASK while they migrate, MOVED after)
        client = sync_client(valkey_cluster.url, 2)
        try:
            for key in ("evx:{s1}:lease", "evx:{i0}:in"):
                slot = client.keyslot(key)
                target = next(m for m in valkey_cluster.masters() if m is not valkey_cluster.master_of_slot(slot))
                assert valkey_cluster.move_slot(slot, target, batch=5, pause=0.05) > 0
        finally:
            client.close()
        # a master killed: its replica is promoted, the instances follow; then it is back
        master = valkey_cluster.master_of_slot(0)
        valkey_cluster.kill(master)
        failed = time.monotonic()
        valkey_cluster.wait_failover(master)
        failover = time.monotonic() - failed
        valkey_cluster.restart(master)  # back as a replica: writes wait for it again
        time.sleep(3)
    finally:
        load.stop.set()
        for t in senders:
            t.join(90)
    assert not load.errors, load.errors
    # the end of the run: every shard to one instance that closes the sessions as it stops
    last = make_service("z", env={**cluster_env(valkey_cluster, "ingest,sessions", 1), **CLOSE_ON_SHUTDOWN}).start()
    late = sum(float(line.split()[1]) for node in nodes for line in node.metrics().splitlines()
               if line.startswith("evactors_commits_late_total "))
    for node in nodes:
        assert node.stop(signal.SIGTERM) == 0
    deadline = time.monotonic() + 30
    while not all(h.startswith(instance(last) + "/") for h in holders(valkey_cluster)):
        assert time.monotonic() < deadline, holders(valkey_cluster)
        time.sleep(0.1)
    assert last.stop(signal.SIGTERM) == 0
    assert flusher.stop(signal.SIGTERM) == 0
    rows = read(flusher)
    result = record_fault_result(
        "3 instances + flusher on a Valkey cluster: kill -9 ×10, join, leave, 2 slots resharded, master "
        "failover", len(takeovers) + 5, load.acked,
        [r["message_id"] for r in rows["events"] + rows["bots"] if r["message_id"] in load.acked])
    assert result["lost"] == 0 and result["doubled"] == 0, result
    expected = load.oracle.expected()
    assert len(expected.events) > 3000 and expected.late.get("reordered", 0) > 50, (len(expected.events), expected.late)
    diffs = compare_rows(expected, rows)
    assert diffs == [], f"{late:.0f} commit_late\n" + "\n".join(diffs[:50])
    result["takeover_seconds"] = round(max(takeovers), 2)
    print(f"{load.requests} requests answered ({late:.0f} answered 503 commit_late by the last three); "
          f"takeover after kill -9: {', '.join(f'{t:.2f}' for t in takeovers)} s (lease {LEASE_SECONDS} s); "
          f"master failover {failover:.2f} s")
    assert max(takeovers) < LEASE_SECONDS + 5
