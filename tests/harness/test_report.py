"""Pre-aggregation kept by ClickHouse (materialized views) and `bin/evactors report`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from conftest import Service, message, run_cli


def test_daily_aggregates_and_the_report(service: Service) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    if now.hour == 0:  # the events are up to 30 minutes before "now": keep them on now's day
        now -= timedelta(hours=1)
    yesterday = now - timedelta(days=1)

    def at(when: datetime, minutes: int) -> str:
        return (when - timedelta(minutes=minutes)).isoformat()

    batch = []
    for user, when in (("ann", now), ("bob", now), ("ann", yesterday)):
        for i, path in enumerate(("/home", "/pricing", "/signup")):  # the last view stays held
            batch.append(message("page", anonymousId=f"{user}-device", userId=user, name=path,
                                 properties={"path": path}, timestamp=at(when, 30 - i)))
        batch.append(message("track", anonymousId=f"{user}-device", userId=user, event="Clicked",
                             timestamp=at(when, 20)))
    assert service.batch(batch).status_code == 200
    # 3 × (2 flushed views + 1 track), and ann's return today closes yesterday's session:
    # its held /signup view is released with a session_end
    service.wait_rows("SELECT 1 FROM evactors.events", 11)
    days = {str(r["day"])[:10]: r for r in service.query(
        "SELECT day, uniqExactMerge(users) AS users FROM evactors.daily_active_users "
        "WHERE project_id = 'project-a' GROUP BY day")}
    assert {d: r["users"] for d, r in days.items()} == {
        str(now.date()): 2, str(yesterday.date()): 1}
    views = {r["path"]: r["v"] for r in service.query(
        "SELECT path, sum(views) AS v FROM evactors.daily_page_views GROUP BY path")}
    assert views == {"/home": 3, "/pricing": 3, "/signup": 1}

    result = run_cli("report", "--project", "project-a", "--days", "7", "--format", "tsv",
                     "--data-dir", str(service.data_dir))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"{yesterday.date()}\t1\t4\t3" in lines  # day, active users, events, page views
    assert f"{now.date()}\t2\t6\t4" in lines
    assert "Clicked\t3" in lines and "/home\t3" in lines
