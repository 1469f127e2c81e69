"""Bot detection: seed 003's patterns, the maintained ``crawler-user-agents`` list (read
from its package), headless-browser signatures, and ua-parser's ``Spider`` family.

Each bot gets a reason code. Server-side SDKs (analytics-python, rudder-sdk-…) send their
own User-Agent header; events from them are not bots.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

import crawleruseragents


def _compile(pattern: str, dfa_megabytes: int = 8) -> Any:
    """RE2 when installed (linear time: ≈4 µs per UA for the 1500-way crawler list, against
    ≈1 ms with ``re``), else ``re``. A big alternation needs a bigger DFA budget, or RE2
    falls back to its slow NFA whenever a UA matches."""
    try:
        import re2

        options = re2.Options()
        options.max_mem = dfa_megabytes << 20
        return re2.compile(pattern, options)
    except Exception:  # not installed, or a pattern RE2 does not support
        return re.compile(pattern)


SEED = _compile(r"(?i)Googlebot|bingbot|Slurp|DuckDuckBot|LinkedInBot|facebookexternalhit|Twitterbot|"
                r"rogerbot|semrushbot|AhrefsBot|crawler|spider|scraper")


HEADLESS = _compile(r"(?i)HeadlessChrome|PhantomJS|SlimerJS|\bjsdom\b|Puppeteer|Playwright|"
                    r"Selenium|Cypress")


_SDK = (r"(analytics-(python|node|ruby|go|java|php|dotnet|android|ios|kotlin)|"
        r"rudder-?sdk|RudderLabs|Segment/|segment-)")


SERVER_SDK = _compile(r"(?i)^" + _SDK)


# User agents of HTTP libraries and server SDKs. In a request *header* they describe the
# sending server, not a visitor, so such a header is not used as the event's user agent.
HTTP_CLIENT = _compile(r"(?i)^(curl|Wget|python-requests|Python-urllib|python-httpx|aiohttp|"
                       r"Go-http-client|okhttp|axios|node-fetch|undici|node|Java/|"
                       r"Apache-HttpClient|libwww-perl|Ruby|Faraday|GuzzleHttp|PostmanRuntime|"
                       r"insomnia|Dart/|Deno/|Bun/|reqwest|hyper/)|^" + _SDK)


def header_describes_sender(user_agent: str) -> bool:
    return bool(HTTP_CLIENT.search(user_agent))


# The maintained list, as one alternation: a UA is walked once, not 1500 times.
CRAWLERS = _compile("|".join(f"(?:{p['pattern']})" for p in crawleruseragents.CRAWLER_USER_AGENTS_DATA),
                    dfa_megabytes=64)


def _reason(user_agent: str, spider: bool) -> str:
    if not user_agent or SERVER_SDK.search(user_agent):
        return ""
    if HEADLESS.search(user_agent):
        return "headless"
    if SEED.search(user_agent):
        return "known-pattern"
    if spider:
        return "spider-family"
    if CRAWLERS.search(user_agent):
        return "crawler-list"
    return ""


class BotDetector:
    def __init__(self, cache_size: int) -> None:
        self.reason = lru_cache(maxsize=cache_size)(_reason)
