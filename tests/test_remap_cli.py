"""``bin/evactors remap``: its refusals (the re-map itself is proven against the oracle in
test_oracle.py)."""

from __future__ import annotations

from pathlib import Path

from conftest import Service, run_cli


def test_remap_refuses_bad_input_and_needs_a_running_service(service: Service, tmp_path: Path) -> None:
    good, bad = tmp_path / "good.csv", tmp_path / "bad.csv"
    good.write_text("old,new\nanon-1,anon-2\nsame,same\n")
    bad.write_text("anon-1,anon-2\nonly-one-column\n")
    data = ["--data-dir", str(service.data_dir)]
    r = run_cli("remap", *data, "--project", "project-a", str(good))
    assert r.returncode == 0 and "1 id(s) re-mapped in project-a, 1 skipped" in r.stdout, r.stderr
    r = run_cli("remap", *data, "--project", "project-a", str(bad))
    assert r.returncode == 2 and "bad.csv:2: expected 'old,new'" in r.stderr
    r = run_cli("remap", *data, "--project", "nope", str(good))
    assert r.returncode == 1 and "unknown project 'nope'" in r.stderr
    r = run_cli("remap", *data, "--project", "project-a", str(tmp_path / "missing.csv"))
    assert r.returncode == 2 and "cannot read" in r.stderr
    assert service.stop() == 0
    r = run_cli("remap", *data, "--project", "project-a", str(good))
    assert r.returncode == 3 and "not running" in r.stderr
