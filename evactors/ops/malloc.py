"""glibc's malloc in the service's main process: its arena limit, set at start, and its figures
for ``/metrics``. Off glibc (musl, macOS) both are no-ops.

glibc gives threads arenas of their own, up to 8 per core, and keeps what is freed in each.
The main process's threads (trio's worker threads, chDB's) spread Python's large buffers over
many arenas, and the freed part kept growing under steady load; with 2 arenas it stays level
(docs/benchmarks.md, RSS): the GIL serializes most of these threads anyway, and chDB
allocates from its own jemalloc.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

ARENA_MAX = 2


_M_ARENA_MAX = -8  # mallopt's parameter number, from glibc's malloc.h


class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
        "keepcost")]


def _glibc(name: str) -> Callable[..., object] | None:
    try:
        return getattr(ctypes.CDLL(None), name)  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


def limit_arenas(arenas: int = ARENA_MAX) -> bool:
    """Cap glibc's arenas. Call it before a second thread allocates: glibc fixes its limit the
    first time a thread needs an arena of its own. ``MALLOC_ARENA_MAX`` or
    ``glibc.malloc.arena_max`` in ``GLIBC_TUNABLES`` wins (glibc has applied it already).
    True when the cap is set."""
    mallopt = _glibc("mallopt")
    if (mallopt is None or "MALLOC_ARENA_MAX" in os.environ
            or "glibc.malloc.arena_max" in os.environ.get("GLIBC_TUNABLES", "")):
        return False
    return bool(mallopt(_M_ARENA_MAX, arenas))


def mallinfo() -> Callable[[], Mallinfo2] | None:
    """glibc's ``mallinfo2`` (2.33+), or None elsewhere."""
    function = _glibc("mallinfo2")
    if function is None:
        return None
    function.restype = Mallinfo2  # type: ignore[attr-defined]
    function.argtypes = []  # type: ignore[attr-defined]
    return function  # type: ignore[return-value]
