"""The trio-native client on a real Valkey cluster (3 masters, 3 replicas, the test's own):
commands routed by slot, transactions kept whole, MGET over slots, scripts loaded on every
master, redirections followed when a slot moves (ASK while it migrates, MOVED after), a
master's failover waited out, and writes that wait for a replica."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis as redis_py
import trio

from evactors.harness.valkey_cluster import LocalValkeyCluster
from evactors.store.cluster import slot_of
from evactors.store.redis_io import RedisIO, retrying, transient
from evactors.store.resp import FenceMoved
from evactors.store.scripts import APPEND


@pytest.fixture
def cluster(tmp_path: Path) -> Any:
    with LocalValkeyCluster(tmp_path / "cluster", masters=3, replicas_per_master=1) as c:  # started
        yield c


def run(fn: Any, *args: Any) -> Any:
    return trio.run(fn, *args)


def test_a_pipeline_over_many_slots_transactions_scripts_and_the_fence(cluster: Any) -> None:
    async def go() -> None:
        io = RedisIO(cluster.url, 5)
        try:
            keys = [f"k{i}" for i in range(200)]  # over every master
            assert len({cluster.master_of_slot(slot_of(k)).port for k in keys}) == 3
            replies = await io.execute([["SET", k, k.upper()] for k in keys] + [["MGET", *keys]], check=True)
            assert replies[-1] == [k.upper().encode() for k in keys]  # one MGET, split and joined
            # a transaction over one slot (a hash tag), whole
            tx = await io.execute([["MULTI"], ["INCR", "{s1}:a"], ["INCRBY", "{s1}:b", 5], ["EXEC"]], check=True)
            assert tx[-1] == [1, 5]
            with pytest.raises(redis_py.ResponseError, match="CROSSSLOT"):
                await io.execute([["MULTI"], ["INCR", "{s1}:a"], ["INCR", "{s2}:a"], ["EXEC"]])
            # a script on keys of several masters: loaded where it is missing, run once each
            lanes = [(f"{{i{i}}}:in", f"{{i{i}}}:in:n") for i in range(8)]
            replies = await io.scripts(APPEND, [([s, n], [2, b"x"]) for s, n in lanes])
            assert all(isinstance(r, bytes) for r in replies), replies
            (counts,) = await io.execute([["MGET", *(n for _, n in lanes)]], check=True)
            assert counts == [b"2"] * 8
            # the fence: a transaction only while the fence key holds the writer's token
            await io.execute([["SET", "{s3}:fence", "7"]], check=True)
            done = await io.execute([["MULTI"], ["SET", "{s3}:state", "x"], ["EXEC"]], fence=("{s3}:fence", b"7"))
            assert done[-1] == [b"OK"]
            with pytest.raises(FenceMoved):
                await io.execute([["MULTI"], ["SET", "{s3}:state", "y"], ["EXEC"]], fence=("{s3}:fence", b"6"))
            assert (await io.execute([["GET", "{s3}:state"]]))[0] == b"x"
        finally:
            io.close()

    run(go)


def _move_slot(cluster: Any, slot: int, keys: list[str], source: Any, target: Any) -> None:
    """Start moving ``slot`` from ``source`` to ``target`` as a resharding tool does, and
    move ``keys`` over: the slot is half moved until ``_finish_move``."""
    src, dst = source.client(), target.client()
    dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src.execute_command("CLUSTER", "MYID"))
    src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst.execute_command("CLUSTER", "MYID"))
    for key in keys:
        src.execute_command("MIGRATE", "127.0.0.1", target.port, key, 0, 5000)


def _finish_move(cluster: Any, slot: int, target: Any) -> None:
    target_id = target.client().execute_command("CLUSTER", "MYID")
    for node in cluster.masters():
        node.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)


def test_a_slot_moving_to_another_master_is_followed(cluster: Any) -> None:
    """ASK while the slot migrates (a key already moved, a new key), MOVED once it has:
    the client's old slot map is corrected, nothing is written twice or lost."""
    key, moved, fresh = "{m}:a", "{m}:b", "{m}:c"
    slot = slot_of(key)

    async def go() -> None:
        io = RedisIO(cluster.url, 5)
        try:
            await io.execute([["SET", key, "1"], ["SET", moved, "2"]], check=True)
            source = cluster.master_of_slot(slot)
            target = next(m for m in cluster.masters() if m.port != source.port)
            _move_slot(cluster, slot, [moved], source, target)
            # migrating: `key` still on the source, `moved` on the target (ASK), `fresh` new (ASK)
            replies = await io.execute([["GET", key], ["GET", moved], ["SET", fresh, "3"], ["INCR", moved]],
                                       check=True)
            assert replies == [b"1", b"2", b"OK", 3]
            # a transaction meeting ASK is not split over two nodes: TRYAGAIN, a transient fault
            with pytest.raises(redis_py.exceptions.TryAgainError) as caught:
                await io.execute([["MULTI"], ["INCR", moved], ["EXEC"]])
            assert transient(caught.value)
            source.client().execute_command("MIGRATE", "127.0.0.1", target.port, key, 0, 5000)
            _finish_move(cluster, slot, target)
            # the client's map still names the source: MOVED, read again, sent again, once
            tx = await io.execute([["MULTI"], ["INCR", moved], ["INCR", key], ["EXEC"]], check=True)
            assert tx[-1] == [4, 2]
            assert await io.execute([["MGET", key, moved, fresh]], check=True) == [[b"2", b"4", b"3"]]
            assert cluster.master_of_slot(slot).port == target.port
        finally:
            io.close()

    run(go)


def test_a_killed_master_is_waited_out_and_replicated_writes_survive(cluster: Any) -> None:
    """With wait_replicas 1 every acknowledged write is on the replica before it counts:
    the master killed, its replica promoted, the writes are there and new ones go on."""
    keys = [f"w{i}" for i in range(60)]
    victim_slot = slot_of(keys[0])

    async def go() -> None:
        io = RedisIO(cluster.url, 2, wait_replicas=1)
        try:
            await io.execute([["SET", k, "v1"] for k in keys], check=True)
            victim = cluster.master_of_slot(victim_slot)
            cluster.kill(victim)
            promoted = await trio.to_thread.run_sync(cluster.wait_failover, victim)
            assert promoted.port != victim.port
            # the same write is retried with backoff until the promoted master takes it
            # (with no replica left for it, wait_replicas would refuse: 0 replicas here)
            io0 = RedisIO(cluster.url, 2)
            try:
                await retrying("test", io0.execute, [["INCR", "{x}:n"], ["SET", keys[0], "v2"]], True)
                (values,) = await io0.execute([["MGET", *keys]], check=True)
                assert values[0] == b"v2" and values[1:] == [b"v1"] * (len(keys) - 1)
            finally:
                io0.close()
            # the promoted master has no replica: a write that must wait for one is refused
            # (a transient fault: retried, never acknowledged on the master alone)
            # (its first call after the kill meets the dead master, and reads the map again)
            with pytest.raises(redis_py.ConnectionError):
                await io.execute([["SET", keys[0], "v3"]])
            with pytest.raises(redis_py.ResponseError, match="NOREPLICAS") as caught:
                await io.execute([["SET", keys[0], "v3"]])
            assert transient(caught.value)
        finally:
            io.close()

    run(go)
