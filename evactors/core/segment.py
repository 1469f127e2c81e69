"""Segment's HTTP Tracking API, as pure functions: a request body in, validated events out.

Choices where Segment's documentation leaves room (also in docs/api.md):

* A batch is validated message by message. Valid messages are kept even when others are
  rejected; the reply is then ``400`` with ``accepted`` (how many were stored) and
  ``rejected`` (index, messageId, field, error) so the sender knows exactly what was lost
  and why. Retrying such a batch is safe: the stored ones are deduplicated by messageId.
* A message with no ``messageId`` gets one here, before it is stored, derived from the
  project, the message's bytes and its place in the request: a retry of the same request
  gets the same ids and is deduplicated; a replay inside the service can never double it.
* Timestamps before 2000 are rejected; a timestamp in the future (beyond a minute after
  receipt, after skew correction) is set to the time of receipt.
* Clock skew: ``timestamp = receivedAt - (sentAt - (originalTimestamp or timestamp))``
  when the client sent ``sentAt``; else the client's timestamp; else ``receivedAt``.
"""

from __future__ import annotations

import gzip
import hashlib
import uuid
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec

from evactors.core.model import BatchEnvelope, Context, Incoming, KeyOnly, Message

TYPES = ("track", "page", "screen", "identify", "group", "alias")


# analytics.js (analytics-next) posts to Segment's short paths: /v1/t, /v1/p, … and, in its
# batching mode, /v1/b; its own telemetry goes to /v1/m ("metrics": accepted and dropped).
SHORT = {"t": "track", "p": "page", "i": "identify", "g": "group", "a": "alias", "b": "batch"}
ENDPOINTS = ({f"/v1/{t}": t for t in TYPES} | {"/v1/batch": "batch", "/v1/import": "batch"}
             | {f"/v1/{s}": t for s, t in SHORT.items()} | {"/v1/m": "metrics"}
             # RudderStack's sendBeacon transport (useBeacon): the write key in ?writeKey=
             | {"/beacon/v1/batch": "batch"})


_decode_message = msgspec.json.Decoder(Message).decode


_decode_batch = msgspec.json.Decoder(BatchEnvelope).decode


_decode_key = msgspec.json.Decoder(KeyOnly).decode


class RequestError(Exception):
    """The whole request is refused; ``body`` is the JSON error sent back."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"success": False, "error": code, "message": message, **extra}


@dataclass
class Rejected:
    index: int
    message_id: str | None
    field: str
    error: str

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "messageId": self.message_id, "field": self.field,
                "error": self.error}


@dataclass
class Parsed:
    events: list[Incoming] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    encoded: list[bytes] = field(default_factory=list)  # each event as msgpack, in order


@dataclass(frozen=True)
class Peer:
    """What the HTTP layer knows of the sender, used when the body does not say."""

    ip: str
    user_agent: str
    received_ms: int
    # RudderStack's headers: the fallback anonymousId (AnonymousId, base64) and sentAt (SentAt)
    anonymous_id: str = ""
    sent_at: datetime | None = None
    # the key the request was authenticated with: a message naming another is refused
    write_key: str = ""
    max_user_agent: int = 1024  # characters of a user agent kept (limits.max_user_agent_length)


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """Undo ``Content-Encoding: gzip`` (or deflate) without ever holding more than
    ``limit`` bytes: a gzip bomb is cut off, not inflated."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate", "x-gzip"):
        raise RequestError(415, "unsupported_encoding",
                           f"Content-Encoding {encoding!r} is not supported (use gzip)")
    wbits = 16 + zlib.MAX_WBITS if encoding != "deflate" else zlib.MAX_WBITS
    parts: list[bytes] = []
    size = 0
    rest = body
    try:
        while True:  # gzip allows several members one after another (RFC 1952 §2.2)
            inflater = zlib.decompressobj(wbits)
            out = inflater.decompress(rest, limit + 1 - size)
            size += len(out)
            if size > limit or inflater.unconsumed_tail:
                raise RequestError(413, "batch_too_large",
                                   f"decompressed body exceeds the batch limit of {limit} bytes")
            if not inflater.eof:
                raise RequestError(400, "bad_gzip", f"{encoding} body is truncated")
            parts.append(out)
            rest = inflater.unused_data
            if not rest:
                break
            if encoding == "deflate" or not rest.startswith(b"\x1f\x8b"):
                raise RequestError(400, "bad_gzip", f"{len(rest)} byte(s) of junk after the "
                                   f"{encoding} data")
    except (zlib.error, gzip.BadGzipFile) as e:
        raise RequestError(400, "bad_gzip", f"body is not valid {encoding}: {e}") from None
    return parts[0] if len(parts) == 1 else b"".join(parts)


