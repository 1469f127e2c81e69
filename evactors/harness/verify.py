"""Verification of a load run: what the service acknowledged is in ClickHouse exactly once.

From the answers the harness got, every message of the run is *expected* (acknowledged: a
200, or a valid message of a 400 ``invalid_events``), *rejected* (refused, invalid, a
malformed request, an unknown key, a 503 after the last retry, never sent) or *unknown* (no
answer at all: stored at most once). Acknowledged events belong in ``events``, crawlers'
in ``events_bots``.

The check scales to millions of events without moving them: ids of this run (they all start
with its prefix) are hashed into buckets (MD5, as ClickHouse and Python both compute it),
and each bucket's row count and sum of hashes is compared with what is expected. Only the
buckets that differ are read back, id by id, to name what is missing, doubled or stored
though rejected. The same SQL runs through a running service's ``/admin/query``, a
ClickHouse DSN, or the embedded chDB of a stopped service.

A running service holds each open session's latest screen views (their duration is not
known yet); without closing sessions those are reported as *held*, not missing. ``bench``
stops the service with sessions closed at shutdown, so nothing is held and the sessions are
compared with the generator's oracle (``evactors.harness.oracle``).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from evactors.harness import oracle
from evactors.harness.run import BEHIND, ERROR, MALFORMED, PLAIN, REMAP, WRONG_KEY, Options, RunResult, replay_requests
from evactors.harness.traffic import Request
from evactors.store.admin_client import admin_address
from evactors.store.paths import DataDir

SHOW = 10  # ids named per finding in the report


_U64 = 2**64


class Reader(Protocol):
    def query(self, sql: str) -> tuple[list[str], list[list[Any]]]: ...


class AdminReader:
    """A running service's ``/admin/query`` on its admin listener (``unix:PATH`` or a URL;
    bearer token from its data dir)."""

    def __init__(self, address: str, token: str) -> None:
        self.address, self.token = address, token

    def query(self, sql: str) -> tuple[list[str], list[list[Any]]]:
        from evactors.store.admin_client import AdminError, call

        try:
            body = call(self.address, self.token, "/admin/query", sql.encode(), timeout=300)
        except AdminError as e:
            raise RuntimeError(f"/admin/query: {str(e)[:500]}") from None
        return body["columns"], body["rows"]


class ClientReader:
    """A clickhouse-connect client: a DSN, or ``chdb://DIR`` (a stopped service's data)."""

    def __init__(self, dsn: str) -> None:
        from evactors.store.clickhouse import connect

        self.client = connect(dsn)

    def query(self, sql: str) -> tuple[list[str], list[list[Any]]]:
        result = self.client.query(sql)
        return list(result.column_names), [list(r) for r in result.result_rows]

    def close(self) -> None:
        self.client.close()


def LocalReader(data_dir: Path, database: str = "evactors") -> ClientReader:
    """The embedded chDB of a *stopped* service (chDB allows one engine per process)."""
    from evactors.store.clickhouse import embedded_dsn

    if not DataDir(data_dir).clickhouse.exists():
        raise RuntimeError(f"no ClickHouse data in {data_dir}")
    return ClientReader(embedded_dsn(data_dir))


def reader_for_running(opts: Options) -> Reader | None:
    if opts.clickhouse_dsn:
        return ClientReader(opts.clickhouse_dsn)
    if opts.data_dir is not None:
        try:
            token = DataDir(opts.data_dir).admin_token.read_text().strip()
            address = admin_address(opts.data_dir)
        except (OSError, ValueError, KeyError):
            return None
        return AdminReader(address, token)
    return None


class Expected:
    """What each message id of the run should have become."""

    def __init__(self) -> None:
        self.table: dict[str, str] = {}  # id -> "events" | "events_bots" (by its first send)
        self.accepted: set[str] = set()
        self.unknown: set[str] = set()
        self.sent: set[str] = set()
        self.findings: dict[str, list[str]] = defaultdict(list)  # answers that contradict the traffic

    def rejected(self) -> set[str]:
        return self.sent - self.accepted - self.unknown


