"""The server SDKs sites already run, unchanged: posthog-python and rudder-sdk-python from
PyPI, OpenPanel's @openpanel/sdk from npm run by node with its client secret. Each test
checks the stored rows: every message id once, the user agent parsed, a session, the page
path, traits in ``profiles``, nothing in another project."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from conftest import CHROME, GB_IP, Service
from sdkweb import NODE, NODE_MODULES, needs_node

KEYS = {"key-a": "project-a", "key-b": "project-b"}
COLUMNS = ("message_id, name, type, device_id, profile_id, session_id, path, browser, os, country, "
           "properties")


@pytest.fixture
def two_projects(make_service: Any) -> Service:
    # a session's last screen view is held until the session ends: 5 s idle ends it here
    return make_service(write_keys=KEYS, env={
        "EVACTORS_PIPELINE_LATENESS_SECONDS": "0", "EVACTORS_PIPELINE_SESSION_TIMEOUT_SECONDS": "5",
        "EVACTORS_OPENPANEL_CLIENTS": '{ "op-server" = "project-a", "op-b" = "project-b" }',
        "EVACTORS_OPENPANEL_SECRETS": '{ "op-server" = "sec-1", "op-b" = "sec-b" }'}).start()


def _rows(service: Service, expected: int) -> list[dict[str, Any]]:
    return service.wait_rows(f"SELECT {COLUMNS} FROM evactors.events WHERE project_id = 'project-a' "
                             "AND message_id != '' ORDER BY created_at, name", expected, timeout=60)


def _assert_common(service: Service, rows: list[dict[str, Any]], path: str) -> None:
    ids = [r["message_id"] for r in rows]
    assert len(ids) == len(set(ids)), "a message id stored twice"
    assert {r["browser"] for r in rows} == {"Chrome"} and {r["os"] for r in rows} == {"Windows"}
    assert {r["country"] for r in rows} == {"GB"}
    assert all(r["session_id"] for r in rows), "an event without a session"
    assert path in {r["path"] for r in rows}
    other = service.query("SELECT count() AS n FROM evactors.events WHERE project_id != 'project-a'")
    assert other[0]["n"] == 0, "events in another project"


def test_posthog_python_batches_are_mapped_and_stored_once(two_projects: Service) -> None:
    from posthog import Posthog

    service = two_projects
    client = Posthog("key-a", host=service.url, sync_mode=True, gzip=True, max_retries=0)
    web = {"$raw_user_agent": CHROME, "$ip": GB_IP, "$current_url": "https://shop.example/pricing?plan=pro",
           "$pathname": "/pricing", "$device_id": "dev-py"}
    ids = [
        client.capture("$pageview", distinct_id="dev-py", properties={**web, "$is_identified": False}),
        client.capture("Upgraded", distinct_id="py-user", properties={**web, "plan": "pro"}),
        client.set(distinct_id="py-user", properties={"email": "lin@example.com", "plan": "pro"}),
        client.alias(previous_id="py-user", distinct_id="py-user-2"),
        client.group_identify("company", "acme", {"name": "Acme"}, distinct_id="py-user"),
    ]
    client.flush()
    client.shutdown()
    assert all(ids), ids
    rows = _rows(service, 5)
    assert {r["message_id"] for r in rows} == set(ids)
    by_id = {r["message_id"]: r for r in rows}
    assert [by_id[i]["type"] for i in ids] == ["page", "track", "identify", "alias", "group"]
    web_rows = [by_id[i] for i in ids[:2]]  # the others carry no page or agent
    _assert_common(service, web_rows, "/pricing")
    assert by_id[ids[1]]["properties"]["plan"] == "pro"
    # py-user, or what the alias made of it if the alias was processed first
    assert by_id[ids[1]]["profile_id"] in ("py-user", "py-user-2")
    profiles = service.wait_rows("SELECT profile_id, traits FROM evactors.profiles "
                                 "WHERE project_id = 'project-a'", 1)
    assert any(p["traits"].get("email") == "lin@example.com" for p in profiles)
    # a token of another project names that project only; an unknown one nothing
    other = Posthog("key-c-unknown", host=service.url, sync_mode=True, max_retries=0)
    other.capture("Nope", distinct_id="x")
    other.shutdown()
    print(f"\nposthog-python: {len(ids)} events by POST /batch/ (gzip), {len(rows)} rows")


def test_rudder_sdk_python_identify_traits_in_context_reach_profiles(two_projects: Service) -> None:
    import rudderstack.analytics as rudder

    service = two_projects
    rudder.write_key, rudder.dataPlaneUrl, rudder.sync_mode = "key-a", service.url, True
    context = {"ip": GB_IP, "userAgent": CHROME, "page": {"path": "/account"}}
    rudder.identify("rs-py", {"email": "mary@example.com", "plan": "team"}, context=context)
    rudder.page("rs-py", name="Account", context=context)
    rudder.track("rs-py", "Saved", {"n": 1}, context=context)
    rudder.flush()
    rows = _rows(service, 3)
    _assert_common(service, rows, "/account")
    assert {r["properties"].get("channel") for r in rows if r["type"] == "track"} == {"server"}
    profiles = service.wait_rows("SELECT profile_id, traits FROM evactors.profiles "
                                 "WHERE project_id = 'project-a'", 1)
    assert profiles[0]["profile_id"] == "rs-py" and profiles[0]["traits"]["email"] == "mary@example.com"


NODE_SCRIPT = """
import {{ OpenPanel }} from '{sdk}';
const good = new OpenPanel({{clientId: 'op-server', clientSecret: 'sec-1', apiUrl: '{url}'}});
const props = {{__ip: '{ip}', __user_agent: '{ua}', __path: 'https://shop.example/checkout'}};
const out = [];
out.push(await good.track('screen_view', {{...props}}));
out.push(await good.track('checkout', {{...props, profileId: 'op-user', total: 30}}));
out.push(await good.identify({{profileId: 'op-user', email: 'kay@example.com',
                               properties: {{...props, tier: 'gold'}}}}));
