"""PostHog's and OpenPanel's adapters as pure functions: any JSON either refuses with a
RequestError (a 4xx) or yields events and per-event rejections; never another exception
(which would be a 5xx). And the CORS preflight's bounds."""

from __future__ import annotations

import base64
import gzip
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evactors.core import openpanel, posthog
from evactors.core.config import CorsConfig, OpenPanelConfig
from evactors.core.segment import Peer, RequestError
from evactors.service.http.cors import KNOWN_HEADERS, Cors, requested_headers

PEER = Peer("81.2.69.142", "Mozilla/5.0", 1_700_000_000_000)
_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                  st.floats(allow_nan=False), st.text(max_size=20))
_json = st.recursive(_leaf, lambda c: st.one_of(st.lists(c, max_size=4),
                                                st.dictionaries(st.text(max_size=8), c, max_size=5)),
                     max_leaves=20)
_keys = st.sampled_from(["event", "uuid", "distinct_id", "properties", "timestamp", "$set", "$set_once",
                         "offset", "api_key", "token", "batch", "sent_at", "payload"])
_props = st.sampled_from(["$device_id", "$current_url", "$pathname", "$referrer", "$ip", "$raw_user_agent",
                          "$screen_name", "alias", "$group_key", "$group_set", "$anon_distinct_id", "__path",
                          "__timestamp", "__ip", "profileId", "name", "groupIds", "id", "property", "value"])
_obj = st.dictionaries(_keys, st.one_of(
    _json, st.dictionaries(_props, _json, max_size=6),
    st.lists(st.dictionaries(_keys, st.one_of(_json, st.dictionaries(_props, _json, max_size=6)), max_size=4),
             max_size=3)), max_size=6)
_events = st.sampled_from(["$pageview", "$screen", "$identify", "$set", "$create_alias", "$groupidentify", "x", ""])
FUZZ = settings(max_examples=300, suppress_health_check=list(HealthCheck), deadline=None)


@FUZZ
@given(_obj, _events, st.sampled_from(["", "gzip-js", "base64"]))
def test_any_posthog_body_is_events_rejections_or_a_request_error(body: dict[str, Any], event: str,
                                                                  compression: str) -> None:
    for item in body.get("batch") or [] if isinstance(body.get("batch"), list) else []:
        if isinstance(item, dict):
            item["event"] = event
    raw = json.dumps(body).encode()
    raw = gzip.compress(raw) if compression == "gzip-js" else (
        b"data=" + base64.b64encode(raw) if compression == "base64" else raw)
    try:
        request = posthog.read(posthog.body_json(raw, {"compression": compression}, "", 500_000))
    except RequestError as e:
        assert 400 <= e.status < 500
        return
    request.key = request.key or "key"
    parsed = posthog.parse(request, "p", PEER, 32_768)
    assert len(parsed.events) + len(parsed.rejected) == len(request.events)


@FUZZ
@given(_obj, st.sampled_from([*openpanel.TYPES, "replay", "other"]))
def test_any_openpanel_command_is_events_rejections_or_a_request_error(body: dict[str, Any], kind: str) -> None:
    body["type"] = kind
    raw = json.dumps(body).encode()
    clients = openpanel.Clients(OpenPanelConfig(clients={"c": "p"}))
    try:
        command = openpanel.read(raw)
    except RequestError as e:
        assert 400 <= e.status < 500
        return
    openpanel.parse(command, raw, clients.message_id("p", "c", "ip", "ua", raw, 1), "p", PEER, 32_768)


def test_posthog_events_become_the_segment_types_they_mean() -> None:
    def kind(event: str, **props: Any) -> str | None:
        return posthog.to_message({"event": event, "distinct_id": "d", "properties": props}, 0)[0]

    assert [kind("$pageview"), kind("$screen"), kind("$identify"), kind("$set"), kind("$create_alias"),
            kind("$groupidentify"), kind("$autocapture"), kind("Bought")] == [
        "page", "screen", "identify", "identify", "alias", "group", "track", "track"]
    _, fields = posthog.to_message({"event": "$create_alias", "distinct_id": "old",
                                    "properties": {"alias": "new"}}, 0)
    assert isinstance(fields, dict) and (fields["userId"], fields["previousId"]) == ("new", "old")
    _, fields = posthog.to_message({"event": "x", "distinct_id": "u", "properties": {
        "$device_id": "dev", "$referrer": "$direct", "$current_url": "https://a.example/p?q=1"}}, 0)
    assert isinstance(fields, dict) and (fields["anonymousId"], fields["userId"]) == ("dev", "u")
    assert fields["context"]["page"] == {"url": "https://a.example/p?q=1", "search": "?q=1"}


