"""Enrichment parts on real data: the bundled GeoLite2 database, real user agents."""

from __future__ import annotations

import pytest

from conftest import CHROME, GOOGLEBOT, HEADLESS, IPHONE
from evactors.enrichment.bots import BotDetector, header_describes_sender
from evactors.enrichment.enrich import truncate_ip
from evactors.enrichment.geoip import GeoIP
from evactors.enrichment.useragent import UserAgentParser

UA = UserAgentParser(1000)
BOTS = BotDetector(1000)


@pytest.mark.parametrize(("ua", "browser", "os", "device"), [
    (CHROME, "Chrome", "Windows", "desktop"),
    (IPHONE, "Mobile Safari", "iOS", "mobile"),
    ("Mozilla/5.0 (iPad; CPU OS 16_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
     "Version/16.0 Mobile/15E148 Safari/604.1", "Mobile Safari", "iOS", "tablet"),
    ("Mozilla/5.0 (Linux; Android 13; SM-X700) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/116.0.0.0 Safari/537.36", "Chrome", "Android", "tablet"),
    ("Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/120.0.0.0 Mobile Safari/537.36", "Chrome Mobile", "Android", "mobile"),
    ("Mozilla/5.0 (SMART-TV; Linux; Tizen 6.0) AppleWebKit/538.1 (KHTML, like Gecko) "
     "Version/6.0 TV Safari/538.1", "Safari", "Tizen", "tv"),
    ("Mozilla/5.0 (PlayStation; PlayStation 5/2.26) AppleWebKit/605.1.15 (KHTML, like Gecko)", "", "", "console"),
])
def test_user_agents(ua: str, browser: str, os: str, device: str) -> None:
    info = UA.parse(ua)
    assert (info.device, info.os) == (device, os) or (device == "console" and info.device == "console")
    if browser:
        assert info.browser == browser
    assert BOTS.reason(ua, info.spider) == ""


@pytest.mark.parametrize(("ua", "reason"), [
    (GOOGLEBOT, "known-pattern"),
    ("Mozilla/5.0 (Linux; Android 6.0.1; Nexus 5X Build/MMB29P) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/120.0.6099.71 Mobile Safari/537.36 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
     "known-pattern"),
    (HEADLESS, "headless"),
    ("curl/8.5.0", "crawler-list"),
    ("Mozilla/5.0 (compatible; YandexBot/3.0; +http://yandex.com/bots)", "spider-family"),
])
def test_bots_have_a_reason(ua: str, reason: str) -> None:
    assert BOTS.reason(ua, UA.parse(ua).spider) == reason


def test_sender_user_agents_are_not_visitors() -> None:
    assert header_describes_sender("curl/8.5.0")
    assert header_describes_sender("analytics-python/2.4.0")
    assert not header_describes_sender(CHROME)
    assert BOTS.reason("analytics-node/1.0", False) == ""


def test_geoip_known_and_unroutable_addresses() -> None:
    geo = GeoIP(None, 100)
    gb = geo.lookup("81.2.69.142")
    assert (gb.country, gb.region, gb.city, gb.timezone) == ("GB", "ENG", "Gamlingay", "Europe/London")
    assert geo.lookup("2a02:8070::1").country == "DE"
    for ip in ["10.1.2.3", "192.168.0.1", "127.0.0.1", "::1", "fe80::1", "100.64.0.1",
               "169.254.0.1", "224.0.0.1", "fc00::1", "0.0.0.0", "not-an-ip", "", "999.1.1.1"]:
        assert geo.lookup(ip).country == "", ip


def test_truncate_ip() -> None:
    assert truncate_ip("81.2.69.142") == "81.2.69.0"
    assert truncate_ip("2a02:8070:1:2::1") == "2a02:8070:1::"
    assert truncate_ip("junk") == ""


def test_enrichment_tuples_match_the_row_columns() -> None:
    """The enricher splats Geo and UAInfo into EventRow: their order must be the row's."""
    from evactors.core.model import EventRow
    from evactors.enrichment.geoip import Geo
    from evactors.enrichment.useragent import UAInfo

    fields = list(EventRow.__struct_fields__)
    start = fields.index("country")
    assert fields[start:start + 9] == list(Geo._fields)
    start = fields.index("browser")
    assert fields[start:start + 7] == list(UAInfo._fields[:7])


def test_fallback_resolvers_agree_with_the_native_one() -> None:
    """Without ua-parser-rs the parser falls back to RE2, then pure Python: same answers."""
    import ua_parser
    from ua_parser import re2 as re2_resolver

    matchers = ua_parser.load_builtins()
    fallbacks = [ua_parser.Parser(re2_resolver.Resolver(matchers)),
                 ua_parser.Parser(ua_parser.BasicResolver(matchers))]
    assert UA.resolver == "regex"  # the native accelerator is what runs here
    for ua in (CHROME, IPHONE, GOOGLEBOT, HEADLESS):
        native = UA.parser(ua, ua_parser.Domain.ALL).complete()
        for parser in fallbacks:
            assert parser(ua, ua_parser.Domain.ALL).complete() == native
