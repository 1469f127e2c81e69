"""Enrichment through the running service: PII options, bots kept, dedup across a restart,
and a GeoIP database swapped under load."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from conftest import CHROME, GB_IP, GOOGLEBOT, Sender, Service, message
from evactors.enrichment.geoip import bundled_database


def test_pii_truncate_keeps_a_network_not_an_address(make_service) -> None:  # type: ignore[no-untyped-def]
    service: Service = make_service(env={"EVACTORS_PIPELINE_PII": "truncate"}).start()
    msg = message("track", event="T", context={"ip": GB_IP, "userAgent": CHROME})
    assert service.batch([msg]).status_code == 200
    row = service.wait_rows("SELECT ip, user_agent, country, browser FROM evactors.events", 1)[0]
    assert row == {"ip": "81.2.69.0", "user_agent": "", "country": "GB", "browser": "Chrome"}


def test_pii_keep_and_bots_kept_flagged(make_service) -> None:  # type: ignore[no-untyped-def]
    service: Service = make_service(env={"EVACTORS_PIPELINE_PII": "keep",
                                         "EVACTORS_PIPELINE_KEEP_BOTS": "true"}).start()
    human = message("track", event="Human", context={"ip": GB_IP, "userAgent": CHROME})
    bot = message("track", event="Crawl", anonymousId="g", context={"userAgent": GOOGLEBOT})
    assert service.batch([human, bot]).status_code == 200
    rows = {r["name"]: r for r in service.wait_rows(
        "SELECT name, ip, user_agent, is_bot, bot_reason FROM evactors.events", 2)}
    assert rows["Human"]["ip"] == GB_IP and rows["Human"]["user_agent"] == CHROME
    assert rows["Human"]["is_bot"] == 0
    assert (rows["Crawl"]["is_bot"], rows["Crawl"]["bot_reason"]) == (1, "known-pattern")
    assert not service.query("SELECT 1 FROM evactors.events_bots")


def test_dedup_holds_across_a_restart(make_service) -> None:  # type: ignore[no-untyped-def]
    service: Service = make_service().start()
    first = message("track", event="Once", anonymousId="r")
    assert service.batch([first]).status_code == 200
    service.wait_rows("SELECT 1 FROM evactors.events WHERE name = 'Once'", 1)
    assert service.stop() == 0
    service.start()
    assert service.batch([first, message("track", event="Marker", anonymousId="r")]).status_code == 200
    service.wait_rows("SELECT 1 FROM evactors.events WHERE name = 'Marker'", 1)
    assert len(service.query("SELECT 1 FROM evactors.events WHERE name = 'Once'")) == 1


def test_geoip_database_is_swapped_under_load_without_losing_events(make_service, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    database = tmp_path / "City.mmdb"
    shutil.copyfile(bundled_database(), database)
    service: Service = make_service(env={"EVACTORS_GEOIP_DATABASE": str(database),
                                         "EVACTORS_GEOIP_RELOAD_CHECK_SECONDS": "0.2"}).start()
    with Sender(service, threads=3, context={"ip": GB_IP, "userAgent": CHROME}) as sender:
        for _ in range(3):  # a new file replaces the old one, as a database updater does
            time.sleep(0.7)
            fresh = tmp_path / "City.mmdb.new"
            shutil.copyfile(bundled_database(), fresh)
            os.replace(fresh, database)
        time.sleep(0.7)
    assert service.log().count("geoip database reloaded") >= 2, service.log()[-2000:]
    deadline = time.monotonic() + 60
    while True:
        rows = service.query("SELECT message_id, country, city FROM evactors.events WHERE name = 'Load'")
        if {r["message_id"] for r in rows} >= sender.acked or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    ids = [r["message_id"] for r in rows]
    assert len(ids) == len(set(ids)) and set(ids) >= sender.acked and len(sender.acked) > 300
    assert all((r["country"], r["city"]) == ("GB", "Gamlingay") for r in rows)  # no stall, no gap
