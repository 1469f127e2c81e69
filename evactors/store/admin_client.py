"""Calls to a running service's admin listener (``service.json``'s ``admin``: ``unix:PATH``
or an ``http://`` URL), with the admin token from the data dir: for the CLI and the load
harness, stdlib only."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any


class AdminError(Exception):
    """The admin API answered with an error status; ``body`` is its JSON (or text)."""

    def __init__(self, status: int, body: Any) -> None:
        message = body.get("message", body) if isinstance(body, dict) else body
        super().__init__(f"{status}: {message}")
        self.status, self.body = status, body


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock


def connection(address: str, timeout: float) -> http.client.HTTPConnection:
    if address.startswith("unix:"):
        return _UnixConnection(address.removeprefix("unix:"), timeout)
    host = address.split("://", 1)[-1].rstrip("/")
    return http.client.HTTPConnection(host, timeout=timeout)


def admin_address(data_dir: Path) -> str:
    """The running service's admin listener, from its service.json."""
    return str(json.loads((data_dir / "service.json").read_text())["admin"])


def call(address: str, token: str, path: str, data: bytes | None = None,
         timeout: float = 30) -> Any:
    """GET (or POST ``data``) ``path``; the JSON answer. Raises AdminError on an error
    status, OSError when nothing answers."""
    conn = connection(address, timeout)
    try:
        conn.request("GET" if data is None else "POST", path, body=data,
                     headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    try:
        body = json.loads(raw)
    except ValueError:
        body = raw.decode(errors="replace")
    if response.status >= 400:
        raise AdminError(response.status, body)
    return body
