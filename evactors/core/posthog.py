"""PostHog's capture API, as pure functions: a request in, Segment messages out.

Why: sites running posthog-js or posthog-python can point their ``api_host`` here and
keep their code. Each PostHog event becomes the Segment message it means and goes through
``segment.accept`` — the same validation, ids, clock correction and pipeline as every
other protocol. What the SDKs really send (read from posthog-js 1.449 and posthog-python
7.91, see docs/api.md):

* paths ``/e/``, ``/i/v0/e/``, ``/batch/``, ``/capture/`` (with or without the trailing
  slash; ``/track`` is OpenPanel's);
* bodies: JSON ``{"api_key", "batch": [events], "sent_at"}``, a JSON array of events, or
  one event; gzip by ``Content-Encoding``, by ``?compression=gzip-js`` or by its magic
  bytes alone (posthog-js sends raw gzip as ``text/plain``); the form ``data=<base64 JSON>``
  (``compression=base64``, older SDKs and sendBeacon);
* the project token as ``api_key``/``token`` (top level, per event, or in properties).

The start-up calls (``/flags/``, ``/decide/``, ``/array/<token>/config``) get a valid,
empty configuration: no flags, no recordings, no surveys, nothing else to load.
"""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import msgspec

from evactors.core.model import Message
from evactors.core.segment import DECODE_ERRORS, Parsed, Peer, Rejected, RequestError, _malformed, accept, decompress

CAPTURE_PATHS = frozenset({"/e", "/i/v0/e", "/batch", "/capture"})
FLAGS_PATHS = frozenset({"/flags", "/decide"})

EMPTY_FLAGS: dict[str, Any] = {
    "flags": {}, "featureFlags": {}, "featureFlagPayloads": {}, "errorsWhileComputingFlags": False,
    "quotaLimited": [], "requestId": "", "sessionRecording": False, "supportedCompression": ["gzip-js"],
    "autocapture_opt_out": True, "capturePerformance": False, "surveys": False, "heatmaps": False,
    "siteApps": [], "toolbarParams": {}, "elementsChainAsString": True, "config": {"enable_collect_everything": False},
}
EMPTY_REMOTE_CONFIG: dict[str, Any] = {
    "token": "", "supportedCompression": ["gzip-js"], "hasFeatureFlags": False, "captureDeadClicks": False,
    "capturePerformance": False, "autocapture_opt_out": True, "autocaptureExceptions": False,
    "analytics": {}, "elementsChainAsString": True, "sessionRecording": False, "heatmaps": False,
    "surveys": False, "defaultIdentifiedOnly": True, "siteApps": [],
}

_Top = dict[str, msgspec.Raw] | list[msgspec.Raw]
_decode_top = msgspec.json.Decoder(_Top).decode
_decode_any = msgspec.json.Decoder().decode
_GZIP_MAGIC = b"\x1f\x8b"
# properties that become fields of the message (the rest of PostHog's "$" properties are its
# SDK's own bookkeeping: evactors derives browser, OS, device, geo and sessions itself)
_MAPPED = {"token", "api_key", "distinct_id", "alias", "$set", "$set_once", "$unset"}


def route(path: str) -> str | None:
    """``capture``, ``flags`` or ``config`` for PostHog's paths, else None."""
    p = path.rstrip("/") or "/"
    if p in CAPTURE_PATHS:
        return "posthog"
    if p in FLAGS_PATHS:
        return "posthog-flags"
    if p.startswith("/array/") and (p.endswith("/config") or p.endswith("/config.js")):
        return "posthog-config"
    return None


def _inflate(body: bytes, limit: int) -> bytes:
    return decompress(body, "gzip", limit)


