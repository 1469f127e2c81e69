"""User-agent parsing (ua-parser 1.x, native ``ua-parser-rs`` when installed) behind an LRU,
and device-type normalization to mobile / tablet / desktop / tv / console / wearable."""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import NamedTuple

import ua_parser

from evactors.enrichment.bots import _compile

log = logging.getLogger("evactors.useragent")


class UAInfo(NamedTuple):
    browser: str
    browser_version: str
    os: str
    os_version: str
    device: str  # mobile | tablet | desktop | tv | console | wearable
    brand: str
    model: str
    spider: bool  # ua-parser's device family "Spider"


def _resolver() -> tuple[ua_parser.Parser, str]:
    """Fastest resolver available: Rust (ua-parser-rs), then RE2, then pure Python."""
    matchers = ua_parser.load_builtins()
    for name in ("regex", "re2"):
        try:
            module = __import__(f"ua_parser.{name}", fromlist=["Resolver"])
            return ua_parser.Parser(module.Resolver(matchers)), name
        except ImportError:
            continue
    return ua_parser.Parser(ua_parser.BasicResolver(matchers)), "basic"


_TV = _compile(r"(?i)SmartTV|SMART-TV|Smart-TV|SmartHub|\bTV\b|GoogleTV|Android TV|AndroidTV|AppleTV|"
                 r"Apple ?TV|CrKey|BRAVIA|HbbTV|Web0S|WebOS.*TV|NetCast|Roku|AFT[A-Z]|Viera|"
                 r"PhilipsTV|Tizen.*TV|DTV|\bSTB\b")
_CONSOLE = _compile(r"(?i)PlayStation|Xbox|Nintendo|\bOUYA\b")
_WEARABLE = _compile(r"(?i)\bWatch\b|Wear ?OS|wearable|Glass\b")
_TABLET = _compile(r"(?i)iPad|Tablet|\bTab\b|Kindle|Silk/|PlayBook|Nexus (7|9|10)\b|SM-T\d|"
                     r"GT-P\d|Lenovo TB|MediaPad|Xoom")
_MOBILE = _compile(r"(?i)Mobi|iPhone|iPod|Windows Phone|BlackBerry|BB10|Opera Mini|IEMobile|"
                     r"webOS|Symbian|Fennec")


def device_type(ua: str, os_family: str) -> str:
    if _TV.search(ua):
        return "tv"
    if _CONSOLE.search(ua):
        return "console"
    if _WEARABLE.search(ua):
        return "wearable"
    if _TABLET.search(ua):
        return "tablet"
    if os_family == "Android" and "Mobile" not in ua:
        return "tablet"  # Android phones say "Mobile"; tablets do not
    if _MOBILE.search(ua) or os_family in ("iOS", "Android"):
        return "mobile"
    return "desktop"


def _version(part: ua_parser.UserAgent | ua_parser.OS | None) -> str:
    if part is None:
        return ""
    pieces = [part.major, part.minor, part.patch]
    return ".".join(p for p in pieces if p)


class UserAgentParser:
    def __init__(self, cache_size: int) -> None:
        self.parser, self.resolver = _resolver()
        log.info("user-agent resolver: %s", self.resolver)
        self.parse = lru_cache(maxsize=cache_size)(self._parse)

    def _parse(self, ua: str) -> UAInfo:
        if not ua:
            return UAInfo("", "", "", "", "", "", "", False)
        result = self.parser(ua, ua_parser.Domain.ALL).complete()
        agent, os_, device = result.user_agent, result.os, result.device
        browser = "" if agent is None or agent.family == "Other" else agent.family
        os_family = "" if os_ is None or os_.family == "Other" else os_.family
        spider = device is not None and device.family == "Spider"
        return UAInfo(
            browser=browser,
            browser_version=_version(agent) if browser else "",
            os=os_family,
            os_version=_version(os_) if os_family else "",
            device=device_type(ua, os_family),
            brand=(device.brand or "") if device is not None else "",
            model=(device.model or "") if device is not None else "",
            spider=spider,
        )
