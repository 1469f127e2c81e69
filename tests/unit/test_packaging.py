"""The service installs without the load harness: its libraries are an extra, and a harness
command run without them says how to get them."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HARNESS_ONLY = ("aiohttp", "uvloop", "hdrh", "psutil", "matplotlib", "rich", "fake_useragent")


def test_the_service_declares_none_of_the_harness_libraries() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"]).lower()
    harness = " ".join(project["optional-dependencies"]["harness"]).lower()
    for name in ("aiohttp", "py-spy", "uvloop", "hdrhistogram", "psutil", "matplotlib", "rich", "anyio"):
        assert name not in core
    for name in ("py-spy", "uvloop", "hdrhistogram", "psutil", "matplotlib", "rich"):
        assert name in harness
    assert "numpy" in core  # the service's dedup window (store/dedup.py); the harness uses it too


def test_running_the_service_loads_no_harness_library() -> None:
    code = ("import sys; import evactors.cli.main, evactors.service.startup, evactors.service.session_worker; "
            f"print([m for m in {HARNESS_ONLY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_a_harness_command_without_the_extra_says_how_to_get_it() -> None:
    # Hide the harness's libraries as a machine without the extra would lack them.
    code = ("import importlib.abc, sys\n"
            "class Absent(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            f"        if name.split('.')[0] in {HARNESS_ONLY!r}:\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, Absent())\n"
            "from evactors.cli.main import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    for command in ("bench", "loadtest"):
        out = subprocess.run([sys.executable, "-c", code, command, "--help"], capture_output=True, text=True,
                             cwd=ROOT)
        assert out.returncode == 2, (command, out.stderr)
        assert f"{command} needs the load harness's libraries" in out.stderr
        assert "bin/setup harness" in out.stderr and "pip install -e '.[harness]'" in out.stderr