def body_json(body: bytes, query: dict[str, str], content_type: str, limit: int) -> bytes:
    """The request's JSON, whatever wrapping the SDK used (already Content-Encoding-decoded)."""
    compression = query.get("compression", "").lower()
    if body[:2] == _GZIP_MAGIC or compression in ("gzip-js", "gzip"):
        body = _inflate(body, limit)
    if body[:5] == b"data=" or "x-www-form-urlencoded" in content_type:
        form = parse_qs(body.decode("latin-1"), keep_blank_values=True)
        if "data" not in form:
            raise RequestError(400, "invalid_form", "a form body needs a data= field")
        data = form["data"][0].strip()
        if data[:1] in ("{", "["):
            return data.encode()
        try:
            body = base64.b64decode(data + "=" * (-len(data) % 4), validate=False)
        except (binascii.Error, ValueError) as e:
            raise RequestError(400, "bad_base64", f"data= is neither JSON nor base64: {e}") from None
        if body[:2] == _GZIP_MAGIC:
            body = _inflate(body, limit)
    elif compression == "base64":
        try:
            body = base64.b64decode(body, validate=False)
        except (binascii.Error, ValueError) as e:
            raise RequestError(400, "bad_base64", f"body is not base64: {e}") from None
    elif compression == "lz64":
        raise RequestError(415, "unsupported_encoding", "compression=lz64 is not supported "
                           "(posthog-js: leave compression at its default, gzip-js)")
    return body


class Request(msgspec.Struct):
    """A capture request, events still raw: the token can be looked up before decoding them."""

    key: str | None
    events: list[msgspec.Raw]
    sent_at: datetime | None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else "" if value is None else str(value)


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return msgspec.convert(value, datetime)
    except msgspec.ValidationError:
        return None


def read(body: bytes) -> Request:
    """Split the JSON into its token, events and sent_at."""
    try:
        top = _decode_top(body)
    except msgspec.ValidationError:
        raise RequestError(400, "invalid_batch", "expected a JSON object or array of events") from None
    except DECODE_ERRORS as e:
        raise RequestError(400, "malformed_json", _malformed(e)) from None
    if isinstance(top, list):
        return Request(None, top, None)
    fields: dict[str, Any] = {}
    for name in ("api_key", "token", "sent_at"):
        if name in top:
            try:
                fields[name] = _decode_any(top[name])
            except DECODE_ERRORS:
                fields[name] = None
    key = _text(fields.get("api_key") or fields.get("token")) or None
    if "batch" in top:
        try:
            events = msgspec.json.decode(top["batch"], type=list[msgspec.Raw])
        except msgspec.ValidationError:
            raise RequestError(400, "invalid_batch", "batch: expected an array of events",
                               field="batch") from None
        if not events:
            raise RequestError(400, "invalid_batch", "batch: must hold at least one event", field="batch")
        return Request(key, events, _time(fields.get("sent_at")))
    if "event" in top:  # one event, the request's own
        return Request(key, [msgspec.json.encode(top)], _time(fields.get("sent_at")))  # type: ignore[list-item]
    raise RequestError(400, "invalid_batch", "expected {\"batch\": [...]}, an array of events or one event")


def event_key(event: dict[str, Any]) -> str | None:
    props = event.get("properties")
    props = props if isinstance(props, dict) else {}
    return _text(event.get("api_key") or event.get("token") or props.get("token")) or None


def _search(url: str) -> str | None:
    try:
        query = urlsplit(url).query if url else ""
    except ValueError:  # e.g. a broken IPv6 host: the URL is kept as sent, without a search
        return None
    return "?" + query if query else None


