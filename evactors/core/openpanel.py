"""OpenPanel's event API (``POST /track``), as Segment messages.

Why: OpenPanel sites (``@openpanel/web``, ``@openpanel/sdk`` and the other server SDKs) can
set ``apiUrl`` to evactors and keep their code. A request is one ``{type, payload}``
command; it becomes one Segment message (``assign_group``: one per group) and goes through
``segment.accept`` like every other protocol.

OpenPanel's SDKs send no event id, no device id and (unless queued) no timestamp. So here:

* the device (anonymousId) is derived as OpenPanel's server does: a hash of the project,
  the client's address and user agent, with a salt that changes daily (no cookie, no
  lifelong fingerprint);
* the messageId: the SDK retries a failed request up to 3 times with the identical body
  (0.5, 1, 2 s apart). A body identical to one seen from the same client, address and user
  agent within ``[openpanel] dedup_window_seconds`` gets the first one's id, so the
  pipeline's dedup drops the retry. A sliding window, not a fixed one: a retry that
  straddles a window boundary is still caught. The table lives in memory (bounded), so a
  retry across a restart of the service is the one case it can double. The cost: two
  identical events from one device within the window count once.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import msgspec

from evactors.core.config import OpenPanelConfig
from evactors.core.model import Message
from evactors.core.segment import DECODE_ERRORS, Parsed, Peer, Rejected, RequestError, _malformed, accept

TYPES = ("track", "identify", "alias", "increment", "decrement", "group", "assign_group")
_NS = uuid.UUID("6f1c3a52-0a53-4d3e-9a31-0c3f4b7e2d15")
MAX_RECENT = 100_000  # bodies remembered for the retry window (~210 B each: 21 MB at most)
_decode = msgspec.json.Decoder().decode


class Command(msgspec.Struct):
    type: str
    payload: dict[str, Any] = {}


def _text(value: Any) -> str:
    return value if isinstance(value, str) else "" if value is None else str(value)


class Clients:
    """Client id → project, and the secrets of server clients. Replaceable at run time."""

    def __init__(self, config: OpenPanelConfig) -> None:
        self.replace(config)
        self.recent: OrderedDict[bytes, int] = OrderedDict()  # body digest → first seen (ms)

    def replace(self, config: OpenPanelConfig) -> None:
        self.window_ms = int(config.dedup_window_seconds * 1000)
        self._projects = {hashlib.sha256(c.encode()).digest(): p for c, p in config.clients.items()}
        self._secrets = {hashlib.sha256(c.encode()).digest(): s for c, s in config.secrets.items()}

    def project(self, client_id: str, secret: str) -> str:
        """The client's project; a 401 naming what is wrong otherwise."""
        if not client_id:
            raise RequestError(401, "unauthorized", "missing openpanel-client-id header")
        digest = hashlib.sha256(client_id.encode()).digest()
        project = self._projects.get(digest)
        if project is None:
            raise RequestError(401, "unauthorized", "unknown openpanel-client-id")
        expected = self._secrets.get(digest)
        if expected is not None and not hmac.compare_digest(secret.encode(), expected.encode()):
            raise RequestError(401, "unauthorized", "missing openpanel-client-secret" if not secret
                               else "wrong openpanel-client-secret")
        return project

    def message_id(self, project: str, client_id: str, ip: str, user_agent: str, body: bytes,
                   now_ms: int) -> str:
        """The same id for a retry of the same body within the window (see the docstring)."""
        key = hashlib.sha256(b"\0".join(x.encode() for x in (project, client_id, ip, user_agent))
                             + b"\0" + body).digest()
        recent = self.recent
        while recent:  # the oldest first: drop what is out of the window
            if now_ms - next(iter(recent.values())) <= self.window_ms and len(recent) < MAX_RECENT:
                break
            recent.popitem(last=False)
        first = recent.get(key)
        if first is None:
            first = recent[key] = now_ms
        return str(uuid.uuid5(_NS, f"{key.hex()}:{first}"))


def device_id(project: str, ip: str, user_agent: str, now_ms: int) -> str:
    """OpenPanel's cookieless device: address + user agent, salted per project and UTC day."""
    day = datetime.fromtimestamp(now_ms / 1000, UTC).strftime("%Y-%m-%d")
    return hashlib.sha256(f"{project}\0{day}\0{ip}\0{user_agent}".encode()).hexdigest()[:32]


