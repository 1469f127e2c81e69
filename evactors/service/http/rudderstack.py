"""RudderStack's request headers (``AnonymousId`` in base64, ``SentAt``) and the write key
of its sendBeacon transport (``/beacon/v1/batch?writeKey=…``).

Why: RudderStack's JS SDK v3 sends the visitor's anonymous id and the send time as headers
as well as in the body; a message without them in the body takes them from here. A
malformed header is a 400 naming it, not a silent guess. A beacon cannot carry headers, so
its write key is in the query string."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from urllib.parse import parse_qsl

import msgspec

from evactors.core.segment import RequestError
from evactors.service.http.request import Scope, header


def fallback_headers(scope: Scope) -> tuple[str, datetime | None]:
    """The fallback anonymousId and sentAt of the request's messages."""
    anonymous, sent = header(scope, b"anonymousid").strip(), header(scope, b"sentat").strip()
    anonymous_id, sent_at = "", None
    if anonymous:
        try:
            anonymous_id = base64.b64decode(anonymous, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise RequestError(400, "invalid_header", "AnonymousId header: expected base64 of the "
                               "anonymous id", field="AnonymousId") from None
        if len(anonymous_id) > 512:
            raise RequestError(400, "invalid_header", "AnonymousId header: longer than 512 characters",
                               field="AnonymousId")
    if sent:
        try:
            sent_at = msgspec.convert(sent, datetime)
        except msgspec.ValidationError:
            raise RequestError(400, "invalid_header", "SentAt header: expected an ISO 8601 time",
                               field="SentAt") from None
    return anonymous_id, sent_at


def query_write_key(scope: Scope) -> str | None:
    """``?writeKey=`` of RudderStack's beacon posts (``/beacon/v1/batch``)."""
    query = scope.get("query_string", b"")
    if b"writeKey=" not in query:
        return None
    return dict(parse_qsl(query.decode("latin-1"))).get("writeKey") or None
