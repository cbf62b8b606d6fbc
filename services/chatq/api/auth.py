"""Failed authentications, limited per source address (a brute-forced API key).

Each source address has a bucket of `CHATQ_API_AUTH_FAILURES_PER_MINUTE` failures, refilled
continuously over a minute; a wrong key takes one. While a source's bucket is empty it is
locked: a key it presents is refused with 429 and Retry-After *before* it is checked,
unless that same key succeeded from that same address before (a client behind the NAT or
proxy an attacker shares keeps working, and the attacker learns nothing about its guesses
until the lock ends). A key that was never used from there waits like any other.

Everything is in this process's memory: a failure costs one hash and the comparisons a
success costs, no Redis call, and a flood of wrong keys cannot load Redis. Each api
process counts its own, so N replicas allow N times the rate. The key itself is never
kept or logged: only its SHA-256 (see deps.hash_key), and only after it succeeded.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable

log = logging.getLogger(__name__)

#: Source addresses remembered at once (least recently seen dropped first), each way.
MAX_SOURCES = 65_536
#: Keys remembered per source as having succeeded from it.
KEYS_PER_SOURCE = 8
#: How long a key that succeeded from a source keeps passing that source's lock, in seconds.
TRUSTED_SECONDS = 3600.0


class AuthGuard:
    """Per source address: a bucket of failed authentications and the keys that worked."""

    def __init__(self, failures_per_minute: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = float(failures_per_minute)
        self.per_second = failures_per_minute / 60.0
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at
        self._trusted: OrderedDict[str, dict[str, float]] = OrderedDict()  # digest -> at

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def _tokens(self, source: str, now: float) -> float:
        tokens, at = self._buckets.get(source, (self.capacity, now))
        return min(self.capacity, tokens + (now - at) * self.per_second)

    def refused(self, source: str, digest: str) -> float:
        """Seconds the source must wait before this key is checked; 0 when it may be."""
        if not self.enabled or source not in self._buckets:
            return 0.0
        now = self.clock()
        tokens = self._tokens(source, now)
        if tokens >= 1.0:
            return 0.0
        if now - self._trusted.get(source, {}).get(digest, -math.inf) < TRUSTED_SECONDS:
            return 0.0
        return (1.0 - tokens) / self.per_second

    def failed(self, source: str) -> None:
        """A wrong key from this source: take one from its bucket."""
        if not self.enabled:
            return
        now = self.clock()
        before = self._tokens(source, now)
        self._buckets[source] = (max(before - 1.0, 0.0), now)
        self._buckets.move_to_end(source)
        if len(self._buckets) > MAX_SOURCES:
            self._buckets.popitem(last=False)
        if before - 1.0 < 1.0 <= before:  # this failure locked it: said once per lock
            log.warning("%d failed authentications a minute from %s: its unknown keys are "
                        "refused (429) for %.0f s", self.capacity, source, 1 / self.per_second)

    def succeeded(self, source: str, digest: str) -> None:
        """This key worked from this source: it passes the source's lock from now on."""
        if not self.enabled:
            return
        keys = self._trusted.get(source)
        if keys is None:
            keys = self._trusted[source] = {}
            if len(self._trusted) > MAX_SOURCES:
                self._trusted.popitem(last=False)
        else:
            self._trusted.move_to_end(source)
        keys.pop(digest, None)
        keys[digest] = self.clock()
        while len(keys) > KEYS_PER_SOURCE:
            del keys[next(iter(keys))]


def retry_after(seconds: float) -> str:
    """A Retry-After value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