def expectations(result: RunResult) -> Expected:

    traffic, exp = result.traffic, Expected()
    for request in range(len(traffic)):
        flag = traffic.flags[request]
        if flag == REMAP:
            continue
        kinds, ids = traffic.kinds[request], traffic.ids[request]
        for kind, mid in zip(kinds, ids, strict=True):
            if mid and kind in "ovb":  # o: an event, v: a screen view, b: a crawler's
                exp.table.setdefault(mid, "events_bots" if kind == "b" else "events")
        outcome = result.outcomes.get(request)
        if outcome is None or outcome[0] == BEHIND:
            continue  # never sent: its ids are expected nowhere (unless sent again as duplicates)
        status, _attempts, rejected = outcome
        exp.sent.update(m for m in ids if m)
        if flag in (MALFORMED, WRONG_KEY):
            if status not in (400, 401, ERROR, 503):
                exp.findings["broken request answered"].append(f"request {request}: {status}")
            continue
        assert flag == PLAIN
        if status == 200:
            bad = [mid for kind, mid in zip(kinds, ids, strict=True) if kind == "x"]
            if bad:
                exp.findings["invalid message acknowledged"] += bad
            exp.accepted.update(mid for kind, mid in zip(kinds, ids, strict=True) if kind != "x" and mid)
        elif status == 400 and rejected is not None:
            refused = set(rejected)
            wrong = [i for i, kind in enumerate(kinds) if (kind == "x") != (i in refused)]
            for i in wrong:
                exp.findings["validation disagrees with the generator"].append(
                    f"{ids[i] or '?'} ({'valid' if kinds[i] != 'x' else 'invalid'}, "
                    f"{'refused' if i in refused else 'accepted'})")
            exp.accepted.update(m for i, m in enumerate(ids) if i not in refused and kinds[i] != "x" and m)
        elif status == ERROR:
            exp.unknown.update(mid for kind, mid in zip(kinds, ids, strict=True) if kind != "x" and mid)
        # any other answer (503 after the last retry, 400 of a whole batch, 401, 413…): refused
    exp.unknown -= exp.accepted
    return exp


def _hashes(mid: str) -> tuple[int, int]:
    digest = hashlib.md5(mid.encode()).digest()
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")


def _where(prefix: str, project: str | None) -> str:
    sql = f"startsWith(message_id, {_quote(prefix)})"
    return sql + (f" AND project_id = {_quote(project)}" if project else "")


def _quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


_BUCKET = "reinterpretAsUInt64(substring(MD5(message_id), 1, 8)) % {n}"


