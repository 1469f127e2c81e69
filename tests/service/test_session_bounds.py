"""What one open session may hold in Redis: a held screen view's properties are capped
(pipeline.max_held_view_bytes), so a 30 KB page view no longer costs 30 KB per visitor."""

from __future__ import annotations

import time

import redis

from conftest import Service, message


def _state_bytes(service: Service, device: str) -> int:
    client = redis.Redis(unix_socket_path=str(service.data_dir / "redis" / "valkey.sock"))
    (key,) = list(client.scan_iter(match=f"*:u:project-a:{device}"))
    return int(client.memory_usage(key, samples=0))


def test_a_held_page_views_properties_are_capped_in_the_session_state(make_service) -> None:  # type: ignore[no-untyped-def]
    service: Service = make_service(env={"EVACTORS_PIPELINE_MAX_HELD_VIEW_BYTES": "2048"}).start()
    big = {f"field{i:02d}": "x" * 1000 for i in range(30)}  # 30 KB of properties
    assert service.batch([message("page", anonymousId="heavy", name="Home", timestamp=_ago(20),
                                  properties={"path": "/home", "small": "kept", **big}),
                          message("page", anonymousId="light", name="Home", timestamp=_ago(20),
                                  properties={"path": "/home", "small": "kept"})]).status_code == 200
    deadline = time.monotonic() + 20
    while True:
        try:
            heavy, light = _state_bytes(service, "heavy"), _state_bytes(service, "light")
            break
        except ValueError:  # not committed yet
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert heavy < light + 2048 + 512, (heavy, light)  # the view is held, trimmed
    # the next view releases it: stored with what the cap kept, and what it dropped named
    for minutes, kind in ((15, "page"), (10, "track")):  # a view is saved once its successor is old
        assert service.batch([message(kind, anonymousId="heavy", name="Next", properties={"path": "/next"},
                                      timestamp=_ago(minutes))]).status_code == 200
    row = service.wait_rows("SELECT properties FROM evactors.events WHERE device_id != '' AND "
                            "properties['small'] = 'kept' AND name = 'screen_view' AND "
                            "mapContains(properties, '__truncated_properties')", 1, timeout=90)[0]
    props = row["properties"]
    assert props["small"] == "kept" and props["path"] == "/home"
    dropped = props["__truncated_properties"].split(",")
    assert len(dropped) >= 28 and all(k.startswith("field") and k not in props for k in dropped)


def _ago(minutes: int) -> str:
    from datetime import UTC, datetime, timedelta

    return (datetime.now(UTC) - timedelta(minutes=minutes)).isoformat()
