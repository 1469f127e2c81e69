"""``bin/evactors remap``: its refusals (the re-map itself is proven against the oracle in
test_oracle.py)."""

from __future__ import annotations

from pathlib import Path

from conftest import Service, message, run_cli


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


def test_a_remap_right_after_the_old_ids_events_sees_them(service: Service, tmp_path: Path) -> None:
    """The re-map reads the old id's state, which another shard writes (in the session
    worker): it is taken only once the events accepted before it are processed, so it
    does not overtake them. Sent at once here: the first commit of a fresh service is slow
    enough to lose that race."""
    assert service.batch([message("identify", anonymousId="old", userId="u1", traits={"a": 1}),
                          message("page", anonymousId="old", name="A", properties={"path": "/a"})]
                         ).status_code == 200
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("anon_old,anon_new\nold,new\n")  # a header, then the pair
    r = run_cli("remap", "--data-dir", str(service.data_dir), "--project", "project-a", str(pairs))
    assert r.returncode == 0, r.stderr
    assert service.batch([message("track", anonymousId="new", event="X")]).status_code == 200
    row = service.wait_rows("SELECT profile_id, session_number FROM evactors.events WHERE name = 'X'", 1)[0]
    assert row == {"profile_id": "u1", "session_number": 2}
