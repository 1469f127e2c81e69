"""``/admin/query``'s ClickHouse: one read-only statement. ClickHouse's own parser reads it
first (one statement: no second one smuggled after a ``;``), only read statements pass, and
it runs with ``readonly = 1``, which also refuses ``SET`` (nothing reaches the flusher's
session), writes, DDL and the table functions that reach outside the database (``file``,
``url``, ``remote``, ``executable``, …). On a ClickHouse server it has a client of its own
(its own HTTP session); the embedded engine is one per process, so there it shares the
flusher's client, with readonly settings on each query."""

from __future__ import annotations

from typing import Any

import trio

from evactors.store.clickhouse import ClickHouse, connect

READ_ONLY = {"readonly": 1}
READ_STATEMENTS = ("SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXISTS", "EXPLAIN")


def sql_literal(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


class ReadOnlyQuery:
    """``/admin/query``'s ClickHouse: one statement, ``readonly = 1``."""

    def __init__(self, clickhouse: ClickHouse) -> None:
        self.clickhouse = clickhouse
        self.embedded = clickhouse.dsn.startswith("chdb://")
        self.client: Any = None  # a server's: our own, not the flusher's session
        self.limiter = trio.CapacityLimiter(1)

    def _run(self, client: Any, sql: str) -> tuple[list[str], list[Any]]:
        # One statement, as ClickHouse's own parser reads it; what runs is its formatting,
        # so a trailing comment or ";" cannot carry a second statement past the check.
        rows = client.query(f"SELECT formatQuerySingleLine({sql_literal(sql)})",
                            settings=READ_ONLY).result_rows
        statement = str(rows[0][0])
        if statement.split(None, 1)[0].upper() not in READ_STATEMENTS:  # and readonly = 1 below
            raise ValueError(f"only {', '.join(READ_STATEMENTS)} statements run here (readonly)")
        result = client.query(statement, settings=READ_ONLY)
        return list(result.column_names), result.result_rows

    async def query(self, sql: str) -> tuple[list[str], list[Any]]:
        sql = sql.strip().rstrip(";").strip()
        if not sql:
            raise ValueError("empty query")
        ch = self.clickhouse
        if not await ch.ensure_open():
            raise ConnectionError("ClickHouse is not reachable")
        with trio.fail_after(ch.timeout):
            if self.embedded:  # one engine per process: its client, with readonly settings
                return await trio.to_thread.run_sync(self._run, ch.client, sql, limiter=ch.limiter)

            def own() -> tuple[list[str], list[Any]]:
                if self.client is None:
                    self.client = connect(ch.dsn)
                return self._run(self.client, sql)

            return await trio.to_thread.run_sync(own, limiter=self.limiter)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
