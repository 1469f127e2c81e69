"""Types as the schema: Segment's wire format in, the rows ClickHouse stores out.

``Message`` mirrors Segment's HTTP Tracking API (camelCase as on the wire). ``Incoming``
is what ingest keeps durably in Redis before acknowledging: a validated, clock-corrected
event with its project. ``EventRow``/``SessionRow``/``ProfileRow`` are the ClickHouse
rows; their field order is the column order (see ``schema.py``), and they travel through
Redis as msgpack arrays.
"""

from __future__ import annotations

from datetime import datetime
from hashlib import blake2b
from typing import Any

import msgspec


class PageContext(msgspec.Struct, omit_defaults=True, gc=False):
    path: str | None = None
    url: str | None = None
    referrer: str | None = None
    title: str | None = None
    search: str | None = None


class Campaign(msgspec.Struct, omit_defaults=True, gc=False):
    source: str | None = None
    medium: str | None = None
    name: str | None = None
    term: str | None = None
    content: str | None = None


class Library(msgspec.Struct, omit_defaults=True, gc=False):
    name: str | None = None
    version: str | None = None


class Context(msgspec.Struct, omit_defaults=True, gc=False):
    ip: str | None = None
    userAgent: str | None = None
    page: PageContext | None = None
    campaign: Campaign | None = None
    library: Library | None = None
    locale: str | None = None
    timezone: str | None = None
    # Traits of the user on any call (Segment's spec; RudderStack's identify puts them only
    # here). Folded into the message's traits at the edge, never stored in the context.
    traits: dict[str, Any] | None = None


Id = str | int  # SDKs send numeric user ids; we keep them as text


class Message(msgspec.Struct, omit_defaults=True, gc=False):
    """One Segment call. Unknown fields (``integrations``, …) are ignored as Segment does."""

    type: str | None = None
    messageId: Id | None = None
    anonymousId: Id | None = None
    userId: Id | None = None
    event: str | None = None
    name: str | None = None
    category: str | None = None
    properties: dict[str, Any] | None = None
    traits: dict[str, Any] | None = None
    context: Context | None = None
    timestamp: datetime | None = None
    sentAt: datetime | None = None
    originalTimestamp: datetime | None = None
    previousId: Id | None = None
    groupId: Id | None = None
    writeKey: str | None = None
    channel: str | None = None  # RudderStack / Segment: "web", "server", "mobile"…


class BatchEnvelope(msgspec.Struct):
    """``/v1/batch`` body; messages stay raw so each is validated (and rejected) alone."""

    batch: list[msgspec.Raw]
    sentAt: datetime | None = None
    writeKey: str | None = None
    context: dict[str, Any] | None = None


class KeyOnly(msgspec.Struct):
    writeKey: str | None = None


class Incoming(msgspec.Struct, array_like=True, omit_defaults=False, gc=False):
    """A validated event as ingest stores it durably (before any processing)."""

    project_id: str
    type: str  # track | page | screen | identify | group | alias
    message_id: str
    anonymous_id: str
    user_id: str
    name: str  # track: event; page/screen: page name; else ""
    properties: dict[str, Any]
    traits: dict[str, Any]
    context: Context
    timestamp_ms: int  # clock-skew corrected
    received_ms: int
    ip: str
    user_agent: str
    previous_id: str
    group_id: str


class EventRow(msgspec.Struct, array_like=True, gc=False):
    """A row of ``events``. Field order = column order of the table."""

    id: str
    project_id: str
    name: str
    device_id: str
    profile_id: str
    session_id: str
    created_at: int  # ms since epoch, UTC
    received_at: int
    path: str
    origin: str
    referrer: str
    referrer_name: str
    duration: int  # ms (screen_view: time to the next one)
    properties: dict[str, str]
    country: str
    country_name: str
    region: str
    region_name: str
    city: str
    postal_code: str
    latitude: float | None
    longitude: float | None
    timezone: str
    browser: str
    browser_version: str
    os: str
    os_version: str
    device: str
    brand: str
    model: str
    utm_source: str
    utm_medium: str
    utm_campaign: str
    utm_term: str
    utm_content: str
    is_new_session: int
    session_number: int
    session_start: int
    message_id: str
    type: str
    is_bot: int
    bot_reason: str
    sdk_name: str
    sdk_version: str
    ip: str  # empty unless pii = keep/truncate
    user_agent: str  # empty unless pii = keep


class SessionRow(msgspec.Struct, array_like=True, gc=False):
    """A row of ``sessions`` (written when a session closes)."""

    session_id: str
    project_id: str
    device_id: str
    profile_id: str
    session_start: int
    session_end: int
    duration_seconds: int
    page_count: int
    event_count: int
    session_number: int
    entry_page: str
    exit_page: str
    referrer: str
    utm_source: str
    utm_medium: str
    utm_campaign: str
    utm_term: str
    utm_content: str
    country: str
    city: str
    browser: str
    os: str
    device: str
    reason: str
    version: int  # ms; the latest version of a session wins


class ProfileRow(msgspec.Struct, array_like=True, gc=False):
    """A row of ``profiles`` (from identify; the latest version per profile wins)."""

    project_id: str
    profile_id: str
    anonymous_id: str
    traits: dict[str, str]
    created_at: int
    updated_at: int


class BotRow(msgspec.Struct, array_like=True, gc=False):
    """A row of ``events_bots``: a bot event kept aside, so users can see what was filtered."""

    id: str
    project_id: str
    name: str
    device_id: str
    path: str
    reason: str
    user_agent: str
    created_at: int
    message_id: str


def event_id(project_id: str, message_id: str) -> str:
    """Deterministic row id: the same message always becomes the same row id. A 128-bit
    BLAKE2b of (project, messageId) in UUID form: 5× cheaper than ``uuid5``."""
    h = blake2b(f"{project_id}\x00{message_id}".encode(), digest_size=16).hexdigest()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def session_id(project_id: str, device_id: str, start_ms: int) -> str:
    """Stable, derived session id: same (project, device, start) → same id (BLAKE2b, as
    ``event_id``; sessions opened before 0.2 keep the UUIDv5 they were given)."""
    return event_id(project_id, f"s\x00{device_id}\x00{start_ms}")


def flatten(value: dict[str, Any], prefix: str = "", out: dict[str, str] | None = None,
            depth: int = 0) -> dict[str, str]:
    """Nested JSON → ``{"a.b": "1"}``: queryable as ``properties['a.b']`` in a Map.
    Scalars are written inline (one pass, no recursion for flat properties)."""
    if out is None:
        out = {}
    for key, item in value.items():
        t = type(item)
        if t is str:
            out[prefix + key if prefix else key] = item
        elif t is int or t is float:
            out[prefix + key if prefix else key] = str(item)
        elif t is bool:
            out[prefix + key if prefix else key] = "true" if item else "false"
        elif item is None:
            continue
        elif t is dict and depth < 8:
            flatten(item, f"{prefix}{key}.", out, depth + 1)
        elif t is list and depth < 8:
            flatten({str(i): v for i, v in enumerate(item)}, f"{prefix}{key}.", out, depth + 1)
        else:
            out[prefix + key if prefix else key] = msgspec.json.encode(item).decode()
    return out
