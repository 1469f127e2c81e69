"""What every route needs of an HTTP request: its headers, its body under a size limit,
the client's address behind trusted proxies, and the error that becomes a JSON reply.

ASGI's types are plain dicts; these helpers keep the routes free of that plumbing."""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec

from evactors.core.segment import RequestError

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]
# status, headers, body: what a route answers
Reply = tuple[int, Headers, bytes]

JSON: Headers = [(b"content-type", b"application/json")]
encode = msgspec.json.Encoder(enc_hook=str).encode


def header(scope: Scope, name: bytes) -> str:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return ""


def has_body(scope: Scope) -> bool:
    length = header(scope, b"content-length")
    return (length.isdigit() and int(length) > 0) or bool(header(scope, b"transfer-encoding"))


def json_reply(status: int, payload: Any) -> Reply:
    return status, list(JSON), encode(payload)


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole body, refused (413) as soon as it is known to pass ``limit`` bytes."""
    declared = header(scope, b"content-length")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, "batch_too_large",
                           f"body is {declared} bytes; the limit is {limit} bytes (500 KB) per request")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise RequestError(400, "client_disconnected", "client went away")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestError(413, "batch_too_large",
                               f"body exceeds the limit of {limit} bytes (500 KB) per request")
        chunks.append(chunk)
        if not message.get("more_body"):
            scope["evactors.body_read"] = True
            return b"".join(chunks)


class ClientAddress:
    """The client's IP: the peer, or the last hop in ``X-Forwarded-For`` before the
    first proxy that is not trusted (only when the peer itself is a trusted proxy)."""

    def __init__(self, trusted_proxies: Sequence[str]) -> None:
        self.trusted = [ipaddress.ip_network(p, strict=False) for p in trusted_proxies]

    def _is_trusted(self, address: str) -> bool:
        return any(ipaddress.ip_address(address) in net for net in self.trusted)

    def __call__(self, scope: Scope) -> str:
        client = scope.get("client")
        peer = client[0] if client else ""
        if not self.trusted or not peer:
            return peer
        try:
            if not self._is_trusted(peer):
                return peer
        except ValueError:
            return peer
        for hop in reversed([h.strip() for h in header(scope, b"x-forwarded-for").split(",") if h.strip()]):
            try:
                if not self._is_trusted(hop):
                    return hop
            except ValueError:
                return peer
        return peer