out.push(await good.increment({{profileId: 'op-user', property: 'visits', value: 2}}));
const wrong = new OpenPanel({{clientId: 'op-server', clientSecret: 'nope', apiUrl: '{url}'}});
out.push(await wrong.track('must_not_be_stored', props));
const other = new OpenPanel({{clientId: 'op-b', clientSecret: 'sec-1', apiUrl: '{url}'}});
out.push(await other.track('must_not_be_stored_either', props));
console.log(JSON.stringify(out));
"""


@needs_node
def test_openpanel_node_sdk_with_its_secret_is_stored_and_a_wrong_secret_is_refused(
        two_projects: Service, tmp_path: Any) -> None:
    service = two_projects
    script = tmp_path / "op.mjs"
    script.write_text(NODE_SCRIPT.format(sdk=NODE_MODULES / "@openpanel/sdk/dist/index.js", url=service.url,
                                         ip=GB_IP, ua=CHROME))
    done = subprocess.run([str(NODE), str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    answers = json.loads(done.stdout.strip().splitlines()[-1])
    assert answers[0]["deviceId"] and answers[0]["sessionId"] == ""
    assert answers[-2:] == [None, None], "a 401 (wrong secret, another client's secret): the SDK gets null"
    rows = _rows(service, 4)
    assert [r["name"] for r in rows] == ["screen_view", "checkout", "identify", "increment"]
    _assert_common(service, rows[:3], "/checkout")  # increment: a profile call, no page or agent
    assert rows[3]["properties"] == {"property": "visits", "value": "2"} | {
        k: v for k, v in rows[3]["properties"].items() if k.startswith("__")}
    profiles = service.wait_rows("SELECT profile_id, traits FROM evactors.profiles "
                                 "WHERE project_id = 'project-a'", 1)
    assert profiles[0]["profile_id"] == "op-user" and profiles[0]["traits"]["tier"] == "gold"
    assert "must_not" not in json.dumps(service.query("SELECT name FROM evactors.events"))