# What decoding hostile JSON can raise besides a validation error: malformed JSON, bytes
# that are not UTF-8, nesting deeper than the decoder's recursion limit.
DECODE_ERRORS = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


def _malformed(e: BaseException) -> str:
    if isinstance(e, RecursionError):
        return "malformed JSON: nested too deeply"
    if isinstance(e, UnicodeDecodeError):
        return f"malformed JSON: not UTF-8 (byte {e.start})"
    if "utf-8" in str(e).lower():  # msgspec ≥ 0.20 reports bad bytes as a DecodeError
        return f"malformed JSON: not UTF-8 ({e})"
    return f"malformed JSON: {e}"


def body_write_key(body: bytes) -> str | None:
    try:
        return _decode_key(body).writeKey
    except (*DECODE_ERRORS, msgspec.ValidationError):
        return None


def _error_field(err: msgspec.ValidationError) -> tuple[str, str]:
    text = str(err)
    if " - at `$" in text:
        text, _, path = text.rpartition(" - at `$")
        return path.rstrip("`").lstrip(".") or "$", text
    return "$", text


def _ms(dt: datetime) -> int:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def _text(value: str | int | None) -> str:
    return value if type(value) is str else "" if value is None else str(value)


def corrected_timestamp(msg: Message, batch_sent_at: datetime | None, received_ms: int) -> int:
    client_time = msg.originalTimestamp or msg.timestamp
    sent_at = msg.sentAt or batch_sent_at
    if client_time is not None and sent_at is not None:
        return received_ms - (_ms(sent_at) - _ms(client_time))
    if client_time is not None:
        return _ms(client_time)
    return received_ms


def _validate(msg: Message, kind: str, anonymous_id: str, user_id: str,
              message_id: str) -> tuple[str, str] | None:
    """The rules Segment enforces per type: (field, error) of the first broken one."""
    if kind == "alias":
        if not user_id:
            return "userId", "alias requires userId"
        if not _text(msg.previousId):
            return "previousId", "alias requires previousId"
    elif not anonymous_id and not user_id:
        return "userId", "either userId or anonymousId is required"
    if kind == "track" and not msg.event:
        return "event", "track requires a non-empty event name"
    if kind == "group" and not _text(msg.groupId):
        return "groupId", "group requires groupId"
    if len(anonymous_id) > 512 or len(user_id) > 512 or len(message_id) > 512:
        name = next(n for n, v in (("anonymousId", anonymous_id), ("userId", user_id),
                                   ("messageId", message_id)) if len(v) > 512)
        return name, "longer than 512 characters"
    return None


_NO_CONTEXT = Context()


_ID_NS = uuid.UUID("3d0c8f4e-8a8f-4b5e-b0a5-5f8d2c1e9b77")


EARLIEST_MS = 946_684_800_000  # 2000-01-01


FUTURE_SLACK_MS = 60_000


_encode_event = msgspec.msgpack.Encoder().encode


def _unstorable_field(event: Incoming) -> str:
    """Which field holds the value that cannot be stored (only asked after a failure)."""
    for name in ("properties", "traits"):
        try:
            _encode_event(getattr(event, name))
        except (OverflowError, TypeError, ValueError):
            return name
    return "$"


def derived_message_id(project_id: str, raw: bytes, index: int) -> str:
    digest = hashlib.sha256(raw).hexdigest()
    return str(uuid.uuid5(_ID_NS, f"{project_id}\x00{index}\x00{digest}"))


def to_incoming(msg: Message, kind: str, project_id: str, peer: Peer,
                batch_sent_at: datetime | None, message_id: str, anonymous_id: str,
                user_id: str) -> Incoming:
    """``message_id``: the message's, or the one derived for it; the ids already as text."""
    context = msg.context or _NO_CONTEXT
    ip, user_agent = context.ip or peer.ip, (context.userAgent or peer.user_agent)[:peer.max_user_agent]
    traits = msg.traits or {}
    if kind == "identify" and context.traits:  # RudderStack: identify's traits live here
        traits = {**context.traits, **traits}
    if context.ip is not None or context.userAgent is not None or context.traits is not None:
        context = msgspec.structs.replace(context, ip=None, userAgent=None, traits=None)
    properties = msg.properties or {}
    if msg.channel and "channel" not in properties:
        properties = {**properties, "channel": msg.channel}
    return Incoming(
        project_id=project_id,
        type=kind,
        message_id=message_id,
        anonymous_id=anonymous_id,
        user_id=user_id,
        name=(msg.event if kind == "track" else msg.name) or "",
        properties=properties,
        traits=traits,
        context=context,
        timestamp_ms=min(corrected_timestamp(msg, batch_sent_at, peer.received_ms),
                         peer.received_ms + FUTURE_SLACK_MS),
        received_ms=peer.received_ms,
        ip=ip,
        user_agent=user_agent,
        previous_id=_text(msg.previousId),
        group_id=_text(msg.groupId),
    )