def read(body: bytes) -> Command:
    try:
        command = msgspec.json.decode(body, type=Command)
    except msgspec.ValidationError as e:
        raise RequestError(400, "invalid_event", f"expected {{type, payload}}: {e}") from None
    except DECODE_ERRORS as e:
        raise RequestError(400, "malformed_json", _malformed(e)) from None
    if command.type not in TYPES and command.type != "replay":
        raise RequestError(400, "invalid_event", f"type must be one of {', '.join(TYPES)}; got "
                           f"{command.type!r}", field="type")
    return command


def _page(props: dict[str, Any]) -> dict[str, Any] | None:
    href = _text(props.get("__path"))
    page: dict[str, Any] = {}
    if href:
        try:
            parts = urlsplit(href)
        except ValueError:  # e.g. a broken IPv6 host: kept as the path, as sent
            parts = urlsplit("")
        if parts.scheme and parts.netloc:
            page["url"], page["path"] = href, parts.path or "/"
            if parts.query:
                page["search"] = "?" + parts.query
        else:
            page["path"] = href
    for name, field in (("__referrer", "referrer"), ("__title", "title")):
        if _text(props.get(name)):
            page[field] = _text(props[name])
    return page or None


def messages(command: Command, device: str) -> list[tuple[str, dict[str, Any]]]:
    """(Segment type, message fields) for one OpenPanel command."""
    p = command.payload
    props = p.get("properties")
    props = props if isinstance(props, dict) else {}
    profile = _text(p.get("profileId")) or None
    base: dict[str, Any] = {"anonymousId": _text(props.get("__deviceId")) or device, "userId": profile,
                            "context": {"page": _page(props), "ip": _text(props.get("__ip")) or None,
                                        "userAgent": _text(props.get("__user_agent")) or None}}
    if _text(props.get("__timestamp")):
        base["timestamp"] = props["__timestamp"]
    own = {k: v for k, v in props.items() if not k.startswith("__")}
    kind = command.type
    if kind == "track":
        name = _text(p.get("name"))
        if name == "screen_view":
            return [("page", {**base, "properties": own})]
        return [("track", {**base, "event": name, "properties": own})]
    if kind == "identify":
        traits = {k: p[k] for k in ("firstName", "lastName", "email", "avatar") if p.get(k) is not None}
        return [("identify", {**base, "traits": {**own, **traits}})]
    if kind == "alias":
        return [("alias", {**base, "previousId": _text(p.get("alias")) or None})]
    if kind in ("increment", "decrement"):  # a profile counter: kept as an event, see docs/api.md
        return [("track", {**base, "event": kind,
                           "properties": {"property": p.get("property"), "value": p.get("value", 1)}})]
    if kind == "group":
        traits = {k: p[k] for k in ("type", "name") if p.get(k) is not None}
        extra = p.get("properties")
        return [("group", {**base, "groupId": _text(p.get("id")) or None,
                           "traits": {**(extra if isinstance(extra, dict) else {}), **traits}})]
    if kind == "assign_group":
        ids = p.get("groupIds")
        return [("group", {**base, "groupId": _text(g) or None})
                for g in (ids if isinstance(ids, list) else [None])]
    return []  # replay: session recordings are not kept


def parse(command: Command, body: bytes, message_id: str, project_id: str, peer: Peer,
          max_event_bytes: int) -> Parsed:
    out = Parsed()
    if len(body) > max_event_bytes:
        raise RequestError(400, "event_too_large", f"event is {len(body)} bytes; the limit is "
                           f"{max_event_bytes} bytes (32 KB) per event")
    props = command.payload.get("properties")
    props = props if isinstance(props, dict) else {}
    ip, agent = _text(props.get("__ip")) or peer.ip, _text(props.get("__user_agent")) or peer.user_agent
    device = device_id(project_id, ip, agent, peer.received_ms)
    for index, (kind, fields) in enumerate(messages(command, device)):
        fields["messageId"] = message_id if index == 0 else f"{message_id}:{index}"
        try:
            msg = msgspec.convert(fields, Message)
        except msgspec.ValidationError as e:
            out.rejected.append(Rejected(index, message_id, "payload", str(e)))
            continue
        accept(msg, body, index, kind, project_id, peer, None, out)
    return out