def check_table(reader: Reader, database: str, table: str, prefix: str, project: str | None,
                expected: set[str]) -> dict[str, int]:
    """Stored count of every id that is expected here or stored here though not expected
    (ids stored exactly once as expected are left out)."""
    buckets = 1 << max(6, min(16, (max(1, len(expected)) // 32).bit_length()))
    want: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    members: dict[int, list[str]] = defaultdict(list)
    for mid in expected:
        h1, h2 = _hashes(mid)
        sums = want[h1 % buckets]
        sums[0] += 1
        sums[1] = (sums[1] + h2) % _U64
        members[h1 % buckets].append(mid)
    where = _where(prefix, project)
    bucket_sql = _BUCKET.format(n=buckets)
    _cols, rows = reader.query(
        f"SELECT {bucket_sql} AS b, count() AS n, sum(reinterpretAsUInt64(substring(MD5(message_id), 9, 8))) AS h "
        f"FROM {database}.{table} WHERE {where} GROUP BY b")
    got = {int(b): (int(n), int(h) % _U64) for b, n, h in rows}
    differ = sorted(b for b in set(got) | set(want) if got.get(b, (0, 0)) != tuple(want.get(b, (0, 0))))
    counts: dict[str, int] = {}
    for start in range(0, len(differ), 2000):
        chunk = differ[start:start + 2000]
        _cols, rows = reader.query(
            f"SELECT message_id, count() FROM {database}.{table} WHERE {where} AND {bucket_sql} IN "
            f"({','.join(map(str, chunk))}) GROUP BY message_id")
        stored = {str(mid): int(n) for mid, n in rows}
        for bucket in chunk:
            for mid in members.get(bucket, []):
                counts[mid] = stored.pop(mid, 0)
        counts.update(stored)  # stored, not expected here
    return counts


def verify(result: RunResult, reader: Reader, sessions_closed: bool) -> dict[str, Any]:
    """Every check, each with ``ok`` and what it found; ``ok`` overall."""
    opts = result.opts
    exp = expectations(result)
    prefix = f"{opts.run_id}-"
    rejected = exp.rejected()
    checks: list[dict[str, Any]] = []
    tables = {"events": {m for m in exp.accepted if exp.table.get(m) == "events"},
              "events_bots": {m for m in exp.accepted if exp.table.get(m) == "events_bots"}}
    found: dict[str, dict[str, int]] = {}
    for table, expected in tables.items():
        found[table] = check_table(reader, opts.database, table, prefix, opts.project, expected)
    missing: list[str] = []
    doubled: list[str] = []
    stored_rejected: list[str] = []
    misfiled: list[str] = []
    foreign: list[str] = []
    unknown_stored = 0
    for mid in set(found["events"]) | set(found["events_bots"]):
        home = exp.table.get(mid) if mid in exp.accepted else None
        # an id left out of a table's counts is stored there exactly as expected
        n = {t: found[t].get(mid, 1 if home == t else 0) for t in tables}
        total = sum(n.values())
        if home is not None:
            if total == 0:
                missing.append(mid)
            elif total > 1:
                doubled.append(mid)
            elif n[home] == 0:
                misfiled.append(mid)
        elif mid in exp.unknown:
            unknown_stored += total > 0
            if total > 1:
                doubled.append(mid)
        elif total and mid in rejected:
            stored_rejected.append(mid)
        elif total:
            foreign.append(mid)
    misplaced: list[str] = []
    if missing and opts.project:  # stored, but under another project?
        elsewhere = stored_elsewhere(reader, opts.database, prefix, opts.project)
        misplaced = [f"{m} (project {elsewhere[m]!r})" for m in missing if m in elsewhere]
        missing = [m for m in missing if m not in elsewhere]
    held: list[str] = []
    if missing and not sessions_closed:
        held_views = held_screen_views(result, set(missing))
        held = [m for m in missing if m in held_views]
        missing = [m for m in missing if m not in held_views]
    accepted = len(exp.accepted)

    def check(name: str, bad: list[str], detail: str) -> None:
        checks.append({"check": name, "ok": not bad, "count": len(bad), "examples": sorted(bad)[:SHOW],
                       "detail": detail})

    check("accepted events stored (none missing)", missing,
          f"{accepted:,} acknowledged events ({len(tables['events_bots']):,} of crawlers), "
          f"{len(missing):,} not in ClickHouse" + (f", {len(held):,} screen views held in open sessions"
                                                   if held else ""))
    if misplaced:
        check("stored under their project", misplaced, f"{len(misplaced):,} acknowledged events stored under "
              "another project_id")
    check("stored once (none doubled)", doubled, f"{len(doubled):,} stored more than once")
    check("rejected events not stored", stored_rejected,
          f"{len(rejected):,} refused, {len(stored_rejected):,} stored anyway")
    check("crawlers filtered as the generator marked them", misfiled,
          f"{len(misfiled):,} stored in the other table (events vs events_bots)")
    if foreign:
        check("no stored id outside the traffic", foreign, f"{len(foreign):,} ids of this run's prefix unknown")
    for name, items in exp.findings.items():
        check(name, items, f"{len(items):,}")
    if exp.unknown:
        checks.append({"check": "unanswered requests (stored at most once)", "ok": True, "count": len(exp.unknown),
                       "examples": [], "detail": f"{len(exp.unknown):,} events without an answer, "
                       f"{unknown_stored:,} of them stored (each at most once)"})
    if sessions_closed:
        checks.append(check_sessions(result, reader, exp))
    else:
        checks.append({"check": "sessions match the oracle", "ok": True, "skipped": True, "count": 0,
                       "examples": [], "detail": "skipped: sessions of a running service are still open "
                       "(bench closes them at shutdown and checks them)"})
    return {"ok": all(c["ok"] for c in checks), "checks": checks, "accepted": accepted,
            "accepted_events_rows": len(tables["events"]),
            "rejected": len(rejected), "unknown": len(exp.unknown), "held": len(held)}


def stored_elsewhere(reader: Reader, database: str, prefix: str, project: str) -> dict[str, str]:
    """Ids of this run stored under a project other than ``project`` (normally none)."""
    out: dict[str, str] = {}
    for table in ("events", "events_bots"):
        _cols, rows = reader.query(f"SELECT message_id, any(project_id) FROM {database}.{table} "
                                   f"WHERE {_where(prefix, None)} AND project_id != {_quote(project)} "
                                   "GROUP BY message_id")
        out.update({str(m): str(p) for m, p in rows})
    return out


def _ms(ts: str) -> int:
    return int(datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() * 1000)


def held_screen_views(result: RunResult, candidates: set[str]) -> set[str]:
    """Of ``candidates``, the screen views a running service may still hold: in their
    device's last (open) session, with no later view of it more than the lateness window
    before the device's latest event (docs/sessions.md: a view is saved once its next view
    is past the window, or at session end). The traffic is generated again for this."""

    traffic = result.traffic
    exp_ok = {r for r, (status, _a, rej) in result.outcomes.items() if status in (200, 400)}
    devices: dict[str, list[tuple[int, str, bool]]] = defaultdict(list)  # device -> (t, id, is view)
    for lane in range(len(traffic.lanes)):
        spec = traffic.specs[lane]

        for request, item in replay_requests(traffic, lane):
            if not isinstance(item, Request) or request not in exp_ok or traffic.flags[request] != PLAIN:
                continue
            rejected = set(result.outcomes[request][2] or ())
            for i, (msg, kind) in enumerate(zip(item.messages, item.kinds, strict=True)):
                if kind not in ("ok",) or i in rejected or "timestamp" not in msg:
                    continue
                device = str(msg.get("anonymousId") or msg.get("userId") or "")
                view = msg["type"] in ("page", "screen")
                devices[device].append((_ms(msg["timestamp"]), str(msg["messageId"]), view))
        timeout, lateness = spec.timeout_ms, spec.lateness_ms
    held: set[str] = set()
    for events in devices.values():
        if not any(mid in candidates for _t, mid, _v in events):
            continue
        events.sort()
        start = 0
        for i in range(1, len(events)):
            if events[i][0] - events[i - 1][0] > timeout:
                start = i
        session = events[start:]
        last = session[-1][0]
        views = [(t, mid) for t, mid, view in session if view]
        for i, (_t, mid) in enumerate(views):
            if i + 1 == len(views) or views[i + 1][0] >= last - lateness:
                held.add(mid)
    return held & candidates


def check_sessions(result: RunResult, reader: Reader, exp: Expected) -> dict[str, Any]:
    """Sessions, event rows, profiles and aggregates against the generator's oracle
    (``evactors.harness.oracle``), fed with the accepted traffic in arrival order. Lanes have
    disjoint devices, so feeding them one after the other keeps every device's order."""

    name = "sessions match the oracle"
    if exp.unknown:
        return {"check": name, "ok": True, "skipped": True, "count": 0, "examples": [],
                "detail": f"skipped: {len(exp.unknown):,} events got no answer, so what the service holds is unknown"}
    traffic, opts = result.traffic, result.opts
    refused_mid = 0  # refused requests followed by accepted ones in their lane
    for first, count in traffic.lanes:
        refused = 0
        for r in range(first, first + count):
            outcome = result.outcomes.get(r)
            if outcome is None or traffic.flags[r] != PLAIN or outcome[0] == BEHIND:
                continue
            if outcome[0] == 200 or (outcome[0] == 400 and outcome[2] is not None):
                refused_mid += refused
                refused = 0
            else:
                refused += 1
    if refused_mid:
        # The generator's guarantees (e.g. a duplicate repeats a message already stored)
        # hold for its whole traffic, not for what is left once requests are missing.
        return {"check": name, "ok": True, "skipped": True, "count": 0, "examples": [],
                "detail": f"skipped: {refused_mid:,} requests were refused in the middle of the traffic"}
    spec = traffic.specs[0]
    o = oracle.Oracle(spec.timeout_ms, spec.lateness_ms)
    replayed = 0
    for lane in range(len(traffic.lanes)):
        for request, item in replay_requests(traffic, lane):
            outcome = result.outcomes.get(request)
            if outcome is None or outcome[0] == BEHIND:
                continue  # not sent
            flag, status = traffic.flags[request], outcome[0]
            if isinstance(item, Request) and item.body != traffic.bodies[request]:
                raise RuntimeError(f"replaying lane {lane} gave other traffic at request {request}")
            if flag == REMAP and status == 200:
                o.feed(item)
            elif flag == PLAIN and (status == 200 or (status == 400 and outcome[2] is not None)):
                o.feed(item)
                replayed += 1
    expected = o.expected()
    project = opts.project or ""

    def rows(sql: str) -> list[dict[str, Any]] | None:
        try:
            columns, data = reader.query(sql.replace("evactors.", f"{opts.database}.").format(project=project))
        except Exception:
            return None  # e.g. a view this schema does not have: that part is left out
        return [dict(zip(columns, r, strict=True)) for r in data]

    events, sessions = rows(oracle.SQL_EVENTS), rows(oracle.SQL_SESSIONS)
    if events is None or sessions is None:
        return {"check": name, "ok": False, "count": 1, "examples": [], "detail": "events/sessions not readable"}
    optional = {"profiles_rows": oracle.SQL_PROFILES, "daily_events_rows": oracle.SQL_DAILY_EVENTS,
                "daily_page_views_rows": oracle.SQL_DAILY_PAGE_VIEWS, "dau_rows": oracle.SQL_DAU,
                "bot_rows": oracle.SQL_BOTS}
    parts = {key: rows(sql) for key, sql in optional.items()}
    diffs = oracle.compare(expected, events, sessions, **parts)  # type: ignore[arg-type]
    left_out = [k.removesuffix("_rows") for k, v in parts.items() if v is None]
    return {"check": name, "ok": not diffs, "count": len(diffs), "examples": diffs[:SHOW], "differences": diffs,
            "detail": f"{expected.summary()} from {replayed:,} accepted requests; {len(diffs)} difference(s)"
            + (f" (not compared: {', '.join(left_out)})" if left_out else "")}
