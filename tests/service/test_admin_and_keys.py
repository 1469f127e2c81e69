"""The admin API apart (its own listener; /admin/query read-only, in no session of the
flusher's), the live view's read keys with a viewer cap per project, and the data dir's
files private to the service's user."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import time
from pathlib import Path

import httpx

from conftest import Service, message, run_cli


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_admin_and_metrics_are_on_their_own_socket_not_the_public_listener(service: Service) -> None:
    assert service.admin == f"unix:{service.data_dir / 'admin.sock'}"
    assert _mode(service.data_dir / "admin.sock") == 0o600
    for path, method in (("/admin/status", "GET"), ("/admin/query", "POST"), ("/admin/remap", "POST"),
                         ("/metrics", "GET")):
        r = service.http.request(method, f"{service.url}{path}", content=b"SELECT 1")
        assert r.status_code == 404, (path, r.status_code)  # public: not there at all
    assert service.admin_request("GET", "/admin/status").json()["backlog_events"] == 0
    assert service.admin_request("GET", "/admin/status", token="wrong").status_code == 401
    assert service.admin_request("GET", "/admin/status", token="é").status_code == 401  # not a 500
    assert "evactors_events_accepted" in service.metrics()
    # the CLI commands that talk to admin go through the socket
    r = run_cli("status", "--data-dir", str(service.data_dir))
    assert r.returncode == 0 and "backlog 0 events" in r.stdout, r.stderr
    r = run_cli("query", "--data-dir", str(service.data_dir), "--format", "tsv", "SELECT 41 + 1")
    assert r.returncode == 0 and r.stdout.strip() == "42", r.stderr
    r = run_cli("query", "--data-dir", str(service.data_dir), "SELECT * FROM file('/etc/passwd')")
    assert r.returncode == 1 and "readonly" in r.stderr.lower()


def test_admin_can_listen_on_tcp_when_configured(make_service) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    service: Service = make_service(env={"EVACTORS_ADMIN_LISTEN": f"127.0.0.1:{port}"}).start()
    assert service.admin == f"http://127.0.0.1:{port}"
    assert service.admin_request("GET", "/admin/status").status_code == 200
    assert httpx.get(f"{service.url}/metrics").status_code == 404


def test_admin_query_is_read_only_and_never_reaches_the_flushers_session(service: Service) -> None:
    def ask(sql: str) -> httpx.Response:
        return service.admin_request("POST", "/admin/query", sql.encode())

    refused = {
        "SET max_memory_usage = 1000": "readonly",
        "SET max_threads = 3": "readonly",
        "SELECT * FROM file('admin.token', 'LineAsString')": "readonly",
        "SELECT * FROM url('http://127.0.0.1:1/x', 'LineAsString')": "readonly",
        "SELECT * FROM executable('id', 'TSV', 'x String')": "readonly",
        "INSERT INTO evactors.events (id) VALUES ('x')": "readonly",
        "DETACH TABLE evactors.events": "readonly",
        "SELECT 1; SET max_memory_usage = 1000": "multi-statement",
        "SET max_memory_usage = 1000; SELECT 1": "multi-statement",
        "SELECT 1 SETTINGS readonly = 0": "readonly",
    }
    for sql, why in refused.items():
        r = ask(sql)
        assert r.status_code == 400 and why in r.json()["message"].lower(), (sql, r.text)
    assert ask("SELECT getSetting('max_memory_usage') AS m").json()["rows"] != [[1000]]
    assert ask("SELECT getSetting('max_threads') AS t").json()["rows"] != [[3]]
    assert ask("SELECT 1 AS one; -- a trailing comment").json()["rows"] == [[1]]
    assert ask("SHOW TABLES FROM evactors").status_code == 200
    # the flusher still inserts: no setting of the attempts above reached its session
    ids = [m["messageId"] for m in [message("track", event="After") for _ in range(5)]]
    assert service.batch([message("track", event="After", messageId=i) for i in ids]).status_code == 200
    rows = service.wait_rows("SELECT message_id FROM evactors.events WHERE name = 'After'", 5)
    assert sorted(r["message_id"] for r in rows) == sorted(ids)
    assert "insert of" not in service.log()


def test_the_live_view_opens_with_a_read_key_never_a_write_key(make_service) -> None:  # type: ignore[no-untyped-def]
    service: Service = make_service(write_keys={"key-a": "project-a", "key-b": "project-b"},
                                    env={"EVACTORS_SERVER_LIVE_VIEWERS_PER_PROJECT": "2"}).start()
    read_a, read_b = service.read_key("project-a"), service.read_key("project-b")
    assert len(read_a) >= 16 and read_a != read_b
    assert _mode(service.data_dir / "read_key.project-a") == 0o600
    for path in ("/live", "/live/stream"):
        for key in ("key-a", "", "nope"):
            r = httpx.get(f"{service.url}{path}?key={key}", timeout=10)
            assert r.status_code == 401 and r.json()["error"] == "unauthorized", (path, key)
    assert httpx.get(f"{service.url}/live?key={read_a}", timeout=10).status_code == 200
    # two viewers of project-a fill its places; project-b still gets in
    with httpx.Client(timeout=20) as client:
        streams = []
        try:
            for _ in range(2):
                stream = client.stream("GET", f"{service.url}/live/stream?key={read_a}")
                response = stream.__enter__()
                streams.append(stream)
                assert response.status_code == 200
            third = httpx.get(f"{service.url}/live/stream?key={read_a}", timeout=10)
            assert third.status_code == 503 and "of this project" in third.json()["message"]
            with httpx.stream("GET", f"{service.url}/live/stream?key={read_b}", timeout=20) as other:
                assert other.status_code == 200
                lines = other.iter_lines()
                assert next(lines) == "event: hello"
                assert next(lines) == 'data: {"project":"project-b"}'
        finally:
            for stream in streams:
                stream.__exit__(None, None, None)
    out = service.log()
    assert "read key of project 'project-a'" in out and read_a in out  # printed when generated


def test_configured_read_keys_are_used_and_must_not_be_write_keys(make_service, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    service: Service = make_service(env={"EVACTORS_READ_KEYS": "a-read-key-of-project-a=project-a"}).start()
    assert not (service.data_dir / "read_key.project-a").exists()
    with httpx.stream("GET", f"{service.url}/live/stream?key=a-read-key-of-project-a", timeout=20) as s:
        assert s.status_code == 200
    r = run_cli("check-config", env={"EVACTORS_WRITE_KEYS": "same-key-for-both-x=p",
                                     "EVACTORS_READ_KEYS": "same-key-for-both-x=p"})
    assert r.returncode == 2 and "read_keys.same-key-for-both-x" in r.stderr


def test_the_data_dir_and_its_secrets_are_private_and_tightened_when_found_loose(make_service) -> None:  # type: ignore[no-untyped-def]
    service: Service = make_service(write_keys={}).start()  # a generated write key
    data = service.data_dir
    assert _mode(data) == 0o700
    for name in ("write_key", "admin.token", "read_key.default"):
        assert _mode(data / name) == 0o600, name
    aof = [f for f in (data / "redis").rglob("*") if f.is_file()]
    assert aof and all(_mode(f) & 0o077 == 0 for f in aof), {str(f): oct(_mode(f)) for f in aof}
    info = json.loads((data / "service.json").read_text())
    key = (data / "write_key").read_text().strip().partition("=")[0]
    assert key not in json.dumps(info) and "write_key" not in info
    log = service.log()
    assert f"write key: {key}" in log
    assert service.stop() == 0
    # an older run's looser modes are tightened at start; the key is not printed again
    os.chmod(data, 0o755)
    for name in ("write_key", "admin.token"):
        os.chmod(data / name, 0o644)
    for f in aof:
        if f.exists():
            os.chmod(f, 0o644)
    service.start()
    assert _mode(data) == 0o700
    assert _mode(data / "write_key") == 0o600 and _mode(data / "admin.token") == 0o600
    assert all(_mode(f) & 0o077 == 0 for f in (data / "redis").rglob("*") if f.is_file())
    assert service.log().count(f"write key: {key}") == 1
    assert "was readable by others" in service.log()
    time.sleep(0.1)


def test_a_planted_secret_file_is_never_followed(tmp_path: Path) -> None:
    from evactors.store import files

    target = tmp_path / "elsewhere"
    target.write_text("x")
    link = tmp_path / "admin.token"
    link.symlink_to(target)
    assert not files.create_secret(link, "secret")  # O_EXCL: an existing name is not reused
    assert target.read_text() == "x"
    fresh = tmp_path / "new.token"
    assert files.create_secret(fresh, "secret") and _mode(fresh) == 0o600


def test_sighup_replaces_the_read_keys(make_service, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "evactors.toml"
    config.write_text('[read_keys]\n"first-read-key-0001" = "project-a"\n')
    service: Service = make_service(args=["--config", str(config)]).start()

    def status(key: str) -> int:
        return httpx.get(f"{service.url}/live?key={key}", timeout=10).status_code

    assert status("first-read-key-0001") == 200
    config.write_text('[read_keys]\n"second-read-key-0002" = "project-a"\n')
    assert service.proc is not None
    service.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while status("first-read-key-0001") != 401:
        assert time.monotonic() < deadline, service.log()[-2000:]
        time.sleep(0.2)
    assert status("second-read-key-0002") == 200
