"""The browser SDKs sites already run, unchanged, in a real Chromium, from a page of another
origin: Segment's analytics.js (analytics-next), RudderStack's analytics-js v3, posthog-js
and @openpanel/web. Each test checks what the SDK sent and what was stored: every message
id once, the user agent parsed, a session, the page path, traits in ``profiles``, nothing
in another project."""

from __future__ import annotations

import base64
import gzip
import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from conftest import Service
from sdkweb import DESKTOP_CHROME, PageServer, Proxy, launch, needs_browser, wait_for

pytestmark = needs_browser

KEYS = {"key-a": "project-a", "key-b": "project-b"}
GZIP_MAGIC = b"\x1f\x8b"


@pytest.fixture
def site() -> Any:
    server = PageServer()
    yield server
    server.close()


@pytest.fixture
def two_projects(make_service: Any) -> Service:
    # a session's last screen view is held until the session ends: 5 s idle ends it here
    return make_service(write_keys=KEYS, env={"EVACTORS_PIPELINE_LATENESS_SECONDS": "0",
                                               "EVACTORS_PIPELINE_SESSION_TIMEOUT_SECONDS": "5",
                                               "EVACTORS_OPENPANEL_CLIENTS": '{ "op-web" = "project-a", '
                                               '"op-server" = "project-a", "op-b" = "project-b" }',
                                               "EVACTORS_OPENPANEL_SECRETS": '{ "op-server" = "sec-1" }'}
                        ).start()


