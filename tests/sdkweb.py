"""Helpers of the SDK tests: a second origin serving the real npm bundles, a recording
pass-through in front of the service, and Chromium launched the way this machine needs.

The page is served from another origin than the service (another port), so every call the
SDK makes is a real cross-origin request: the browser itself enforces CORS. Nothing is
intercepted in the browser (playwright's interception answers preflights itself and would
hide CORS failures). The pass-through forwards each request and answer unchanged and
records them (what the SDK really sent); it can answer 503 to the first N posts of a path,
so the SDK's real retry logic runs.
"""

from __future__ import annotations

import http.client
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

SDK_DIR = Path(__file__).resolve().parent / "sdk"  # tests/sdk
NODE_MODULES = SDK_DIR / "node_modules"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NODE = shutil.which("node")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         # nothing but this machine: a name other than localhost resolves to nowhere
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
         # posthog-js drops every event while navigator.webdriver is true
         "--disable-blink-features=AutomationControlled"]
# A human's Chrome: HeadlessChrome in the default UA is (rightly) a bot to the filter.
DESKTOP_CHROME = ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
                  "Chrome/131.0.0.0 Safari/537.36")

needs_browser = pytest.mark.skipif(
    CHROMIUM is None or not NODE_MODULES.is_dir(),
    reason="needs Debian's chromium and tests/sdk/node_modules (bin/setup runs npm ci when npm exists)")
needs_node = pytest.mark.skipif(NODE is None or not NODE_MODULES.is_dir(),
                                reason="needs node and tests/sdk/node_modules (bin/setup)")


class _Quiet(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a browser closing a keep-alive connection is not an error of the test


class PageServer:
    """The site: ``/node_modules/…`` from tests/sdk, and pages set by the test."""

    def __init__(self) -> None:
        self.pages: dict[str, str] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                if path in outer.pages:
                    body, kind = outer.pages[path].encode(), "text/html; charset=utf-8"
                elif path == "/favicon.ico":  # the browser asks; a 404 would be a console error
                    body, kind = b"", "image/x-icon"
                else:
                    file = (SDK_DIR / path.lstrip("/")).resolve()
                    if not path.startswith("/node_modules/") or not file.is_file() \
                            or SDK_DIR not in file.parents:
                        self.send_error(404)
                        return
                    body = file.read_bytes()
                    kind = "text/javascript" if file.suffix in (".js", ".mjs", ".cjs") else "application/json"
                self.send_response(200)
                self.send_header("content-type", kind)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = _Quiet(("127.0.0.1", 0), Handler)
        # localhost vs 127.0.0.1 and another port: another origin than the service's
        self.origin = f"http://localhost:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int


@dataclass
class Proxy:
    """Forwards to the service unchanged and records. ``fail[path] = n``: 503 to the first n
    posts, unforwarded; ``lose[path] = n``: the first n posts are forwarded (and stored) but
    their answer is replaced by a 503, as if lost on the way back: the SDK retries."""

    target: str
    fail: dict[str, int] = field(default_factory=dict)
    lose: dict[str, int] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        outer = self
        host, port = urlsplit(self.target).netloc.split(":")
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                path = urlsplit(self.path).path
                with lock:
                    failing = self.command == "POST" and outer.fail.get(path, 0) > 0
                    if failing:
                        outer.fail[path] -= 1
                    losing = self.command == "POST" and not failing and outer.lose.get(path, 0) > 0
                    if losing:
                        outer.lose[path] -= 1
                if failing:
                    status, answer = 503, [("access-control-allow-origin", "*"), ("retry-after", "0"),
                                           ("content-type", "application/json")]
                    data = b'{"success": false, "error": "injected by the test"}'
                else:
                    conn = http.client.HTTPConnection(host, int(port), timeout=30)
                    conn.request(self.command, self.path, body=body or None,
                                 headers={k: v for k, v in headers.items() if k not in ("host", "connection")})
                    resp = conn.getresponse()
                    status, data = resp.status, resp.read()
                    answer = [(k, v) for k, v in resp.getheaders()
                              if k.lower() not in ("connection", "transfer-encoding", "content-length")]
                    conn.close()
                    if losing:
                        status, data = 503, b'{"success": false, "error": "answer lost (the test)"}'
                        answer = [(k, v) for k, v in answer if k.lower() != "content-type"]
                with lock:
                    outer.seen.append(Seen(self.command, self.path, headers, body, status))
                self.send_response_only(status)
                for k, v in answer:
                    self.send_header(k, v)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_OPTIONS = _forward

        self.server = _Quiet(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.host = self.url.removeprefix("http://")
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def posts(self, prefix: str = "") -> list[Seen]:
        return [s for s in list(self.seen) if s.method == "POST" and s.path.startswith(prefix)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def launch(p: Any) -> Any:
    return p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)


def wait_for(check: Callable[[], bool], timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")
