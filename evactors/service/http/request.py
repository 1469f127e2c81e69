"""What every route needs of an HTTP request: its headers, its body under a size limit,
the client's address behind trusted proxies, and the error that becomes a JSON reply.

ASGI's types are plain dicts; these helpers keep the routes free of that plumbing."""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec
import trio

from evactors.core.config import LimitsConfig
from evactors.core.segment import RequestError
from evactors.ops import metrics

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


async def lifespan(scope: Scope, receive: Receive, send: Send) -> None:
    """ASGI's lifespan protocol, which our apps have nothing to do in: acknowledged."""
    if scope["type"] != "lifespan":
        return
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def json_reply(status: int, payload: Any) -> Reply:
    return status, list(JSON), encode(payload)


async def read_body(scope: Scope, receive: Receive, limit: int,
                    bounds: BodyBounds | None = None) -> bytes:
    """The whole body, refused (413) as soon as it is known to pass ``limit`` bytes; with
    ``bounds``, within one deadline for all of it (408; a body trickled in a byte at a time
    is cut off however often bytes come) and within the bytes all bodies being received
    may hold at once (503)."""
    declared = header(scope, b"content-length")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, "batch_too_large",
                           f"body is {declared} bytes; the limit is {limit} bytes (500 KB) per request")
    expected = int(declared) if declared.isdigit() else limit
    seconds = bounds.reserve(expected) if bounds is not None else math.inf
    chunks, size = [], 0
    try:
        with trio.move_on_after(seconds):
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
    finally:
        if bounds is not None:
            bounds.release(expected)
    metrics.RATE_LIMITED.labels("body_timeout").inc()
    raise RequestError(408, "body_timeout", f"the body did not arrive within {seconds:.0f} s "
                       f"({size} of {declared or 'chunked'} bytes received)")


class BodyBounds:
    """The deadline of one body (``limits.body_timeout_seconds`` plus its length at
    ``limits.min_body_bytes_per_second``) and the budget of all bodies being received at
    once (``limits.max_pending_body_bytes``, each counted at its declared length)."""

    def __init__(self, limits: LimitsConfig, retry_after: int) -> None:
        self.limits = limits
        self.retry_after = retry_after
        self.pending = 0

    def reserve(self, expected: int) -> float:
        """Count ``expected`` bytes against the budget (503 past it); the body's deadline."""
        if self.pending + expected > self.limits.max_pending_body_bytes:
            metrics.RATE_LIMITED.labels("body_memory").inc()
            raise RequestError(503, "busy", "too many request bodies are being received at once; "
                               "retry later", retry_after=self.retry_after)
        self.pending += expected
        return self.limits.body_timeout_seconds + expected / self.limits.min_body_bytes_per_second

    def release(self, expected: int) -> None:
        self.pending -= expected


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
