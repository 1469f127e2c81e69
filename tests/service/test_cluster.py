"""Instances on a Valkey cluster of the test's own (3 masters, 3 replicas, on loopback):
ingest spread over lanes in every master's slots, shards by lease, requests to any
instance, every acknowledged event stored exactly once — and, in the slow fault test, so
through kill -9 of instances, an instance joining and one leaving, and a master killed and
replaced by its replica."""

from __future__ import annotations

import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from test_instances import LEASE_SECONDS, Visitors, check_exactly_once_and_sessions, instance, lease_holders

from conftest import message, run_cli
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
    finally:
        client.close()
    assert all(h.startswith(instance(service) + "/") for h in holders(valkey_cluster))
    # the command line reads the cluster too
    live = run_cli("live", "--project", "project-a", "--data-dir", str(service.data_dir),
                   env={"EVACTORS_REDIS_URL": valkey_cluster.url, "EVACTORS_REDIS_INGEST_LANES": "6",
                        "EVACTORS_PIPELINE_SESSION_SHARDS": str(SHARDS)})
    assert live.returncode == 0, live.stderr
    assert "7 live visitor(s)" in live.stdout and "0 exact" in live.stdout, live.stdout


@pytest.mark.slow
def test_instances_on_a_cluster_through_kills_joins_leaves_and_a_master_failover(
        make_service: Any, valkey_cluster: Any) -> None:
    """Three instances (ingest, sessions) and a flusher on the cluster, load to the three at
    random: ten kill -9 of an instance at random moments (each brought back), one joining
    and one leaving gracefully, two slots moved to another master, and a master killed (its
    replica promoted, then it comes back as a replica). Writes wait for a replica
    (redis.wait_replicas 1)."""
    rng = random.Random(18)
    flusher = make_service("f", env=cluster_env(valkey_cluster, "flusher", 1)).start()
    nodes = [make_service(n, env=cluster_env(valkey_cluster, "ingest,sessions", 1)).start() for n in "abc"]
    load = Visitors(nodes)
    senders = [threading.Thread(target=load.run, args=(i,), daemon=True) for i in range(3)]
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
            t.join(30)
    result = check_exactly_once_and_sessions(
        flusher, load.acked, "3 instances + flusher on a Valkey cluster: kill -9 ×10, join, leave, "
        "2 slots resharded, master failover", trials=len(takeovers) + 5)
    result["takeover_seconds"] = round(max(takeovers), 2)
    print(f"takeover after kill -9: {', '.join(f'{t:.2f}' for t in takeovers)} s (lease {LEASE_SECONDS} s); "
          f"master failover {failover:.2f} s")
    assert max(takeovers) < LEASE_SECONDS + 5
