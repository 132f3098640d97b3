"""A circuit breaker for the judge endpoint, so an outage is waited out instead of draining the
candidates topic into its dead-letter topic.

Which failures are the endpoint's (an outage) and which are a record's own is decided in
`openai_backend.py`: connection errors, timeouts, HTTP 5xx, 429 and 408 are the endpoint's;
a reply that is not a valid verdict, or any other 4xx, is the record's.

    closed ── a request still fails for the endpoint's sake after its retries ──► open
    open: every request fails at once (EndpointUnavailable, no call) until the wait is over;
          the wait starts at `open_s` and doubles with each failed probe up to `max_open_s`
    half-open (the wait is over): each request gets one attempt, a probe; the first reply
          that is not an outage closes the breaker; a failed probe opens it again

The breaker only keeps state; the caller (the judge's consume loop) does the waiting.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class CircuitBreaker:
    def __init__(self, open_s: float = 1.0, max_open_s: float = 60.0, *, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[bool], None] | None = None) -> None:
        self.open_s, self.max_open_s = open_s, max_open_s
        self._clock = clock
        self._on_change = on_change or (lambda is_open: None)
        self._open = False
        self._opened_at = 0.0
        self._probe_at = 0.0
        self._wait_s = open_s
        self.outages = 0
        """times the breaker opened (outage events)"""
        self.last_ok = -math.inf
        """clock time of the last reply that was not an outage"""

    def now(self) -> float:
        return self._clock()

    @property
    def state(self) -> str:
        if not self._open:
            return "closed"
        return "half_open" if self._clock() >= self._probe_at else "open"

    def allows(self) -> bool:
        """May a request be sent now? (closed, or open with the wait over: a probe)"""
        return self.state != "open"

    @property
    def probing(self) -> bool:
        return self.state == "half_open"

    def seconds_until_probe(self) -> float:
        return max(0.0, self._probe_at - self._clock()) if self._open else 0.0

    def open_for_s(self) -> float:
        return self._clock() - self._opened_at if self._open else 0.0

    def answered_since(self, t: float) -> bool:
        """Did the endpoint reply (not an outage) to anything at or after clock time `t`?"""
        return self.last_ok >= t

    def record_ok(self) -> None:
        """The endpoint replied with something other than an outage error: it is up."""
        self.last_ok = self._clock()
        if self._open:
            log.warning("judge endpoint is back after %.1fs; circuit closed", self.last_ok - self._opened_at)
            self._open, self._wait_s = False, self.open_s
            self._on_change(False)

    def record_outage(self, reason: str) -> None:
        """A request failed for the endpoint's sake after its retries, or a probe failed."""
        now = self._clock()
        if not self._open:
            self._open, self._opened_at, self._wait_s = True, now, self.open_s
            self.outages += 1
            log.warning("judge endpoint unavailable (%s); circuit open, probing in %.1fs", reason, self._wait_s)
            self._on_change(True)
        elif now >= self._probe_at:  # a failed probe
            self._wait_s = min(self._wait_s * 2, self.max_open_s)
            log.warning("judge endpoint still unavailable after %.0fs (%s); next probe in %.1fs",
                        now - self._opened_at, reason, self._wait_s)
        else:
            return  # already open and waiting
        self._probe_at = now + self._wait_s
