"""Configuration: file < environment < flags; every error exits 2 naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import ROOT, run_cli
from evactors.core import config as cfg


def test_reference_and_example_are_generated_from_the_structs() -> None:
    """docs/configuration.md and conf/evactors.toml never drift from what the service reads."""
    from evactors.cli import reference

    assert (ROOT / "docs" / "configuration.md").read_text() == reference.markdown(), \
        "regenerate: bin/evactors config-reference > docs/configuration.md"
    assert (ROOT / "conf" / "evactors.toml").read_text() == reference.toml(), \
        "regenerate: bin/evactors config-reference --toml > conf/evactors.toml"


def test_example_config_is_complete_and_valid() -> None:
    """conf/evactors.toml documents every setting, and loads as is."""
    example = ROOT / "conf" / "evactors.toml"
    loaded = cfg.load(example, environ={})
    text = example.read_text()
    for section, typ in cfg._SECTIONS.items():
        assert f"[{section}]" in text
        for field in typ.__struct_fields__:
            assert f"{field} =" in text, f"{section}.{field} missing from conf/evactors.toml"
    assert loaded.server.listen == "127.0.0.1:8080"


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text('data_dir = "/from-file"\n[pipeline]\nenrichers = 3\nsession_shards = 5\n'
                    '[write_keys]\nk1 = "p1"\n')
    c = cfg.load(conf, environ={"EVACTORS_PIPELINE_ENRICHERS": "7"},
                 overrides={"pipeline": {"session_shards": 9}})
    assert (c.data_dir, c.pipeline.enrichers, c.pipeline.session_shards) == ("/from-file", 7, 9)
    assert c.write_keys == {"k1": "p1"}
    env = {"EVACTORS_WRITE_KEYS": "a=pa,b=pb", "EVACTORS_SERVER_TRUSTED_PROXIES": '["10.0.0.0/8"]'}
    c = cfg.load(None, environ=env)
    assert c.write_keys == {"a": "pa", "b": "pb"}
    assert c.server.trusted_proxies == ["10.0.0.0/8"]


@pytest.mark.parametrize(("toml", "env", "key"), [
    ("[server]\nlisten_port = 8080\n", {}, "server.listen_port"),
    ("[pipeline]\nenrichers = \"many\"\n", {}, "pipeline.enrichers"),
    ("[pipeline]\nsession_shards = 0\n", {}, "pipeline.session_shards"),
    ("[pipeline]\npii = \"blur\"\n", {}, "pipeline.pii"),
    ("[server]\nlisten = \"localhost\"\n", {}, "server.listen"),
    ("[redis]\nurl = \"http://nope\"\n", {}, "redis.url"),
    ("bogus = 1\n", {}, "bogus"),
    ("", {"EVACTORS_REDIS_URLL": "redis://x"}, "EVACTORS_REDIS_URLL"),
    ("", {"EVACTORS_FLUSH_CHUNK_ROWS": "-5"}, "flush.chunk_rows"),
    ("[write_keys]\nk = \"bad:project\"\n", {}, "write_keys.k"),
])
def test_config_errors_exit_2_naming_the_key(tmp_path: Path, toml: str, env: dict[str, str], key: str) -> None:
    conf = tmp_path / "bad.toml"
    conf.write_text(toml)
    result = run_cli("run", "--config", str(conf), "--data-dir", str(tmp_path / "d"), env=env, timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"`{key}`" in result.stderr, result.stderr
    assert not (tmp_path / "d").exists()  # nothing was started


def test_bad_flag_values_exit_2(tmp_path: Path) -> None:
    result = run_cli("run", "--data-dir", str(tmp_path), "--write-key", "no-equals-sign")
    assert result.returncode == 2 and "`--write-key`" in result.stderr
    result = run_cli("run", "--data-dir", str(tmp_path), "--config", str(tmp_path / "missing.toml"))
    assert result.returncode == 2 and "file not found" in result.stderr
    result = run_cli("check-config", "--config", str(ROOT / "conf" / "evactors.toml"))
    assert result.returncode == 0 and '"session_shards": 4' in result.stdout


def test_help_everywhere() -> None:
    for command in ([], ["run"], ["query"], ["check-config"], ["migrate"], ["status"],
                    ["config-reference"], ["bench-enrich"]):
        result = run_cli(*command, "--help")
        assert result.returncode == 0 and "usage: evactors" in result.stdout, command
