"""CORS for the routes browsers post events to: every SDK route, its 404s and errors too.

Why a module of its own: browser SDKs send headers of their own (analytics.js
``Authorization`` and ``X-Retry-Count``; RudderStack ``AnonymousId``, ``SentAt`` and five
``Rsa-*`` retry headers; OpenPanel ``openpanel-*``), so a fixed allow-list in the preflight
breaks the next SDK version. The preflight therefore echoes the headers the browser asks
for, bounded in count and size, and a browser caches the answer (``Access-Control-Max-Age``).

Origins: a preflight carries no write key, so it cannot know the project; it allows an
origin that any project allows. The request itself names its project, which then checks the
``Origin`` against its own list (``[cors] origins``; a project not listed allows any):
refused with 403 ``origin_not_allowed``. No credentials are ever allowed (no cookies are
read; the write key is not a secret a browser holds on the user's behalf).
"""

from __future__ import annotations

import re

from evactors.core.config import CorsConfig

MAX_HEADERS = 32  # names echoed in one preflight
MAX_HEADERS_BYTES = 1024  # the Access-Control-Request-Headers value echoed at most
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 field-name
# Answered when the request's list is over the bounds (or malformed): the headers of the SDKs we know.
KNOWN_HEADERS = (b"Content-Type, Authorization, Content-Encoding, X-Retry-Count, AnonymousId, SentAt, "
                 b"Rsa-Retry-Attempt, Rsa-Retry-Reason, Rsa-Since-First-Attempt, Rsa-Since-Last-Attempt, "
                 b"Rsa-Recovered, openpanel-client-id, openpanel-client-secret, openpanel-sdk-name, "
                 b"openpanel-sdk-version, X-Request-Id")
Headers = list[tuple[bytes, bytes]]


def requested_headers(value: str) -> bytes:
    """The preflight's ``Access-Control-Request-Headers``, echoed if within bounds."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    if (len(value) > MAX_HEADERS_BYTES or len(names) > MAX_HEADERS
            or not all(_TOKEN.fullmatch(n) for n in names)):
        return KNOWN_HEADERS
    return ", ".join(names).encode("latin-1") if names else KNOWN_HEADERS


class Cors:
    """The configured origins, and the headers of an answer to a browser."""

    def __init__(self, config: CorsConfig, projects: set[str]) -> None:
        self.replace(config, projects)

    def replace(self, config: CorsConfig, projects: set[str]) -> None:
        """The origins as configured; ``projects``: every project there is (SIGHUP: anew)."""
        self.max_age = str(config.max_age_seconds).encode()
        self.by_project = {p: frozenset(o.rstrip("/").lower() for o in origins)
                           for p, origins in config.origins.items()}
        # any origin, unless every project (``projects``: all there are) names its own; then
        # only the union of those
        self.restricted = (bool(self.by_project) and set(projects) <= set(self.by_project)
                           and all("*" not in o for o in self.by_project.values()))
        self.union = frozenset().union(*self.by_project.values()) if self.by_project else frozenset()

    def allows(self, project: str, origin: str) -> bool:
        """May a page of ``origin`` send ``project``'s events? (No Origin: not a browser.)"""
        allowed = self.by_project.get(project)
        return not origin or allowed is None or "*" in allowed or origin.rstrip("/").lower() in allowed

    def headers(self, origin: str) -> Headers:
        """``Access-Control-Allow-Origin`` (and what goes with it) for any answer."""
        if not self.restricted:
            return [(b"access-control-allow-origin", b"*"),
                    (b"access-control-expose-headers", b"Retry-After, X-Request-Id")]
        out: Headers = [(b"vary", b"Origin")]
        if origin and origin.rstrip("/").lower() in self.union:
            out += [(b"access-control-allow-origin", origin.encode("latin-1")),
                    (b"access-control-expose-headers", b"Retry-After, X-Request-Id")]
        return out

    def preflight(self, origin: str, request_headers: str, private_network: bool) -> Headers:
        """The answer to ``OPTIONS``: methods, the echoed headers, how long to cache it."""
        out = [
            *self.headers(origin),
            (b"access-control-allow-methods", b"POST, GET, OPTIONS"),
            (b"access-control-allow-headers", requested_headers(request_headers)),
            (b"access-control-max-age", self.max_age),
        ]
        if private_network:  # Chrome's Private Network Access: a public page posting to a LAN host
            out.append((b"access-control-allow-private-network", b"true"))
        out.append((b"vary", b"Access-Control-Request-Headers"))  # the echo depends on it
        return out
