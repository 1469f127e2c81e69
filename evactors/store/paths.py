"""Where things live under the data dir (``--data-dir``, default ``./data``). Every module
that reads or writes a file of the data dir — the service, the CLI, the harness — names
it through here."""

from __future__ import annotations

from pathlib import Path


class DataDir:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    @property
    def lock(self) -> Path:
        return self.root / "evactors.lock"  # one service per data dir (flock)

    @property
    def write_key(self) -> Path:
        return self.root / "write_key"  # the generated write key: KEY=PROJECT

    @property
    def instance(self) -> Path:
        return self.root / "instance"  # this instance's name: it owns its session shards by lease

    @property
    def admin_token(self) -> Path:
        return self.root / "admin.token"

    def read_key(self, project: str) -> Path:
        return self.root / f"read_key.{project}"  # the live view's generated key of a project

    @property
    def admin_socket(self) -> Path:
        return self.root / "admin.sock"  # the admin listener (admin.listen empty)

    @property
    def service_json(self) -> Path:
        return self.root / "service.json"  # pid, URL and admin listener of the running service (no key)

    @property
    def redis(self) -> Path:
        return self.root / "redis"  # the embedded Valkey's files

    @property
    def valkey_socket(self) -> Path:
        return self.redis / "valkey.sock"

    @property
    def valkey_pid(self) -> Path:
        return self.redis / "valkey.pid"

    @property
    def clickhouse(self) -> Path:
        return self.root / "clickhouse"  # the embedded chDB engine's files
