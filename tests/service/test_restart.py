"""Stop the service with events in flight, start it again: every acknowledged event is in
ClickHouse exactly once."""

from __future__ import annotations

import signal
import time

from conftest import Sender, Service, message


def _stored(service: Service, expected: set[str]) -> list[str]:
    deadline = time.monotonic() + 60
    while True:
        ids = [r["message_id"] for r in service.query(
            "SELECT message_id FROM evactors.events WHERE name = 'Load'")]
        if expected <= set(ids) or time.monotonic() > deadline:
            return ids
        time.sleep(0.2)


def _check_exactly_once(ids: list[str], sender: Sender) -> None:
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} events doubled"
    missing = sender.acked - set(ids)
    assert not missing, f"{len(missing)} acknowledged events lost"
    assert set(ids) <= sender.attempted  # nothing invented


def test_sigterm_with_events_in_flight_then_restart(make_service) -> None:  # type: ignore[no-untyped-def]
    service = make_service().start()
    with Sender(service) as sender:
        time.sleep(1.5)
        assert sender.acked, service.log()[-2000:]
        code = service.stop(signal.SIGTERM)
    assert code == 0, service.log()[-3000:]
    assert "SIGTERM: stopping" in service.log()
    before = len(sender.acked)
    service.start()
    ids = _stored(service, sender.acked)
    _check_exactly_once(ids, sender)
    assert len(sender.acked) == before >= 100


def test_kill_9_with_events_in_flight_then_restart(make_service) -> None:  # type: ignore[no-untyped-def]
    service = make_service().start()
    with Sender(service) as sender:
        time.sleep(1.5)
        code = service.stop(signal.SIGKILL)
    assert code == -signal.SIGKILL
    service.start()  # the orphaned Valkey of the killed run is shut down cleanly first
    ids = _stored(service, sender.acked)
    _check_exactly_once(ids, sender)
    assert len(sender.acked) >= 100


def test_data_survives_a_restart_and_sessions_continue(make_service) -> None:  # type: ignore[no-untyped-def]
    service = make_service().start()
    assert service.batch([message("page", anonymousId="returning", name="A",
                                  properties={"path": "/a"})]).status_code == 200
    assert service.batch([message("track", event="Before", anonymousId="returning")]).status_code == 200
    first = service.wait_rows("SELECT session_id FROM evactors.events WHERE name = 'Before'", 1)
    assert service.stop() == 0
    service.start()
    assert service.batch([message("track", event="After", anonymousId="returning")]).status_code == 200
    rows = service.wait_rows("SELECT name, session_id, is_new_session, path FROM evactors.events "
                             "WHERE name IN ('Before', 'After') ORDER BY created_at", 2)
    assert rows[1]["session_id"] == first[0]["session_id"]  # the same session goes on
    assert rows[1]["is_new_session"] == 0 and rows[1]["path"] == "/a"


def test_a_second_service_on_the_same_data_dir_is_refused(make_service) -> None:  # type: ignore[no-untyped-def]
    service = make_service().start()
    second = make_service()
    try:
        second.start(timeout=30)
    except RuntimeError as e:
        assert "another evactors owns" in str(e)
    else:
        raise AssertionError("a second service started on a data dir in use")
    assert service.http.get(f"{service.url}/health/live").status_code == 200


def test_an_undecodable_ingest_entry_goes_to_the_dead_letter_stream(make_service) -> None:  # type: ignore[no-untyped-def]
    import redis

    service = make_service().start()
    client = redis.Redis(unix_socket_path=str(service.data_dir / "redis" / "valkey.sock"))
    client.xadd("evx:in", {b"n": 3, b"e": b"\xc1 garbage"})
    client.incrby("evx:in:n", 3)
    client.close()
    assert service.stop() == 0
    service.start()  # the start-up replay meets the poison entry
    client = redis.Redis(unix_socket_path=str(service.data_dir / "redis" / "valkey.sock"))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not client.xlen("evx:dead"):
        time.sleep(0.1)
    [(_id, fields)] = client.xrange("evx:dead")
    assert fields[b"source"] == b"ingest" and fields[b"error"]
    assert client.xlen("evx:in") == 0 and int(client.get("evx:in:n") or 0) == 0
    assert service.batch([message("track", event="After poison")]).status_code == 200
    service.wait_rows("SELECT 1 FROM evactors.events WHERE name = 'After poison'", 1)
    assert "evactors_dead_letters_total 1.0" in service.metrics()