def _run_page(site: PageServer, html: str, script: str, name: str, settle: Callable[[], bool] | None = None,
              leave: str = "") -> list[str]:
    """Open the page in Chromium, run ``script`` (an async function body), keep the page open
    until ``settle()`` holds; the browser console's errors (and uncaught ones) are returned.
    ``leave``: run that too, then leave the page at once (what an SDK sends while unloading)."""
    from playwright.sync_api import sync_playwright

    site.pages[f"/{name}.html"] = html
    errors: list[str] = []
    with sync_playwright() as p:
        browser = launch(p)
        context = browser.new_context(user_agent=DESKTOP_CHROME)
        page = context.new_page()
        # "Failed to load resource: … 503": the statuses (the injected ones too) are checked at
        # the pass-through; what is left (a CORS block, an SDK's own error) is the page's fault
        page.on("console", lambda m: errors.append(m.text) if m.type == "error"
                and not m.text.startswith("Failed to load resource") else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{site.origin}/{name}.html")
        page.evaluate(f"async () => {{ {script} }}")
        if settle is not None:
            wait_for(settle, 40, f"{name}: the SDK's requests")
        if leave:
            page.evaluate(f"() => {{ {leave} }}")
            page.goto("about:blank")
        page.wait_for_timeout(300)
        browser.close()
    return errors


def _bodies(seen: list[Any]) -> list[dict[str, Any]]:
    out = []
    for s in seen:
        data = s.body
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        out.append(json.loads(data))
    return out


def _stored(service: Service, project: str, expected: int) -> list[dict[str, Any]]:
    return service.wait_rows(
        "SELECT message_id, name, type, device_id, profile_id, session_id, path, browser, os, properties "
        f"FROM evactors.events WHERE project_id = '{project}' AND message_id != '' ORDER BY created_at",
        expected, timeout=60)


def _assert_common(service: Service, rows: list[dict[str, Any]], sent_ids: set[str], path: str) -> None:
    ids = [r["message_id"] for r in rows]
    assert len(ids) == len(set(ids)), "a message id stored twice"
    assert set(ids) == sent_ids
    assert {r["browser"] for r in rows} == {"Chrome"} and {r["os"] for r in rows} == {"Linux"}
    assert all(r["session_id"] for r in rows), "an event without a session"
    sessions = service.wait_rows("SELECT session_id, page_count, event_count FROM evactors.sessions FINAL "
                                 "WHERE project_id = 'project-a'", 1)
    assert {r["session_id"] for r in rows} <= {s["session_id"] for s in sessions}
    assert path in {r["path"] for r in rows}
    other = service.query("SELECT count() AS n FROM evactors.events WHERE project_id != 'project-a'")
    assert other[0]["n"] == 0, "events in another project"
    bots = service.query("SELECT count() AS n FROM evactors.events_bots")
    assert bots[0]["n"] == 0


def test_segment_analytics_next_posts_to_short_paths_and_every_event_is_stored_once(
        two_projects: Service, site: PageServer) -> None:
    service = two_projects
    proxy = Proxy(service.url, fail={"/v1/t": 1, "/v1/b": 1})  # the first track and batch: a 503
    umd = "/node_modules/@segment/analytics-next/dist/umd/index.js"
    html = f"""<!doctype html><title>Shop</title><script src="{umd}"></script>"""

    def load(delivery: str) -> str:
        return (f"""const [a] = await AnalyticsNext.AnalyticsBrowser.load(
              {{writeKey: 'key-a', cdnSettings: {{integrations: {{'Segment.io': {{apiKey: 'key-a'}}}},
                metrics: {{sampleRate: 1, flushTimer: 300}}}}}},
              {{integrations: {{'Segment.io': {{apiHost: '{proxy.host}/v1', protocol: 'http',
                deliveryStrategy: {delivery}}}}}}});""")

    standard = load("{strategy: 'standard'}") + """
        await a.page();
        await a.identify('seg-user', {email: 'ada@example.com', plan: 'pro'});
        await a.track('Clicked', {button: 'buy'});
        await a.group('acme', {name: 'Acme'});
        await a.alias('seg-user-2', 'seg-user');
        navigator.sendBeacon('""" + proxy.url + """/v1/t', JSON.stringify({writeKey: 'key-a',
          type: 'track', event: 'Beacon', anonymousId: a.user().anonymousId(), messageId: 'beacon-1',
          context: {page: {path: '/segment.html'}}}));
        await fetch('""" + service.url + """/v1/nope', {method: 'POST', body: '{}'}).then(r => r.status)
          .then(s => { if (s !== 404) throw new Error('404 not readable: ' + s) });
    """
    try:
        errors = _run_page(site, html, standard, "segment",
                           lambda: len([s for s in proxy.posts("/v1/") if s.status == 200]) >= 7)
        batching = load("{strategy: 'batching', config: {size: 3, timeout: 300}}") + """
            await a.page(); await a.track('Added', {sku: 'x'}); await a.track('Paid', {total: 3});"""
        errors += _run_page(site, html, batching, "segment-batch",
                            lambda: any(s.path == "/v1/b" and s.status == 200 for s in proxy.posts()))
        posts = proxy.posts("/v1/")
        stored = [s for s in posts if s.status == 200 and s.path not in ("/v1/m",)]
        sent_ids: set[str] = set()
        for body in _bodies(stored):
            for m in body.get("batch", [body]):
                sent_ids.add(m["messageId"])
        paths = {s.path for s in posts}
        assert {"/v1/p", "/v1/i", "/v1/t", "/v1/g", "/v1/a", "/v1/b"} <= paths, paths
        track = [s for s in posts if s.path == "/v1/t" and s.headers.get("content-type") == "text/plain"]
        assert track[0].status == 503 and track[1].headers.get("x-retry-count") == "1"
        assert track[0].headers["authorization"] == "Basic " + base64.b64encode(b"key-a:").decode()
        beacon = [s for s in posts if b"beacon-1" in s.body]
        assert beacon and "authorization" not in beacon[0].headers and beacon[0].status == 200
        assert not errors, errors  # no CORS failure, nothing the SDK complains of
        try:
            rows = _stored(service, "project-a", len(sent_ids))
        except AssertionError:
            print(sorted(sent_ids), service.query("SELECT message_id, name FROM evactors.events"),
                  service.query("SELECT * FROM evactors.events_bots"))
            raise
        _assert_common(service, rows, sent_ids, "/segment.html")
        assert {r["name"] for r in rows} >= {"screen_view", "identify", "Clicked", "group", "alias",
                                              "Beacon", "Added", "Paid"}
        profiles = service.wait_rows("SELECT profile_id, traits FROM evactors.profiles "
                                     "WHERE project_id = 'project-a'", 1)
        assert any(p["traits"].get("email") == "ada@example.com" for p in profiles)
        metrics = [s for s in posts if s.path == "/v1/m"]
        retries = [s.path for s in posts if "x-retry-count" in s.headers]
        print(f"\nanalytics-next: {len(posts)} posts to {sorted(paths)}; {len(sent_ids)} message ids, "
              f"{len(rows)} rows, {len(metrics)} telemetry posts; retries {retries}")
        assert all(s.status == 200 for s in metrics)
    finally:
        proxy.close()


def test_rudderstack_v3_headers_pass_the_preflight_and_identify_traits_reach_profiles(
        two_projects: Service, site: PageServer) -> None:
    service = two_projects
    proxy = Proxy(service.url, fail={"/v1/track": 1})  # its first track: a 503, so it retries
    umd = "/node_modules/@rudderstack/analytics-js/dist/npm/modern/bundled/umd/index.js"
    html = f"""<!doctype html><title>Rudder shop</title><script src="{umd}"></script>"""

    def script(options: str) -> str:
        return """
        const ra = new rudderanalytics.RudderAnalytics();
        await new Promise(resolve => {
          ra.load('key-a', '""" + proxy.url + """', {
            getSourceConfig: () => ({source: {id: 'src-1', name: 'shop', workspaceId: 'ws-1', enabled: true,
                                              config: {}, destinations: []}}),
            loadIntegration: false, polyfillIfRequired: false, sendAdblockPage: false,
            """ + options + """
            onLoaded: () => resolve()});
        });
        ra.page();
        ra.identify('rs-user', {email: 'grace@example.com', plan: 'team'});
        ra.track('Bought', {sku: 'r-1', price: 9.5});
    """

    try:
        errors = _run_page(site, html, script("queueOptions: {minRetryDelay: 200, maxRetryDelay: 1000},"),
                           "rudder", lambda: {"/v1/page", "/v1/identify", "/v1/track"} <= {
                               s.path for s in proxy.posts("/v1/") if s.status == 200})
        # its sendBeacon transport: /beacon/v1/batch?writeKey=…, a text/plain batch, no headers
        errors += _run_page(site, html, script("useBeacon: true, beaconQueueOptions: {flushQueueInterval: 300},"),
                            "rudder-beacon", lambda: any(s.status == 200 for s in proxy.posts("/beacon/")))
        posts = proxy.posts("/v1/")
        assert not errors, errors  # no CORS failure, nothing the SDK complains of
        beacons = proxy.posts("/beacon/v1/batch?writeKey=key-a")
        assert beacons and all(s.status == 200 and "authorization" not in s.headers for s in beacons)
        ok = [s for s in posts if s.status == 200]
        sent_ids = {b["messageId"] for b in _bodies(ok)} | {m["messageId"] for b in _bodies(beacons)
                                                            for m in b["batch"]}
        identify = next(b for s, b in zip(ok, _bodies(ok), strict=True) if s.path == "/v1/identify")
        assert identify["context"]["traits"]["email"] == "grace@example.com" and not identify.get("traits")
        first = posts[0]
        anonymous = base64.b64decode(first.headers["anonymousid"]).decode()
        assert anonymous == _bodies([first])[0]["anonymousId"] and first.headers["sentat"]
        retried = [s for s in posts if "rsa-retry-attempt" in s.headers]
        assert retried and retried[0].path == "/v1/track" and retried[0].status == 200
        rows = _stored(service, "project-a", len(sent_ids))
        _assert_common(service, rows, sent_ids, "/rudder.html")
        assert all(r["properties"].get("channel") == "web" for r in rows if r["type"] == "track")
        profiles = service.wait_rows("SELECT profile_id, traits FROM evactors.profiles "
                                     "WHERE project_id = 'project-a'", 1)
        assert profiles[0]["profile_id"] == "rs-user" and profiles[0]["traits"]["email"] == "grace@example.com"
        print(f"\nrudderstack: {len(posts)} posts to {sorted({s.path for s in posts})}, {len(beacons)} beacons "
              f"({sum(len(b['batch']) for b in _bodies(beacons))} events); headers "
              f"{sorted(k for k in retried[0].headers if k.startswith(('rsa-', 'anonymousid', 'sentat')))}; "
              f"{len(sent_ids)} message ids, {len(rows)} rows")
    finally:
        proxy.close()


def _posthog_events(seen: list[Any]) -> list[dict[str, Any]]:
    events = []
    for body in _bodies(seen):
        events += body["batch"] if isinstance(body, dict) and "batch" in body else (
            body if isinstance(body, list) else [body])
    return events


def test_posthog_js_capture_reaches_the_pipeline_with_its_uuids_and_identify_traits(
        two_projects: Service, site: PageServer) -> None:
    service = two_projects
    proxy = Proxy(service.url)
    umd = "/node_modules/posthog-js/dist/array.no-external.js"
    html = f"""<!doctype html><title>Hog shop</title><script src="{umd}"></script>"""
    script = """
        // flags left on: its start-up calls (/flags/) must get an answer it runs with
        posthog.init('key-a', {api_host: '""" + proxy.url + """',
          disable_external_dependency_loading: true, autocapture: false, capture_pageleave: false,
          disable_session_recording: true, disable_surveys: true, capture_dead_clicks: false,
          capture_exceptions: false, person_profiles: 'identified_only'});
        posthog.capture('Bought', {sku: 'p-1'});
        posthog.identify('ph-user', {email: 'hedy@example.com', plan: 'scale'});
        posthog.group('company', 'acme', {name: 'Acme'});
        posthog.alias('ph-alias');
    """
    wanted = {"$pageview", "Bought", "$identify", "$groupidentify", "$create_alias"}
    leave = "posthog.capture('Leaving', {why: 'unload'})"  # sent by sendBeacon as the page goes
    try:
        def captures() -> list[Any]:
            return [s for s in proxy.posts() if s.path.startswith(("/e/", "/i/v0/e", "/batch"))]

        errors = _run_page(site, html, script, "posthog", lambda: wanted <= {
            e["event"] for e in _posthog_events([s for s in captures() if s.status == 200])}, leave=leave)
        wait_for(lambda: "Leaving" in {e["event"] for e in _posthog_events(
            [s for s in captures() if s.status == 200])}, 20, "the event sent while leaving")
        posts = captures()
        assert not errors, errors  # nothing the SDK complains of, CORS or its configuration
        startup = [s for s in proxy.seen if s.path.startswith(("/flags", "/decide", "/array"))]
        assert startup and all(s.status == 200 for s in startup)
        events = _posthog_events([s for s in posts if s.status == 200])
        sent_ids = {e["uuid"] for e in events}
        rows = _stored(service, "project-a", len(sent_ids))
        _assert_common(service, rows, sent_ids, "/posthog.html")
        by_id = {r["message_id"]: r for r in rows}
        kinds = {e["event"]: by_id[e["uuid"]]["type"] for e in events}
        assert kinds["$pageview"] == "page" and kinds["Bought"] == "track" and kinds["$identify"] == "identify"
        assert kinds["$groupidentify"] == "group" and kinds["$create_alias"] == "alias"
        profiles = service.wait_rows("SELECT profile_id, traits FROM evactors.profiles "
                                     "WHERE project_id = 'project-a'", 1)
        assert any(p["profile_id"] == "ph-user" and p["traits"].get("email") == "hedy@example.com"
                   for p in profiles)
        gzipped = sum(s.body[:2] == GZIP_MAGIC for s in posts)
        beacon = [s for s in posts if s.headers.get("sec-fetch-mode") == "no-cors"]  # sendBeacon's mode
        assert beacon and beacon[-1].status == 200 and "Leaving" in json.dumps(_posthog_events(beacon))
        paths = sorted({s.path.split("?")[0] for s in posts})
        print(f"\nposthog-js: {len(posts)} posts ({len(beacon)} by sendBeacon) to {paths} "
              f"({sorted({s.headers.get('content-type', '') for s in posts})}, gzip "
              f"{gzipped}); start-up calls {sorted({(s.method, s.path.split('?')[0]) for s in startup})}; "
              f"{len(sent_ids)} uuids, {len(rows)} rows")
    finally:
        proxy.close()


def test_openpanel_web_tracks_and_identifies_and_a_retried_body_is_stored_once(
        two_projects: Service, site: PageServer) -> None:
    service = two_projects
    proxy = Proxy(service.url, lose={"/track": 1})  # the first answer is lost: the SDK resends it
    html = """<!doctype html><title>Panel shop</title>
      <script type="importmap">{"imports": {"@openpanel/sdk": "/node_modules/@openpanel/sdk/dist/index.js"}}</script>
      <script type="module">
        import { OpenPanel } from '/node_modules/@openpanel/web/dist/index.js';
        window.OpenPanel = OpenPanel;
      </script>"""
    script = """
        while (!window.OpenPanel) await new Promise(r => setTimeout(r, 20));
        const op = new OpenPanel({apiUrl: '""" + proxy.url + """', clientId: 'op-web',
                                  trackScreenViews: true, trackOutgoingLinks: false, trackAttributes: false});
        await new Promise(r => setTimeout(r, 2500));  // the screen view, resent once
        await op.track('clicked', {button: 'buy'});
        await op.identify({profileId: 'op-user', firstName: 'Ada', email: 'ada@openpanel.example',
                           properties: {plan: 'free'}});
        await op.track('paid', {total: 12});
    """
    try:
        errors = _run_page(site, html, script, "openpanel",
                           lambda: len([s for s in proxy.posts("/track") if s.status == 200]) >= 4)
        posts = proxy.posts("/track")
        assert not errors, errors  # no CORS failure, nothing the SDK complains of
        assert posts[0].status == 503 and posts[1].body == posts[0].body, "the SDK resends the same body"
        assert posts[0].headers["openpanel-client-id"] == "op-web"
        bodies = _bodies(posts)
        assert [b["type"] for b in bodies] == ["track", "track", "track", "identify", "track"]
        rows = service.wait_rows("SELECT message_id, name, type, device_id, profile_id, session_id, path, "
                                 "browser, os, properties FROM evactors.events WHERE project_id = 'project-a' "
                                 "AND message_id != '' ORDER BY created_at", 4, timeout=60)
        _assert_common(service, rows, {r["message_id"] for r in rows}, "/openpanel.html")
        assert len(rows) == 4, "the resent screen view is stored once"
        assert [r["name"] for r in rows] == ["screen_view", "clicked", "identify", "paid"]
        assert len({r["device_id"] for r in rows}) == 1
        profiles = service.wait_rows("SELECT profile_id, traits FROM evactors.profiles "
                                     "WHERE project_id = 'project-a'", 1)
        assert profiles[0]["profile_id"] == "op-user"
        assert profiles[0]["traits"]["email"] == "ada@openpanel.example" and profiles[0]["traits"]["plan"] == "free"
        print(f"\nopenpanel-web: {len(posts)} posts to /track ({[b['type'] for b in bodies]}), headers "
              f"{sorted(k for k in posts[0].headers if k.startswith('openpanel'))}; {len(rows)} rows")
    finally:
        proxy.close()


def test_a_page_of_an_origin_its_project_does_not_list_is_blocked_by_the_browser(
        make_service: Any, site: PageServer) -> None:
    """The control: the browser really enforces CORS here (nothing intercepted), so a page
    of an origin the project does not list sends nothing that is stored."""
    service = make_service(write_keys={"key-a": "project-a"},
                           env={"EVACTORS_CORS_ORIGINS": '{ project-a = ["http://shop.example"] }'}).start()
    script = """
        const r = await fetch('""" + service.url + """/v1/t', {method: 'POST',
          headers: {'Content-Type': 'text/plain', 'Authorization': 'Basic ' + btoa('key-a:')},
          body: JSON.stringify({event: 'Blocked', anonymousId: 'a', messageId: 'blocked-1'})})
          .then(() => 'sent', e => 'blocked: ' + e);
        if (!r.startsWith('blocked')) throw new Error(r);
        navigator.sendBeacon('""" + service.url + """/v1/t', JSON.stringify({writeKey: 'key-a',
          event: 'Beacon', anonymousId: 'a', messageId: 'blocked-2'}));
        await new Promise(r => setTimeout(r, 500));
    """
    errors = _run_page(site, "<!doctype html><title>Other site</title>", script, "blocked")
    assert any("CORS policy" in e for e in errors), errors
    time.sleep(2)
    assert service.query("SELECT count() AS n FROM evactors.events")[0]["n"] == 0
    assert "origin_not_allowed" in service.log()  # the beacon (no preflight) was refused by the service
