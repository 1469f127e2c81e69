"""Run it like a real service: systemd's notify protocol, the unit file, supervisord, SIGHUP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from conftest import ROOT, Service, message, run_cli


def test_systemd_notify_protocol(make_service, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """READY=1 once listening, WATCHDOG=1 pings, STOPPING=1 on SIGTERM: what Type=notify needs."""
    path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.settimeout(30)
    service: Service = make_service(env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"})
    service.start()
    seen: list[str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and seen.count("WATCHDOG=1") < 2:
        seen += listener.recv(4096).decode().split("\n")
    assert "READY=1" in seen and seen.count("WATCHDOG=1") >= 2
    assert any(s.startswith("STATUS=listening on http://127.0.0.1:") for s in seen)
    assert service.proc is not None
    service.proc.send_signal(signal.SIGTERM)
    while "STOPPING=1" not in seen:
        seen += listener.recv(4096).decode().split("\n")
    assert service.proc.wait(30) == 0
    listener.close()


def test_systemd_unit_file_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = (ROOT / "conf" / "evactors.service").read_text()
    assert "Type=notify" in unit and "ExecReload=/bin/kill -HUP $MAINPID" in unit
    assert "RestartPreventExitStatus=2" in unit
    local = (unit.replace("/opt/evactors", str(ROOT))
             .replace("/var/lib/evactors", str(tmp_path / "data"))
             .replace("/etc/evactors/evactors.toml", str(ROOT / "conf" / "evactors.toml")))
    (tmp_path / "evactors.service").write_text(local)
    result = subprocess.run([analyze, "verify", str(tmp_path / "evactors.service")],
                            capture_output=True, text=True, timeout=60)
    problems = [line for line in (result.stdout + result.stderr).splitlines() if "evactors" in line]
    assert result.returncode == 0 and not problems, problems
    # the check has teeth: a broken unit is reported
    (tmp_path / "broken.service").write_text(local.replace("Type=notify", "Type=notifyy"))
    broken = subprocess.run([analyze, "verify", str(tmp_path / "broken.service")],
                            capture_output=True, text=True, timeout=60)
    assert "notifyy" in broken.stdout + broken.stderr


def test_supervisord_runs_and_stops_the_service(tmp_path: Path) -> None:
    supervisord = shutil.which("supervisord", path=str(ROOT / ".venv" / "bin")) or shutil.which("supervisord")
    if supervisord is None:
        pytest.skip("supervisor is not installed")
    conf = ROOT / "conf" / "supervisord.conf"
    data = tmp_path / "data"
    env = {**os.environ, "EVACTORS_HOME": str(ROOT), "EVACTORS_RUN_DIR": str(tmp_path),
           "EVACTORS_DATA_DIR": str(data), "EVACTORS_SERVER_LISTEN": "127.0.0.1:0",
           "EVACTORS_WRITE_KEYS": "key-a=project-a"}
    ctl = [str(Path(supervisord).with_name("supervisorctl")), "-c", str(conf)]
    proc = subprocess.Popen([supervisord, "-n", "-c", str(conf)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (data / "service.json").exists():
            assert time.monotonic() < deadline, (tmp_path / "supervisord.log").read_text()
            time.sleep(0.1)
        info = json.loads((data / "service.json").read_text())
        r = httpx.post(f"{info['url']}/v1/track", auth=("key-a", ""),
                       json={k: v for k, v in message("track", event="Supervised").items() if k != "type"})
        assert r.status_code == 200
        while True:  # RUNNING once it has stayed up for startsecs
            status = subprocess.run([*ctl, "status", "evactors"], env=env, capture_output=True,
                                    text=True)
            if "RUNNING" in status.stdout:
                break
            assert "STARTING" in status.stdout and time.monotonic() < deadline, status.stdout
            time.sleep(0.25)
        stop = subprocess.run([*ctl, "stop", "evactors"], env=env, capture_output=True, text=True,
                              timeout=90)
        assert "evactors: stopped" in stop.stdout, stop.stdout + stop.stderr
        log = (tmp_path / "supervisord.log").read_text()
        assert "stopped: evactors (exit status 0)" in log, log
        assert "SIGTERM: stopping" in (tmp_path / "evactors.log").read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    rows = run_cli("query", "--data-dir", str(data), "--format", "tsv",
                   "SELECT name FROM evactors.events")
    assert rows.returncode == 0 and rows.stdout.strip() == "Supervised", rows.stderr


def test_sighup_reloads_write_keys_and_geoip_without_restart(make_service, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from evactors.enrichment.geoip import bundled_database

    conf = tmp_path / "evactors.toml"
    conf.write_text('[write_keys]\nold-key = "project-a"\n')
    database = tmp_path / "City.mmdb"
    shutil.copyfile(bundled_database(), database)
    service: Service = make_service(write_keys={}, args=["--config", str(conf)], env={
        "EVACTORS_GEOIP_DATABASE": str(database),
        "EVACTORS_GEOIP_RELOAD_CHECK_SECONDS": "3600"}).start()  # only SIGHUP will look
    body = {k: v for k, v in message("track", event="E").items() if k != "type"}
    assert service.post("/v1/track", body, key="old-key").status_code == 200
    conf.write_text('[write_keys]\nnew-key = "project-a"\n')  # a rotation
    shutil.copyfile(bundled_database(), tmp_path / "new.mmdb")
    os.replace(tmp_path / "new.mmdb", database)  # and a database update
    assert service.proc is not None
    pid = service.proc.pid
    service.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while "SIGHUP: 1 write keys loaded" not in service.log():
        assert time.monotonic() < deadline, service.log()[-2000:]
        time.sleep(0.05)
    assert service.post("/v1/track", body, key="new-key").status_code == 200
    assert service.post("/v1/track", body, key="old-key").status_code == 401
    assert "SIGHUP: geoip database reloaded" in service.log()
    conf.write_text("[write_keys\n")  # a broken file is refused; the running keys stay
    service.proc.send_signal(signal.SIGHUP)
    while "configuration not reloaded" not in service.log():
        assert time.monotonic() < deadline + 20, service.log()[-2000:]
        time.sleep(0.05)
    assert service.post("/v1/track", body, key="new-key").status_code == 200
    assert service.proc.pid == pid and service.proc.poll() is None  # never restarted
