"""The live view in a real headless Chromium: the numbers move when events arrive."""

from __future__ import annotations

import shutil
import signal
import time
import uuid

import httpx
import pytest

from conftest import CHROME, GB_IP, Service

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# The flags this machine's Chromium needs (no sandbox as root, no network of its own).
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                                 "(.ci/run installs it: apt-get install chromium)")


def test_live_view_numbers_move_when_events_arrive(service: Service, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1000, "height": 600})
        page.goto(f"{service.url}/live?key={service.read_key('project-a')}")
        page.wait_for_function("document.getElementById('state').textContent === 'live'",
                               timeout=20_000)
        assert page.inner_text("#project") == "project-a"
        before = {n: page.inner_text(f"#{n}") for n in ("visitors", "rate", "total")}
        page.screenshot(path=str(tmp_path / "before.png"))
        sent = 0
        for i in range(4):
            batch = [{"type": "track", "event": f"Bought {j}", "messageId": str(uuid.uuid4()),
                      "anonymousId": f"v{i}-{j}", "userId": f"buyer-{j}",
                      "context": {"ip": GB_IP, "userAgent": CHROME, "page": {"path": f"/p/{j}"}}}
                     for j in range(5)]
            assert service.batch(batch).status_code == 200
            sent += len(batch)
            time.sleep(0.3)
        page.wait_for_function(f"Number(document.getElementById('total').textContent) >= {sent}",
                               timeout=20_000)
        # The live set is written at most once a second (publisher): wait for all five.
        page.wait_for_function("Number(document.getElementById('visitors').textContent) >= 5",
                               timeout=20_000)
        after = {n: page.inner_text(f"#{n}") for n in ("visitors", "rate", "total")}
        page.screenshot(path=str(tmp_path / "after.png"))
        rows = page.inner_text("#events")
        browser.close()
    assert before == {"visitors": "0", "rate": "0", "total": "0"}
    assert int(after["total"]) == sent and int(after["visitors"]) == 5 and float(after["rate"]) > 0
    assert "Gamlingay, GB" in rows and "Chrome" in rows and "/p/3" in rows
    assert (tmp_path / "before.png").read_bytes() != (tmp_path / "after.png").read_bytes()


def test_live_stream_needs_a_key_and_ends_on_shutdown(service: Service) -> None:
    assert httpx.get(f"{service.url}/live/stream?key=nope", timeout=10).status_code == 401
    read_key = service.read_key("project-a")
    with httpx.stream("GET", f"{service.url}/live/stream?key={read_key}", timeout=30) as stream:
        lines = stream.iter_lines()
        assert next(lines) == "event: hello"
        assert service.proc is not None
        service.proc.send_signal(signal.SIGTERM)  # a watched service still stops promptly
        started = time.monotonic()
        for _line in lines:
            pass
    assert service.proc.wait(30) == 0 and time.monotonic() - started < 10
