"""Segment wire format: parsing, validation and clock-skew correction (pure functions)."""

from __future__ import annotations

import gzip
import json

import pytest

from evactors.core.model import Message
from evactors.core.segment import Peer, RequestError, corrected_timestamp, decompress, parse

PEER = Peer("203.0.113.9", "Mozilla/5.0 header", 1_700_000_100_000)


def one(body: dict, kind: str = "track") -> object:
    return parse(kind, json.dumps(body).encode(), "p", PEER, 32768)


def test_clock_skew_uses_received_minus_send_delay() -> None:
    msg = Message(timestamp=None, originalTimestamp=None)
    assert corrected_timestamp(msg, None, 5_000) == 5_000
    parsed = parse("batch", json.dumps({
        "sentAt": "2030-01-01T00:00:10Z",
        "batch": [{"type": "track", "event": "E", "anonymousId": "a",
                   "timestamp": "2030-01-01T00:00:04Z"},
                  {"type": "track", "event": "E", "anonymousId": "a",
                   "originalTimestamp": "2030-01-01T00:00:09.500Z",
                   "timestamp": "2000-01-01T00:00:00Z"}],
    }).encode(), "p", PEER, 32768)
    t = [e.timestamp_ms for e in parsed.events]
    assert t[0] == PEER.received_ms - 6_000
    assert t[1] == PEER.received_ms - 500  # originalTimestamp wins over timestamp
    no_sent_at = one({"event": "E", "anonymousId": "a", "timestamp": "2020-05-05T00:00:00"})
    assert no_sent_at.events[0].timestamp_ms == 1_588_636_800_000  # type: ignore[attr-defined]


def test_ids_ip_and_user_agent() -> None:
    parsed = one({"userId": 42, "event": "E", "context": {"ip": "198.51.100.1"}})
    e = parsed.events[0]  # type: ignore[attr-defined]
    assert e.user_id == "42" and e.anonymous_id == ""
    assert e.message_id  # generated before it is stored
    assert e.ip == "198.51.100.1" and e.user_agent == "Mozilla/5.0 header"
    assert e.context.ip is None  # raw IP kept once, not twice


def test_type_rules() -> None:
    with pytest.raises(RequestError) as err:
        one({"userId": "u"}, "alias")
    assert err.value.body["field"] == "previousId"
    with pytest.raises(RequestError) as err:
        one({"anonymousId": "a"}, "group")
    assert err.value.body["field"] == "groupId"
    assert one({"anonymousId": "a", "traits": {"x": 1}}, "identify").events  # type: ignore[attr-defined]
    with pytest.raises(RequestError) as err:
        one({"anonymousId": "a", "event": "E", "properties": [1, 2]})
    assert err.value.body["field"] == "properties"


def test_decompress_limits() -> None:
    assert decompress(gzip.compress(b"x" * 100), "gzip", 1000) == b"x" * 100
    with pytest.raises(RequestError) as err:
        decompress(gzip.compress(b"x" * 5000), "gzip", 1000)
    assert err.value.status == 413
    with pytest.raises(RequestError) as err:
        decompress(gzip.compress(b"x" * 100)[:-12], "gzip", 1000)
    assert err.value.status == 400
