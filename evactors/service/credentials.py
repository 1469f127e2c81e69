"""Credentials: write keys (→ project) and the admin token. A config without write keys
gets a generated one, kept in the data dir with the admin token (0600), so a first-time
user can send an event at once. Keys are compared by digest or in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from pathlib import Path

from evactors.store.paths import DataDir

log = logging.getLogger("evactors.ingest")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class WriteKeys:
    """Write key → project. Keys are compared by their SHA-256 digests, so lookup time
    does not depend on how much of a guessed key is right. Replaceable at run time."""

    def __init__(self, keys: dict[str, str]) -> None:
        self.replace(keys)

    def replace(self, keys: dict[str, str]) -> None:
        self._by_digest = {_digest(k): p for k, p in keys.items()}

    def projects(self) -> list[str]:
        return list(self._by_digest.values())

    def project(self, key: str | None) -> str | None:
        if not key:
            return None
        return self._by_digest.get(_digest(key))


class AdminToken:
    def __init__(self, token: str) -> None:
        self.token = token

    def check(self, header: str) -> bool:
        scheme, _, value = header.partition(" ")
        return (bool(self.token) and scheme.lower() == "bearer"
                and hmac.compare_digest(value.strip(), self.token))


log = logging.getLogger("evactors.supervisor")


def load_or_create_write_key(data_dir: Path) -> tuple[str, str]:
    """The generated write key of a config without any, kept in the data dir."""
    path = DataDir(data_dir).write_key
    if path.exists():
        key, _, project = path.read_text().strip().partition("=")
        if key and project:
            return key, project
    key = secrets.token_urlsafe(24)
    path.write_text(f"{key}=default\n")
    path.chmod(0o600)
    return key, "default"


def load_or_create_admin_token(data_dir: Path) -> str:
    path = DataDir(data_dir).admin_token
    if path.exists() and len(path.read_text().strip()) >= 16:  # an empty token opens nothing
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    path.write_text(token + "\n")
    path.chmod(0o600)
    return token
