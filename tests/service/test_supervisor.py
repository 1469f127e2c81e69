"""Supervision: restart with backoff, escalate after repeated crashes."""

from __future__ import annotations

import itertools
import re
import subprocess
import time
from typing import Any

import pytest
import redis
import trio

from conftest import Service, message
from evactors.core.config import Config, SupervisorConfig
from evactors.service.supervisor import ActorFailed, Supervisor


async def test_a_crashing_actor_is_restarted_with_backoff(autojump_clock: Any) -> None:
    sup = Supervisor(Config(supervisor=SupervisorConfig(max_restarts=5, backoff_initial_seconds=1)))
    calls: list[float] = []

    async def flaky() -> None:
        calls.append(trio.current_time())
        if len(calls) < 4:
            raise RuntimeError("boom")

    await sup.supervise("flaky", flaky)
    assert len(calls) == 4
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert gaps == pytest.approx([1, 2, 4])  # exponential backoff


async def test_repeated_crashes_escalate(autojump_clock: Any) -> None:
    sup = Supervisor(Config(supervisor=SupervisorConfig(max_restarts=3, restart_window_seconds=60)))
    send, recv = trio.open_memory_channel[int](1)

    async def broken() -> None:
        raise ValueError("always")

    with pytest.raises(ActorFailed):
        await sup.supervise("broken", broken, closes=(send,))
    with pytest.raises(trio.EndOfChannel):  # its outgoing channel was closed: downstream ends
        await recv.receive()


def test_service_exits_non_zero_when_an_actor_keeps_crashing(make_service) -> None:  # type: ignore[no-untyped-def]
    """A real, lasting fault: the buffer's key holds the wrong type (an operator's mistake),
    so every Redis call on it fails with WRONGTYPE — not a passing state to wait out."""
    service: Service = make_service(env={"EVACTORS_SUPERVISOR_MAX_RESTARTS": "2",
                                         "EVACTORS_SUPERVISOR_BACKOFF_INITIAL_SECONDS": "0.05"}).start()
    assert service.batch([message("track", event="Fine")]).status_code == 200
    service.wait_rows("SELECT 1 FROM evactors.events", 1)
    client = redis.Redis(unix_socket_path=str(service.data_dir / "redis" / "valkey.sock"))
    for shard in range(4):
        client.delete(f"evx:{{s{shard}}}:buf")
        client.set(f"evx:{{s{shard}}}:buf", "not a stream")
    assert service.proc is not None
    try:
        code = service.proc.wait(30)
    except subprocess.TimeoutExpired:
        raise AssertionError("service kept running:\n" + service.log()[-3000:]) from None
    assert code == 1
    log = service.log()
    # whichever actor meets the key first (the flusher reads the streams only when rows wait)
    assert re.search(r"crashed \(ResponseError: [^\n]*WRONGTYPE", log) and "stopping the service" in log
    time.sleep(0.1)
