"""Request limits that need no I/O: token buckets per write key and per device, and the
count of open connections overall and per client IP.

Why: a holder of a (public, browser) write key could otherwise flood one project and slow
every other, and a few thousand slow sockets could hold the file descriptors and memory
everyone else needs. Each limit answers early and cheaply: a refused request costs a
dictionary look-up, never a body read or a Redis write.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable


class TokenBuckets:
    """One token bucket per key: ``rate`` tokens a second, at most ``burst`` saved up.

    A request of ``n`` events takes ``n`` tokens. One larger than the whole bucket is let
    through when the bucket is full and leaves it in debt (an SDK flushing a long offline
    queue in one batch is served, then waits), so no request is refused for ever.
    Buckets back at full are dropped when the table grows past ``max_keys``: a dropped
    bucket and a full one are the same thing, so memory stays bounded without changing
    any answer (past that, the oldest half is dropped: lenient, never stricter)."""

    def __init__(self, rate: float, burst: float, max_keys: int = 200_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.max_keys, self.clock = rate, max(burst, 1.0), max_keys, clock
        self._buckets: dict[Hashable, tuple[float, float]] = {}  # key → (tokens, at)

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def _level(self, key: Hashable, now: float) -> float:
        saved = self._buckets.get(key)
        if saved is None:
            return self.burst
        tokens, at = saved
        return min(self.burst, tokens + (now - at) * self.rate)

    def wait_for(self, key: Hashable, n: float = 1.0) -> float:
        """Seconds until ``n`` tokens may be taken for ``key`` (0: now). Takes nothing."""
        if not self.enabled:
            return 0.0
        level = self._level(key, self.clock())
        need = min(n, self.burst)
        return 0.0 if level >= need else (need - level) / self.rate

    def take(self, key: Hashable, n: float) -> None:
        """Take ``n`` tokens (after :meth:`wait_for` said 0)."""
        if not self.enabled:
            return
        now = self.clock()
        self._buckets[key] = (self._level(key, now) - n, now)
        if len(self._buckets) > self.max_keys:
            self._prune(now)

    def _prune(self, now: float) -> None:
        self._buckets = {k: v for k, v in self._buckets.items()
                         if v[0] + (now - v[1]) * self.rate < self.burst}
        if len(self._buckets) > self.max_keys // 2:
            keep = list(self._buckets.items())[len(self._buckets) // 2:]  # the newer half
            self._buckets = dict(keep)

    def __len__(self) -> int:
        return len(self._buckets)


def retry_after(seconds: float) -> int:
    """A Retry-After value: whole seconds, at least 1."""
    return max(1, math.ceil(seconds))


class ConnectionCount:
    """Open connections overall and per client IP. ``admit`` says why one is refused
    (``""``: admitted, and counted until ``release``)."""

    def __init__(self, total: int, per_ip: int, exempt: Callable[[str], bool] = lambda ip: False) -> None:
        self.total_limit, self.per_ip_limit, self.exempt = total, per_ip, exempt
        self.open = 0
        self.by_ip: dict[str, int] = {}

    def admit(self, ip: str) -> str:
        if self.total_limit and self.open >= self.total_limit:
            return "total"
        held = self.by_ip.get(ip, 0)
        if self.per_ip_limit and held >= self.per_ip_limit and not self.exempt(ip):
            return "per_ip"
        self.open += 1
        self.by_ip[ip] = held + 1
        return ""

    def release(self, ip: str) -> None:
        self.open -= 1
        held = self.by_ip.get(ip, 0) - 1
        if held > 0:
            self.by_ip[ip] = held
        else:
            self.by_ip.pop(ip, None)
