"""The data dir's files, private to the service's user.

The data dir holds the write key, read keys and admin token, and Valkey's append-only file
(which holds the raw client IPs of requests until it is rewritten). Other local users must
read none of it: the dir is 0700, a secret file is created 0600 in one step (``O_EXCL``:
never written first and chmod'ed after, never a file someone else placed there), and
whatever is found looser at start is tightened, with a warning.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("evactors.files")

DIR_MODE, FILE_MODE = 0o700, 0o600


def _tighten(path: Path, mode: int) -> None:
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        return
    if stat.S_IMODE(st.st_mode) & ~mode:
        os.chmod(path, mode)
        log.warning("%s was readable by others (mode %o); now %o", path, stat.S_IMODE(st.st_mode), mode)


def private_dir(path: Path) -> None:
    """Create ``path`` (0700), or tighten it to 0700."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    _tighten(path, DIR_MODE)


def private_tree(path: Path) -> None:
    """Tighten a directory and everything in it: dirs 0700, files 0600 (an older run's
    Valkey files, created before the umask was set)."""
    if not path.is_dir():
        return
    _tighten(path, DIR_MODE)
    for root, dirs, files in os.walk(path):
        for name in dirs:
            _tighten(Path(root) / name, DIR_MODE)
        for name in files:
            _tighten(Path(root) / name, FILE_MODE)


def create_secret(path: Path, text: str) -> bool:
    """Write ``text`` to a new file created 0600 with ``O_EXCL``; False if it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    except FileExistsError:
        return False
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def read_secret(path: Path) -> str | None:
    """The text of a secret file, tightened to 0600 first; None if there is none."""
    try:
        _tighten(path, FILE_MODE)
        return path.read_text()
    except FileNotFoundError:
        return None


def secret(path: Path, make: Callable[[], str], valid: Callable[[str], bool]) -> tuple[str, bool]:
    """The secret kept in ``path``, or a new one from ``make`` (created 0600, ``O_EXCL``).
    Returns (text, made now). A file that is not ``valid`` is replaced."""
    for _ in range(3):
        text = read_secret(path)
        if text is not None and valid(text):
            return text, False
        if text is not None:
            log.warning("%s is not a valid secret; replacing it", path)
            path.unlink(missing_ok=True)
        fresh = make()
        if create_secret(path, fresh):
            return fresh, True
    raise RuntimeError(f"cannot create {path}")
