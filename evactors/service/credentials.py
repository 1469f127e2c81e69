"""Credentials: write keys (→ project), read keys (→ project: the live view) and the admin
token. A config without write keys gets a generated one, kept in the data dir with the
admin token and a read key per project (0600, created with O_EXCL), so a first-time user
can send an event at once. Keys are compared by digest or in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from pathlib import Path

from evactors.store import files
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
        # as bytes: compare_digest refuses a str that is not ASCII (a header can be any latin-1)
        return (bool(self.token) and scheme.lower() == "bearer"
                and hmac.compare_digest(value.strip().encode(), self.token.encode()))


log = logging.getLogger("evactors.supervisor")


def load_or_create_write_key(data_dir: Path) -> tuple[str, str, bool]:
    """The generated write key of a config without any, kept in the data dir (0600).
    Returns (key, project, made now): it is printed only when made."""
    def valid(text: str) -> bool:
        key, _, project = text.strip().partition("=")
        return bool(key and project)

    text, made = files.secret(DataDir(data_dir).write_key,
                              lambda: f"{secrets.token_urlsafe(24)}=default\n", valid)
    key, _, project = text.strip().partition("=")
    return key, project, made


def load_or_create_admin_token(data_dir: Path) -> str:
    # an empty or short token opens nothing: replaced
    text, _ = files.secret(DataDir(data_dir).admin_token, lambda: secrets.token_urlsafe(32) + "\n",
                           lambda t: len(t.strip()) >= 16)
    return text.strip()


def load_or_create_read_keys(data_dir: Path, projects: list[str],
                             configured: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Read key → project (the live view's): the configured ones, and for each project
    without one a key generated into DATA/read_key.PROJECT (0600). Returns (all keys, those
    made now)."""
    keys = dict(configured)
    made: dict[str, str] = {}
    for project in sorted(set(projects) - set(configured.values())):
        text, new = files.secret(DataDir(data_dir).read_key(project),
                                 lambda: secrets.token_urlsafe(24) + "\n", lambda t: len(t.strip()) >= 16)
        keys[text.strip()] = project
        if new:
            made[text.strip()] = project
    return keys, made