def to_message(event: dict[str, Any], received_ms: int) -> tuple[str, dict[str, Any]] | tuple[None, str]:
    """(Segment type, message fields), or (None, the problem)."""
    name = event.get("event")
    if not isinstance(name, str) or not name:
        return None, "event: a non-empty event name is required"
    props = event.get("properties")
    if props is None:
        props = {}
    if not isinstance(props, dict):
        return None, "properties: expected an object"
    distinct = _text(event.get("distinct_id") if event.get("distinct_id") is not None else props.get("distinct_id"))
    device = _text(props.get("$device_id"))
    anonymous, user = "", distinct
    if device:
        anonymous, user = device, (distinct if distinct != device else "")
    elif props.get("$is_identified") is False or props.get("$process_person_profile") is False:
        anonymous, user = distinct, ""
    msg: dict[str, Any] = {"messageId": event.get("uuid") or None,
                           "anonymousId": anonymous or None, "userId": user or None}
    kind = "track"
    if name == "$pageview":
        kind = "page"
    elif name == "$screen":
        kind, msg["name"] = "screen", _text(props.get("$screen_name")) or None
    elif name in ("$identify", "$set"):
        kind = "identify"
        msg["userId"] = distinct or None
        msg["anonymousId"] = device or _text(props.get("$anon_distinct_id")) or None
        set_once, set_ = (event.get(k) or props.get(k) or {} for k in ("$set_once", "$set"))
        msg["traits"] = {**(set_once if isinstance(set_once, dict) else {}),
                         **(set_ if isinstance(set_, dict) else {})}
    elif name == "$create_alias":
        kind = "alias"
        msg["userId"], msg["previousId"] = _text(props.get("alias")) or None, distinct or None
    elif name == "$groupidentify":
        kind = "group"
        msg["groupId"] = _text(props.get("$group_key")) or None
        group_set = props.get("$group_set")
        msg["traits"] = {**(group_set if isinstance(group_set, dict) else {}),
                         "group_type": _text(props.get("$group_type"))}
    else:
        msg["event"] = name
    msg["type"] = kind
    url = _text(props.get("$current_url"))
    referrer = _text(props.get("$referrer"))
    page = {"url": url or None, "path": _text(props.get("$pathname")) or None,
            "referrer": referrer if referrer and referrer != "$direct" else None,
            "title": _text(props.get("title") or props.get("$title")) or None,
            "search": _search(url)}
    library = {"name": _text(props.get("$lib")) or None, "version": _text(props.get("$lib_version")) or None}
    msg["context"] = {
        "ip": _text(props.get("$ip")) or None,
        "userAgent": _text(props.get("$raw_user_agent")) or None,
        "page": {k: v for k, v in page.items() if v} or None,
        "library": {k: v for k, v in library.items() if v} or None,
        "locale": _text(props.get("$browser_language")) or None,
        "timezone": _text(props.get("$timezone")) or None,
    }
    if kind in ("track", "page", "screen"):
        msg["properties"] = {k: v for k, v in props.items() if not k.startswith("$") and k not in _MAPPED}
    timestamp = event.get("timestamp")
    if isinstance(timestamp, str) and timestamp:
        msg["timestamp"] = timestamp
    elif isinstance(event.get("offset"), int):  # older SDKs: ms before sending
        msg["timestamp"] = datetime.fromtimestamp((received_ms - event["offset"]) / 1000, UTC).isoformat()
    return kind, msg


def parse(request: Request, project_id: str, peer: Peer, max_event_bytes: int) -> Parsed:
    """Each event validated alone; an event naming another token than the request's is refused."""
    out = Parsed()
    for index, raw in enumerate(request.events):
        raw_bytes = bytes(raw)
        if len(raw_bytes) > max_event_bytes:
            out.rejected.append(Rejected(index, None, "$", f"event is {len(raw_bytes)} bytes; the limit "
                                         f"is {max_event_bytes} bytes (32 KB) per event"))
            continue
        try:
            event = _decode_any(raw_bytes)
        except DECODE_ERRORS as e:
            out.rejected.append(Rejected(index, None, "$", _malformed(e)))
            continue
        if not isinstance(event, dict):
            out.rejected.append(Rejected(index, None, "$", "expected an event object"))
            continue
        uuid = _text(event.get("uuid")) or None
        own = event_key(event)
        if own is not None and request.key is not None and own != request.key:
            out.rejected.append(Rejected(index, uuid, "properties.token",
                                         "the event's token differs from the request's api_key"))
            continue
        kind, fields = to_message(event, peer.received_ms)
        if kind is None:
            where, _, why = str(fields).partition(": ")
            out.rejected.append(Rejected(index, uuid, where, why))
            continue
        try:
            msg = msgspec.convert(fields, Message)
        except msgspec.ValidationError as e:
            out.rejected.append(Rejected(index, uuid, "$", str(e)))
            continue
        accept(msg, raw_bytes, index, kind, project_id, peer, request.sent_at, out)
    return out
