"""The service on the machine's real Redis 7 (127.0.0.1:6379), under a key prefix of its own."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from conftest import CHROME, Service, message

pytestmark = pytest.mark.redis7


@pytest.fixture
def redis7_prefix() -> Iterator[str]:
    client = redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip("no Redis on 127.0.0.1:6379")
    prefix = f"evtest-{uuid.uuid4().hex[:12]}"
    yield prefix
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    assert not list(client.scan_iter(match=f"{prefix}:*"))


def test_end_to_end_on_real_redis_7(make_service, redis7_prefix: str) -> None:  # type: ignore[no-untyped-def]
    service: Service = make_service(
        args=["--redis-url", "redis://127.0.0.1:6379/0"],
        env={"EVACTORS_REDIS_KEY_PREFIX": redis7_prefix}).start()
    info = redis.Redis(host="127.0.0.1", port=6379).info("server")
    assert int(str(info["redis_version"]).split(".")[0]) >= 7
    msgs = [message("track", event=f"R{i}", anonymousId="r7", context={"userAgent": CHROME})
            for i in range(20)]
    assert service.batch(msgs + msgs[:5]).status_code == 200
    rows = service.wait_rows("SELECT name FROM evactors.events", 20)
    assert sorted(r["name"] for r in rows) == sorted(f"R{i}" for i in range(20))
    keys = redis.Redis(host="127.0.0.1", port=6379).keys(f"{redis7_prefix}:*")
    assert keys  # its state lives under its own prefix only
    assert service.stop() == 0
