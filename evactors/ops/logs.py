"""Logging: JSON lines (or human-readable text on a terminal), each record carrying the
actor that wrote it and, inside a request, its request id. Both come from context
variables: trio gives every task a copy of its parent's context, so an actor's name set
once in its supervising task follows everything it logs."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any

actor: contextvars.ContextVar[str] = contextvars.ContextVar("actor", default="")


request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


class _Context(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.actor = actor.get()
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("actor", "request_id"):
            value = getattr(record, key, "")
            if value:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s%(where)s: %(message)s")
        self.converter = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        parts = [p for p in (getattr(record, "actor", ""), getattr(record, "request_id", "")) if p]
        record.where = f" [{' '.join(parts)}]" if parts else ""
        return super().format(record)


def setup(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    as_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler.setFormatter(JsonFormatter() if as_json else TextFormatter())
    handler.addFilter(_Context())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("hpack", "hypercorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
