"""Bearer keys (constant-time comparison, never logged) and per-key rate limits."""

from __future__ import annotations

import hashlib
import hmac
import threading
import time


def key_id(key: str) -> str:
    """A stable, non-reversible name for a key: what is stored and published instead of the key."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class KeyRing:
    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys]

    def __len__(self) -> int:
        return len(self._keys)

    def check(self, authorization: str | None) -> str | None:
        """The key id for a valid `Authorization: Bearer KEY`, else None. Compares against every
        key in constant time so timing does not reveal which or how much matched."""
        if not authorization or not authorization.startswith("Bearer "):
            return None
        given = authorization[7:].strip().encode()
        match = None
        for key in self._keys:
            if hmac.compare_digest(given, key):
                match = key
        return key_id(match.decode()) if match is not None else None


class RateLimiter:
    """Token bucket per key: `per_minute` requests, refilled continuously."""

    def __init__(self, per_minute: int) -> None:
        self.rate = per_minute / 60.0
        self.capacity = float(per_minute)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def acquire(self, key: str) -> float:
        """0 if allowed, else the seconds until one request is allowed again."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens >= 1:
                self._buckets[key] = (tokens - 1, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1 - tokens) / self.rate
