"""Session workers: the session shards in a child process. The wire format keeps every
field and the order of events; a worker that dies is restarted and loses nothing; a worker
whose service dies goes with it."""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import psutil
import trio
import trio.testing

from conftest import Sender, Service, message, run_cli
from evactors.core.messages import Enriched, Receipt, ShardBatch
from evactors.core.model import BotRow, Context, EventRow, Incoming
from evactors.core.units import decode_unit, encode_unit
from evactors.ops import metrics
from evactors.pipeline.session_link import DONE, UNIT, CounterDeltas, FrameReader, frame


def _row(name: str, i: int) -> EventRow:
    fields: dict[str, Any] = {f: "" for f in EventRow.__struct_fields__}
    fields.update(id=f"id-{i}", project_id="p", name=name, device_id="d", created_at=1000 + i,
                  received_at=2000, duration=0, properties={"n": str(i)}, latitude=51.5,
                  longitude=None, is_new_session=0, session_number=0, session_start=0,
                  is_bot=0, message_id=f"m-{i}")
    return EventRow(**fields)


def _incoming(i: int) -> Incoming:
    return Incoming("p", "alias", f"m-{i}", "", "d", f"E{i}", {"k": i}, {"plan": f"p{i}"}, Context(),
                    1000 + i, 2000, "", "", f"prev-{i}", "")


def test_a_unit_crosses_the_pipe_whole_and_in_order() -> None:
    bot = BotRow("b-1", "p", "Crawl", "d", "/x", "crawler-list", "Googlebot", 1001, "m-1")
    items = [Enriched(_row("A", 0), _incoming(0), 3), Enriched(bot, _incoming(1), 3),
             Enriched(_row("screen_view", 2), _incoming(2), 3)]
    seq, shard, back = decode_unit(encode_unit(42, 3, ShardBatch(items, [Receipt("1-0", 3, 1)])))
    assert (seq, shard) == (42, 3)
    assert [type(e.row).__name__ for e in back] == ["EventRow", "BotRow", "EventRow"]
    assert [e.row for e in back] == [e.row for e in items]  # every field
    # of the incoming event, what sessions read besides the row
    assert [(e.incoming.previous_id, e.incoming.traits) for e in back] == [
        (e.incoming.previous_id, e.incoming.traits) for e in items]
    assert all(e.shard == 3 for e in back)


async def test_frames_survive_any_chunking() -> None:
    send, receive = trio.testing.memory_stream_one_way_pair()
    payloads = [(UNIT, b"x" * 70_000), (DONE, b""), (UNIT, b"abc")]
    data = b"".join(frame(kind, body) for kind, body in payloads)

    async def trickle() -> None:
        for i in range(0, len(data), 4093):  # chunks that cut lengths and kinds in two
            await send.send_all(data[i:i + 4093])
            await trio.sleep(0)
        await send.aclose()

    reader = FrameReader(receive)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle)
        got = [await reader.read() for _ in payloads]
        assert await reader.read() is None
    assert got == payloads


def test_counter_increments_are_taken_once() -> None:
    deltas = CounterDeltas()
    deltas.take()  # whatever earlier tests counted
    metrics.LATE_EVENTS.labels("reordered").inc(2)
    metrics.SESSIONS_CLOSED.inc()
    taken = deltas.take()
    assert ("evactors_late_events", ["reordered"], 2.0) in taken
    assert ("evactors_sessions_closed", [], 1.0) in taken
    assert deltas.take() == []


def _worker(service: Service) -> psutil.Process:
    assert service.proc is not None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for child in psutil.Process(service.proc.pid).children():
            if "evactors.service.session_worker" in " ".join(child.cmdline()):
                return child
        time.sleep(0.05)
    raise AssertionError("no session worker")


def _status(service: Service) -> dict[str, Any]:
    result = run_cli("status", "--data-dir", str(service.data_dir), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_a_killed_worker_is_restarted_and_nothing_is_lost(make_service) -> None:  # type: ignore[no-untyped-def]
    service = make_service().start()
    with Sender(service) as sender:
        time.sleep(1.0)
        first = _worker(service)
        first.kill()  # kill -9, with batches in its hands
        time.sleep(2.0)
        second = _worker(service)
        time.sleep(1.0)
    assert second.pid != first.pid
    assert _status(service)["actors"]["session-worker-0"] == {"state": "running", "restarts": 1}
    assert "actor session-worker-0 crashed" in service.log()
    assert service.batch([message("track", event="After")]).status_code == 200
    service.wait_rows("SELECT 1 FROM evactors.events WHERE name = 'After'", 1)
    # What the dead worker held is fed again: after 120 s, or at the next start.
    assert service.stop(signal.SIGTERM) == 0
    service.start()
    deadline = time.monotonic() + 60
    while True:
        ids = [r["message_id"] for r in service.query(
            "SELECT message_id FROM evactors.events WHERE name = 'Load'")]
        if sender.acked <= set(ids) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(ids) == len(set(ids)), "doubled"
    assert not sender.acked - set(ids), f"{len(sender.acked - set(ids))} acknowledged events lost"
    assert len(sender.acked) >= 100


def test_a_worker_goes_with_its_service(make_service) -> None:  # type: ignore[no-untyped-def]
    service = make_service().start()
    worker = _worker(service)
    assert "redis" not in " ".join(worker.cmdline())  # its settings (a URL's password) are not on show
    assert service.batch([message("track", event="Fine")]).status_code == 200
    service.wait_rows("SELECT 1 FROM evactors.events WHERE name = 'Fine'", 1)
    service.stop(signal.SIGKILL)
    worker.wait(10)  # raises TimeoutExpired if it lives on
    assert not psutil.pid_exists(worker.pid) or worker.status() == psutil.STATUS_ZOMBIE


def test_in_process_sessions_still_work(make_service) -> None:  # type: ignore[no-untyped-def]
    service = make_service(env={"EVACTORS_PIPELINE_SESSION_WORKERS": "0"}).start()
    assert service.proc is not None
    assert not [c for c in psutil.Process(service.proc.pid).children()
                if "evactors.service.session_worker" in " ".join(c.cmdline())]
    assert service.batch([message("page", name="Home", properties={"path": "/"}),
                          message("track", event="Go")]).status_code == 200
    rows = service.wait_rows("SELECT session_id FROM evactors.events WHERE name = 'Go'", 1)
    assert rows[0]["session_id"]
    assert "session-0" in _status(service)["actors"]
    os.kill(service.proc.pid, signal.SIGTERM)
    assert service.proc.wait(30) == 0
