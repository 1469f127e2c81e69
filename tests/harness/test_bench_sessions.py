"""``bin/evactors bench-sessions``: memory per active session on its own real Valkey."""

from __future__ import annotations

import json

from conftest import run_cli


def test_bench_sessions_reports_sane_memory_per_session() -> None:
    result = run_cli("bench-sessions", "--sessions", "2000", "--batch", "300", "--json")
    assert result.returncode == 0, result.stderr
    r = json.loads(result.stdout)
    assert r["sessions"] == r["open_sessions"] == 2000  # one open session per visitor
    assert 0 < r["bytes_per_session"] < 20_000
    kinds = r["by_key_type"]
    assert kinds["state"]["bytes_per_session"] > 0 and 0 < r["state_encoding_bytes"] < r["bytes_per_session"]
    assert "dedup marker" not in kinds and kinds["dedup window"]["keys"] == 1  # one string per bucket
    assert 8 <= r["dedup_bytes_per_event"] <= 24  # 8-byte fingerprints, one page view each
    assert 0 < r["idle_visitor_bytes"] < kinds["state"]["bytes_per_session"]  # closed: no held views
    assert kinds["session index"]["members"] >= 2000
    # MEMORY USAGE of the keys accounts for most of the growth, and never for more than all of it
    assert 0.5 * r["bytes_per_session"] < r["attributed_bytes_per_session"] <= 1.1 * r["bytes_per_session"]