def _one(raw: bytes, index: int, kind: str | None, project_id: str, peer: Peer,
         max_event_bytes: int, batch_sent_at: datetime | None, out: Parsed) -> None:
    if len(raw) > max_event_bytes:
        out.rejected.append(Rejected(index, None, "$",
                                     f"event is {len(raw)} bytes; the limit is {max_event_bytes}"
                                     " bytes (32 KB) per event"))
        return
    try:
        msg = _decode_message(raw)
    except msgspec.ValidationError as e:
        where, why = _error_field(e)
        out.rejected.append(Rejected(index, None, where, why))
        return
    except DECODE_ERRORS as e:
        out.rejected.append(Rejected(index, None, "$", _malformed(e)))
        return
    accept(msg, raw, index, kind, project_id, peer, batch_sent_at, out)


def accept(msg: Message, raw: bytes, index: int, kind: str | None, project_id: str, peer: Peer,
           batch_sent_at: datetime | None, out: Parsed) -> None:
    """Validate one decoded message and append it to ``out`` (or its rejection). Every
    protocol ends here: PostHog's and OpenPanel's adapters build a ``Message`` and call
    this, so their events are Segment messages from here on. ``raw``: the bytes a missing
    messageId is derived from."""
    message_id = _text(msg.messageId)
    if msg.writeKey and peer.write_key and msg.writeKey != peer.write_key:
        out.rejected.append(Rejected(index, message_id or None, "writeKey",
                                     "the message's writeKey differs from the request's"))
        return
    anonymous_id = _text(msg.anonymousId) if msg.anonymousId or not peer.anonymous_id else peer.anonymous_id
    user_id = _text(msg.userId)
    message_kind = kind or msg.type
    if message_kind not in TYPES:
        out.rejected.append(Rejected(index, message_id or None, "type",
                                     f"type must be one of {', '.join(TYPES)}; got {msg.type!r}"))
        return
    problem = _validate(msg, message_kind, anonymous_id, user_id, message_id)
    if problem is not None:
        out.rejected.append(Rejected(index, message_id or None, *problem))
        return
    # the derived id (a SHA-256 of the bytes) only when the sender gave none: computed for
    # every message, it dominated parsing (docs/benchmarks.md)
    event = to_incoming(msg, message_kind, project_id, peer, batch_sent_at,
                        message_id or derived_message_id(project_id, raw, index), anonymous_id, user_id)
    if event.timestamp_ms < EARLIEST_MS:
        out.rejected.append(Rejected(index, event.message_id, "timestamp",
                                     "before 2000-01-01 (after clock-skew correction)"))
        return
    try:  # encoded once, here: what cannot be stored is refused, not failed on later
        encoded = _encode_event(event)
    except (OverflowError, TypeError, ValueError) as e:  # e.g. integers beyond 64 bits
        out.rejected.append(Rejected(index, event.message_id, _unstorable_field(event),
                                     f"a value cannot be stored: {e}"))
        return
    out.events.append(event)
    out.encoded.append(encoded)


def parse(kind: str, body: bytes, project_id: str, peer: Peer, max_event_bytes: int) -> Parsed:
    """Decode one request of endpoint ``kind`` (a type, or ``batch``)."""
    out = Parsed()
    if kind != "batch":
        if len(body) > max_event_bytes:
            raise RequestError(400, "event_too_large",
                               f"event is {len(body)} bytes; the limit is {max_event_bytes}"
                               " bytes (32 KB) per event")
        _one(body, 0, kind, project_id, peer, max_event_bytes, peer.sent_at, out)
        if out.rejected:
            bad = out.rejected[0]
            if bad.error.startswith("malformed JSON"):
                raise RequestError(400, "malformed_json", bad.error)
            raise RequestError(400, "invalid_event", f"{bad.field}: {bad.error}", field=bad.field)
        return out
    try:
        envelope = _decode_batch(body)
    except msgspec.ValidationError as e:
        where, why = _error_field(e)
        raise RequestError(400, "invalid_batch", f"{where}: {why}", field=where) from None
    except DECODE_ERRORS as e:
        raise RequestError(400, "malformed_json", _malformed(e)) from None
    if not envelope.batch:
        raise RequestError(400, "invalid_batch", "batch: must hold at least one message",
                           field="batch")
    for index, raw in enumerate(envelope.batch):
        _one(bytes(raw), index, None, project_id, peer, max_event_bytes, envelope.sentAt or peer.sent_at,
             out)
    return out
