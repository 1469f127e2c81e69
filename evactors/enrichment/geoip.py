"""GeoIP from a MaxMind City database (maxminddb, C extension, mmap), cached, hot-reloaded.

Addresses that are not globally routable (private, loopback, link-local, CGNAT, reserved,
documentation, multicast; IPv4 and IPv6) get no geo, decided with ``ipaddress``.
A changed database file is loaded in a worker thread and swapped in whole; lookups never
see a half-loaded reader and never wait for the load.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import maxminddb
import trio

from evactors.ops import metrics

log = logging.getLogger("evactors.geoip")


class Geo(NamedTuple):
    country: str = ""
    country_name: str = ""
    region: str = ""
    region_name: str = ""
    city: str = ""
    postal_code: str = ""
    latitude: float | None = None
    longitude: float | None = None
    timezone: str = ""


NO_GEO = Geo()


def bundled_database() -> Path:
    import _geoip_geolite2

    return Path(_geoip_geolite2.__file__).parent / "GeoLite2-City.mmdb"


def _name(record: dict[str, Any] | None) -> str:
    return ((record or {}).get("names") or {}).get("en", "")


def _from_record(r: dict[str, Any]) -> Geo:
    country = r.get("country") or r.get("registered_country") or {}
    subdivision = (r.get("subdivisions") or [{}])[0]
    location = r.get("location") or {}
    return Geo(
        country=country.get("iso_code", ""),
        country_name=_name(country),
        region=subdivision.get("iso_code", ""),
        region_name=_name(subdivision),
        city=_name(r.get("city")),
        postal_code=(r.get("postal") or {}).get("code", ""),
        latitude=location.get("latitude"),
        longitude=location.get("longitude"),
        timezone=location.get("time_zone", ""),
    )


def routable(ip: str) -> bool:
    try:
        address = ipaddress.ip_address(ip.strip())
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


class GeoIP:
    def __init__(self, path: str | Path | None, cache_size: int) -> None:
        self.path = Path(path) if path else bundled_database()
        self.cache_size = cache_size
        self._stamp = self._file_stamp()
        self.reader = maxminddb.open_database(str(self.path), maxminddb.MODE_MMAP_EXT)
        self._cached = lru_cache(maxsize=cache_size)(self._lookup)
        self.reloads = 0

    def lookup(self, ip: str) -> Geo:
        """Cached; strings too long to be an address are not (they would crowd the cache)."""
        return self._cached(ip) if len(ip) <= 45 else NO_GEO

    def _file_stamp(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return st.st_ino, st.st_size, st.st_mtime_ns

    def _lookup(self, ip: str) -> Geo:
        if not ip or len(ip) > 45 or not routable(ip):  # 45: the longest IPv6 text form
            return NO_GEO
        try:
            record = self.reader.get(ip.strip())
        except ValueError:
            return NO_GEO
        return _from_record(record) if isinstance(record, dict) else NO_GEO

    async def reload_if_changed(self) -> bool:
        try:
            stamp = self._file_stamp()
        except OSError as e:
            log.warning("geoip database unreadable, keeping the loaded one: %s", e)
            return False
        if stamp == self._stamp:
            return False
        try:
            reader = await trio.to_thread.run_sync(
                maxminddb.open_database, str(self.path), maxminddb.MODE_MMAP_EXT)
        except Exception as e:  # a half-written file: try again at the next check
            log.warning("geoip database changed but does not load yet: %s", e)
            return False
        old, self.reader, self._stamp = self.reader, reader, stamp
        self._cached = lru_cache(maxsize=self.cache_size)(self._lookup)
        old.close()
        self.reloads += 1
        metrics.GEOIP_RELOADS.inc()
        log.info("geoip database reloaded from %s", self.path)
        return True

    async def watch(self, every: float) -> None:
        """The reloader actor: check the file for a change every ``every`` seconds."""
        while True:
            await trio.sleep(every)
            await self.reload_if_changed()