def test_openpanel_retry_of_an_identical_body_gets_the_same_id_only_within_the_window() -> None:
    clients = openpanel.Clients(OpenPanelConfig(clients={"c": "p"}, dedup_window_seconds=30))
    first = clients.message_id("p", "c", "ip", "ua", b"{}", 1_000)
    assert clients.message_id("p", "c", "ip", "ua", b"{}", 4_500) == first  # the SDK's last retry
    assert clients.message_id("p", "c", "ip2", "ua", b"{}", 4_500) != first  # another visitor
    assert clients.message_id("p", "c", "ip", "ua", b"{}", 32_000) != first  # a new event


def test_the_preflight_echo_is_bounded_in_count_size_and_syntax() -> None:
    assert requested_headers("a, b-c") == b"a, b-c"
    assert requested_headers(", ".join(f"h{i}" for i in range(33))) == KNOWN_HEADERS
    assert requested_headers("x" * 1025) == KNOWN_HEADERS
    assert requested_headers("a b") == KNOWN_HEADERS
    cors = Cors(CorsConfig(origins={"p": ["https://a.example"]}), {"p"})
    assert dict(cors.headers("https://a.example"))[b"access-control-allow-origin"] == b"https://a.example"
    assert b"access-control-allow-origin" not in dict(cors.headers("https://b.example"))
    assert cors.allows("p", "") and not cors.allows("p", "https://b.example")
    assert Cors(CorsConfig(origins={"p": ["https://a.example"]}), {"p", "q"}).headers("x")[0] == (
        b"access-control-allow-origin", b"*")  # q allows any origin


def test_cors_and_openpanel_settings_are_checked_at_start() -> None:
    import pytest

    from evactors.core import config

    for env, key in [({"EVACTORS_CORS_ORIGINS": '{ p = ["shop.example/path"] }'}, "cors.origins.p"),
                     ({"EVACTORS_OPENPANEL_SECRETS": '{ c = "s" }'}, "openpanel.secrets.c"),
                     ({"EVACTORS_OPENPANEL_CLIENTS": '{ c = "bad project!" }'}, "openpanel.clients.c")]:
        with pytest.raises(config.ConfigError) as e:
            config.load(environ=env)
        assert e.value.key == key
    loaded = config.load(environ={"EVACTORS_OPENPANEL_CLIENTS": '{ c = "p" }',
                                  "EVACTORS_OPENPANEL_SECRETS": '{ c = "s" }'})
    assert loaded.openpanel.clients == {"c": "p"} and loaded.openpanel.secrets == {"c": "s"}


def test_a_broken_url_or_deep_nesting_is_kept_or_refused_never_an_exception() -> None:
    event = {"event": "x", "distinct_id": "d", "properties": {"$current_url": "http://[::1/x?y=1"}}
    request = posthog.read(json.dumps({"api_key": "k", "batch": [event]}).encode())
    assert len(posthog.parse(request, "p", PEER, 32_768).events) == 1
    raw = json.dumps({"type": "track", "payload": {"name": "x", "properties": {"__path": "http://[::1/x"}}}).encode()
    clients = openpanel.Clients(OpenPanelConfig(clients={"c": "p"}))
    parsed = openpanel.parse(openpanel.read(raw), raw, clients.message_id("p", "c", "", "", raw, 1), "p", PEER, 32_768)
    assert len(parsed.events) == 1
    deep = b"[" * 5000 + b"]" * 5000
    for body in (deep, b'{"api_key": "k", "batch": [' + deep + b"]}"):
        try:
            request = posthog.read(body)
            posthog.parse(request, "p", PEER, 1 << 20)
        except RequestError as e:
            assert e.status == 400
