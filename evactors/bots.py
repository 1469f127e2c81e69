"""Bot detection: seed 003's patterns, the maintained ``crawler-user-agents`` list (read
from its package), headless-browser signatures, and ua-parser's ``Spider`` family.

Each bot gets a reason code. Server-side SDKs (analytics-python, rudder-sdk-…) send their
own User-Agent header; events from them are not bots.
"""

from __future__ import annotations

import re
from functools import lru_cache

import crawleruseragents

SEED = re.compile(r"Googlebot|bingbot|Slurp|DuckDuckBot|LinkedInBot|facebookexternalhit|Twitterbot|"
                  r"rogerbot|semrushbot|AhrefsBot|crawler|spider|scraper", re.I)
HEADLESS = re.compile(r"HeadlessChrome|PhantomJS|SlimerJS|Electron/.*HeadlessChrome|"
                      r"\bjsdom\b|Puppeteer|Playwright|Selenium|Cypress", re.I)
SERVER_SDK = re.compile(r"^(analytics-(python|node|ruby|go|java|php|dotnet|android|ios|kotlin)|"
                        r"rudder-?sdk|RudderLabs|Segment/|segment-)", re.I)
# User agents of HTTP libraries and server SDKs. In a request *header* they describe the
# sending server, not a visitor, so such a header is not used as the event's user agent.
HTTP_CLIENT = re.compile(r"^(curl|Wget|python-requests|Python-urllib|python-httpx|aiohttp|"
                         r"Go-http-client|okhttp|axios|node-fetch|undici|node|Java/|"
                         r"Apache-HttpClient|libwww-perl|Ruby|Faraday|GuzzleHttp|PostmanRuntime|"
                         r"insomnia|Dart/|Deno/|Bun/|reqwest|hyper/)|" + SERVER_SDK.pattern[1:], re.I)


def header_describes_sender(user_agent: str) -> bool:
    return bool(HTTP_CLIENT.search(user_agent))
# One alternation: the regex engine walks the UA once instead of 1500 times.
CRAWLERS = re.compile("|".join(f"(?:{p['pattern']})" for p in crawleruseragents.CRAWLER_USER_AGENTS_DATA))


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