def test_changing_the_shard_count_under_existing_data_is_refused(make_service) -> None:  # type: ignore[no-untyped-def]
    service = make_service().start()
    assert service.stop() == 0
    changed = make_service(env={"EVACTORS_PIPELINE_SESSION_SHARDS": "8"})
    try:
        changed.start(timeout=30)
    except RuntimeError as e:
        assert "service exited 2" in str(e) and "`pipeline.session_shards`" in str(e)
    else:
        raise AssertionError("started with a different shard count")


def test_a_port_in_use_is_a_clear_startup_error(make_service) -> None:  # type: ignore[no-untyped-def]
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        service = make_service(args=["--listen", f"127.0.0.1:{port}"])
        try:
            service.start(timeout=30)
        except RuntimeError as e:
            assert "service exited 1" in str(e) and f"cannot listen on 127.0.0.1:{port}" in str(e)
        else:
            raise AssertionError("started on a port in use")


def test_a_poison_event_is_dead_lettered_and_can_be_replayed(make_service) -> None:  # type: ignore[no-untyped-def]
    """Enrichment raising on one event (a fault hook: no real input does) must not hold back
    its batch: the others are stored, it waits in the dead-letter stream, and after the
    "fix" (a restart without the hook) a replay stores it exactly once."""
    import json

    from conftest import run_cli

    service = make_service(env={"EVACTORS_TEST_POISON_EVENT": "Poison"}).start()
    batch = [message("track", event="Fine", anonymousId="p"), message("track", event="Poison", anonymousId="p"),
             message("track", event="Fine too", anonymousId="p")]
    assert service.batch(batch).status_code == 200
    service.wait_rows("SELECT 1 FROM evactors.events WHERE name LIKE 'Fine%'", 2)
    listed = run_cli("dead-letter", "list", "--format", "json", "--data-dir", str(service.data_dir))
    entries = [json.loads(line) for line in listed.stdout.splitlines()]
    assert len(entries) == 1 and entries[0]["source"] == "enrich"
    assert entries[0]["message_id"] == batch[1]["messageId"] and "injected poison" in entries[0]["error"]
    assert "crashed" not in service.log()  # isolated, not a crash of the enricher
    assert service.stop() == 0
    service.env = {}  # the fix
    service.start()
    replayed = run_cli("dead-letter", "replay", "--all", "--data-dir", str(service.data_dir))
    assert replayed.returncode == 0 and replayed.stdout.startswith("1 dead letter(s)")
    assert service.stop() == 0
    service.start()  # the start-up replay picks it up
    rows = service.wait_rows("SELECT message_id FROM evactors.events WHERE name = 'Poison'", 1)
    assert [r["message_id"] for r in rows] == [batch[1]["messageId"]]
    after = run_cli("dead-letter", "list", "--format", "json", "--data-dir", str(service.data_dir))
    assert after.stdout.strip() == ""


def test_an_undecodable_buffer_entry_is_dead_lettered_and_the_shard_goes_on(make_service) -> None:  # type: ignore[no-untyped-def]
    import redis

    service = make_service().start()
    client = redis.Redis(unix_socket_path=str(service.data_dir / "redis" / "valkey.sock"))
    for shard in range(4):
        client.xadd(f"evx:{{s{shard}}}:buf", {b"n": 1, b"d": b"\xc1 not msgpack"})
        client.incrby(f"evx:{{s{shard}}}:buf:n", 1)
    assert service.batch([message("track", event=f"After {i}", anonymousId=f"u{i}")
                          for i in range(12)]).status_code == 200
    service.wait_rows("SELECT 1 FROM evactors.events WHERE name LIKE 'After %'", 12)
    dead = client.xrange("evx:dead")
    assert len(dead) == 4 and {f[b"source"] for _i, f in dead} == {b"buffer"}
    assert sum(int(client.get(f"evx:{{s{s}}}:buf:n") or 0) for s in range(4)) == 0
    assert "crashed" not in service.log()
