"""The infrastructure floor: what the same events cost Redis and ClickHouse alone.

``python -m evactors.harness.floor SPOOL OUT.json`` (run by ``loadtest --floor`` and
``bench`` after the service stopped, so nothing else uses the cores): a fresh embedded Valkey
(the service's own settings: append-only, fsync every second) and a fresh embedded chDB with
the service's schema, in the current directory, both configured as the service was (its
environment: ``bench --env`` settings apply here too). It does what the service does at its
best, at the service's own sizes:

- writes the accepted request bodies to a Redis stream as ingest's group commit does at
  best: ``--group`` requests (the run's connections: one waiting request each, at most the
  durable log's ``MAX_GROUP``; at most ``--group-bytes``) as one stream entry, with the
  backlog counter, in one ``MULTI``: one round trip per group;
- reads the stream back, decodes the JSON, maps each message straight onto an ``events``
  row (no validation, enrichment, dedup or sessions), inserts chunks of the service's
  ``flush.chunk_rows`` (its largest insert) with its insert settings (dedup token,
  materialized views) and deletes what it inserted.

Floor events/s = events / (first write → last delete). The report sets it beside the
service's own mean rows per insert (its ``/metrics``), so a reader sees how far the service
is from inserting at that size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import typing
from pathlib import Path
from typing import Any

import msgspec

from evactors.core.config import load as load_config
from evactors.core.model import EventRow, event_id
from evactors.store.clickhouse import ClickHouse, embedded_dsn
from evactors.store.valkey import EmbeddedValkey

STREAM, COUNT = "floor:in", "floor:in:n"


def read_spool(path: Path) -> list[tuple[bytes, int]]:
    data = path.read_bytes()
    out, at = [], 0
    while at < len(data):
        size, n = int.from_bytes(data[at:at + 4], "little"), int.from_bytes(data[at + 4:at + 8], "little")
        out.append((data[at + 8:at + 8 + size], n))
        at += 8 + size
    return out


def _text(value: Any) -> str:
    return value if isinstance(value, str) else "" if value is None else str(value)


def _empty(kind: Any) -> Any:
    return {str: "", int: 0, float: 0.0, dict: {}}.get(getattr(kind, "__origin__", kind), None)


# Every column empty (by its type), so rows keep up with the schema without listing it here.
_EMPTY = {name: _empty(kind) for name, kind in typing.get_type_hints(EventRow).items()}


def to_row(project: str, m: dict[str, Any], now: int) -> EventRow:
    """A message as an ``events`` row, as it comes: the fields that map directly, the rest empty."""
    context = m.get("context") or {}
    page = context.get("page") or {}
    properties = m.get("properties") or m.get("traits") or {}
    mid = _text(m.get("messageId"))
    return EventRow(**{
        **_EMPTY, "id": event_id(project, mid), "project_id": project,
        "name": _text(m.get("event") or m.get("name") or m.get("type")),
        "device_id": _text(m.get("anonymousId") or m.get("userId")), "profile_id": _text(m.get("userId")),
        "created_at": now, "received_at": now, "session_start": now, "path": _text(page.get("path")),
        "referrer": _text(page.get("referrer")), "message_id": mid, "type": _text(m.get("type")),
        "properties": {k: _text(v) for k, v in properties.items()} if isinstance(properties, dict) else {}})


def measure(spool: list[tuple[bytes, int]], directory: Path, project: str, group: int = 1,
            group_bytes: int = 1 << 20) -> dict[str, Any]:
    import psutil
    import redis

    config = load_config(None, {})
    chunk_rows = config.flush.chunk_rows
    valkey = EmbeddedValkey(directory, "fast")
    valkey.start()
    clickhouse = ClickHouse(embedded_dsn(directory), config.clickhouse.database, 300)
    clickhouse.open()
    decoder = msgspec.json.Decoder()
    total = sum(n for _, n in spool)
    try:
        client = redis.Redis(unix_socket_path=str(valkey.socket), socket_timeout=30)
        # what else the machine did meanwhile: the floor shares the cores with it
        own = [psutil.Process(), psutil.Process(int(valkey.pid_file.read_text()))]
        own_before = sum(p.cpu_times().user + p.cpu_times().system for p in own)
        entries_written = 0
        psutil.cpu_percent(None)
        started = time.perf_counter()
        at = 0
        while at < len(spool):  # as ingest's group commit: a group of requests is one entry
            bodies: list[bytes] = []
            events, size = 0, 0
            while at < len(spool) and len(bodies) < max(1, group) and (
                    not bodies or size + len(spool[at][0]) <= group_bytes):
                body, n = spool[at]
                bodies.append(body)
                events += n
                size += len(body)
                at += 1
            pipe = client.pipeline(transaction=True)
            pipe.xadd(STREAM, {"d": b"[" + b",".join(bodies) + b"]", "n": events})
            pipe.incrby(COUNT, events)
            pipe.execute()
            entries_written += 1
        written = time.perf_counter()
        last, chunk, inserted, insert_seconds = "0-0", 0, 0, 0.0
        per_entry = max(1, round(total / max(entries_written, 1)))
        run = time.time_ns()  # tokens of their own: a rerun in the same dir is not deduplicated away
        while True:  # as the flusher: chunks of up to chunk_rows rows, deleted once inserted
            entries: list[Any] = []
            batch: list[EventRow] = []
            while len(batch) < chunk_rows:
                # entries of the mean size: a chunk ends near chunk_rows, as the flusher's plan does
                got: Any = client.xread({STREAM: last}, count=min(256, max(1, (chunk_rows - len(batch)) // per_entry)))
                if not got:
                    break
                now = int(time.time() * 1000)
                for entry_id, fields in got[0][1]:
                    entries.append(entry_id)
                    last = entry_id.decode()
                    batch += [to_row(project, m, now) for request in decoder.decode(fields[b"d"])
                              for m in request["batch"]]
            rows = len(batch)
            if not entries:
                break
            chunk += 1
            t = time.perf_counter()
            clickhouse.insert_sync("events", batch, f"floor:{run}:{chunk}:events")
            insert_seconds += time.perf_counter() - t
            pipe = client.pipeline(transaction=True)
            pipe.xdel(STREAM, *entries)
            pipe.decrby(COUNT, rows)
            pipe.execute()
            inserted += rows
        done = time.perf_counter()
        machine = psutil.cpu_percent(None) / 100 * (psutil.cpu_count() or 1)
        own_cores = (sum(p.cpu_times().user + p.cpu_times().system for p in own) - own_before) / (done - started)
        stored = clickhouse.query_sync(f"SELECT count() FROM {config.clickhouse.database}.events")[1][0][0]
        seconds = done - started
        return {"events": total, "requests": len(spool), "seconds": round(seconds, 3),
                "events_per_s": round(total / seconds), "stored": int(stored),
                "redis_write_seconds": round(written - started, 3),
                "redis_write_eps": round(total / max(written - started, 1e-9)),
                "read_insert_seconds": round(done - written, 3),
                "read_insert_eps": round(total / max(done - written, 1e-9)),
                "clickhouse_insert_seconds": round(insert_seconds, 3), "chunk_rows": chunk_rows,
                "inserts": chunk, "rows_per_insert": round(inserted / max(chunk, 1)),
                "requests_per_write": round(len(spool) / max(entries_written, 1), 1),
                "own_cpu": round(own_cores, 2), "other_cpu": round(max(0.0, machine - own_cores), 2)}
    finally:
        clickhouse.close()
        valkey.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evactors.harness.floor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spool", type=Path, help="length-prefixed request bodies (written by the harness)")
    p.add_argument("out", type=Path, help="where the JSON result goes")
    p.add_argument("--project", default="floor")
    p.add_argument("--group", type=int, default=1, help="requests per stream entry (group commit)")
    p.add_argument("--group-bytes", type=int, default=1 << 20, help="bytes per stream entry, but a request alone")
    args = p.parse_args(argv)
    result = measure(read_spool(args.spool), Path.cwd() / "floor-data", args.project, args.group, args.group_bytes)
    args.out.write_text(json.dumps(result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
