"""The local Valkey cluster launcher (``evactors.harness.valkey_cluster``), against real
``valkey-server`` processes: it forms a cluster of 3 masters and 3 replicas that a cluster
client can use over all slots, a killed master's replica takes over with the data
replicated to it, the killed node comes back as a replica, and stop leaves no process."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from redis.cluster import ClusterNode, RedisCluster, key_slot

from evactors.harness.valkey_cluster import LocalValkeyCluster, Node


def _cluster_info(node: Node) -> dict[str, str]:
    with node.client() as client:
        text = client.execute_command("CLUSTER", "INFO")
    return dict(line.split(":", 1) for line in text.split() if ":" in line)


def _client(cluster: LocalValkeyCluster) -> RedisCluster:
    seeds = [ClusterNode("127.0.0.1", node.port) for node in cluster.nodes() if node.alive]
    return RedisCluster(startup_nodes=seeds, decode_responses=True, socket_timeout=2)


def _assert_gone(pids: list[int]) -> None:
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_start_forms_a_cluster_that_serves_every_slot(tmp_path: Path) -> None:
    with LocalValkeyCluster(tmp_path, masters=3, replicas_per_master=1) as cluster:
        pids = [node.pid for node in cluster.nodes() if node.pid is not None]
        assert len(pids) == 6 and all(node.alive for node in cluster.nodes())
        for node in cluster.nodes():
            info = _cluster_info(node)
            assert info["cluster_state"] == "ok"
            assert info["cluster_known_nodes"] == "6" and info["cluster_size"] == "3"
            assert info["cluster_slots_assigned"] == "16384"

        masters = cluster.masters()
        replicas = [node for node in cluster.nodes() if node.role == "replica"]
        assert len(masters) == 3 and len(replicas) == 3
        # one replica per master, each synced
        assert sorted(r.master_id for r in replicas) == sorted(m.node_id for m in masters)
        for replica in replicas:
            with replica.client() as client:
                assert client.info("replication")["master_link_status"] == "up"
        assert cluster.url == "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in cluster.nodes())

        keys = [f"key:{i}" for i in range(100)]
        # the keys land on every master (fixed names: deterministic)
        assert {cluster.master_of_slot(key_slot(k.encode())).port for k in keys} == {m.port for m in masters}
        client = _client(cluster)
        try:
            for key in keys:
                assert client.set(key, f"value of {key}")
            assert [client.get(key) for key in keys] == [f"value of {key}" for key in keys]
        finally:
            client.close()
    _assert_gone(pids)
    assert not any(node.alive for node in cluster.nodes())


def test_failover_restart_and_stop(tmp_path: Path) -> None:
    cluster = LocalValkeyCluster(tmp_path, masters=3, replicas_per_master=1)
    cluster.start()
    try:
        pids = [node.pid for node in cluster.nodes() if node.pid is not None]
        key = "survives:{failover}"
        old = cluster.master_of_slot(key_slot(key.encode()))
        [replica] = [n for n in cluster.nodes() if n.role == "replica" and n.master_id == old.node_id]
        with old.client() as direct:
            direct.set(key, "still here")
            # acknowledged by the replica before the crash: the failover cannot lose it
            assert direct.wait(1, 2000) == 1

        client = _client(cluster)
        try:
            assert client.get(key) == "still here"
            began = time.monotonic()
            cluster.kill(old)
            assert not old.alive
            new = cluster.wait_failover(old, timeout=20)
            failover_s = time.monotonic() - began
            assert new is replica and new.role == "master"
            assert cluster.master_of_slot(key_slot(key.encode())) is replica
            assert old not in cluster.masters() and len(cluster.masters()) == 3
            # the same client object follows the topology change
            assert client.get(key) == "still here"
        finally:
            client.close()

        cluster.restart(old, timeout=20)
        assert old.pid is not None and old.pid not in pids
        pids.append(old.pid)
        cluster.wait_healthy(timeout=20)
        assert old.alive and old.role == "replica" and old.master_id == new.node_id
        with old.client() as direct:
            assert direct.info("replication")["master_link_status"] == "up"
            # synced from the new master: the key is there (READONLY: a replica may answer)
            direct.execute_command("READONLY")
            assert direct.get(key) == "still here"
        assert all(_cluster_info(node)["cluster_state"] == "ok" for node in cluster.nodes())
        assert failover_s < 20
    finally:
        cluster.stop()
    _assert_gone(pids)
    assert not any(node.alive for node in cluster.nodes())
    cluster.stop()  # idempotent
