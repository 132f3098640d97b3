"""Judge health: swap consistency, ties/abstentions, failures, length bias, latency, tokens."""

from __future__ import annotations

import logging
import statistics
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

log = logging.getLogger(__name__)


class JudgeStats:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.pairs = Counter("prefloop_judge_pairs", "pairs judged in both orders", ["kind"], registry=registry)
        self.longer_wins = Counter("prefloop_judge_longer_answer_wins", "consistent wins by the longer answer",
                                   registry=registry)
        self.decided_unequal = Counter("prefloop_judge_decided_unequal_length",
                                       "consistent verdicts between answers of different length", registry=registry)
        self.preferences = Counter("prefloop_judge_preferences", "preferences published", registry=registry)
        self.abstained = Counter("prefloop_judge_abstentions", "abstentions by reason", ["reason"], registry=registry)
        self.failures = Counter("prefloop_judge_failures", "events whose verdicts failed after retries",
                                registry=registry)
        self.latency = Histogram("prefloop_judge_request_seconds", "judge request latency", registry=registry,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.tokens = Gauge("prefloop_judge_tokens", "tokens used by the judge endpoint", ["kind"], registry=registry)
        self.position_flips = Counter("prefloop_judge_position_flips",
                                      "pairs whose verdict followed the position (A both times, or B both times)",
                                      ["favoured"], registry=registry)
        self.malformed = Gauge("prefloop_judge_malformed_replies",
                               "endpoint replies that were not a valid verdict (retried, never labelled)",
                               registry=registry)
        self.circuit_open = Gauge("prefloop_judge_circuit_open",
                                  "1 while the judge endpoint's circuit breaker is open (an outage being waited out)",
                                  registry=registry)
        self.endpoint_outages = Counter("prefloop_judge_endpoint_outages",
                                        "times the judge endpoint became unavailable (the breaker opened)",
                                        registry=registry)
        self.swap_consistency = Gauge("prefloop_judge_swap_consistency", "consistent / (consistent + inconsistent)",
                                      registry=registry)

        self._recent: deque[float] = deque(maxlen=2000)

    def circuit_changed(self, is_open: bool) -> None:
        self.circuit_open.set(1 if is_open else 0)
        if is_open:
            self.endpoint_outages.inc()

    def observe_latency(self, seconds: float) -> None:
        self.latency.observe(seconds)
        self._recent.append(seconds)

    def record_pair(self, kind: str, winner: str | None, x: str, y: str, favoured: str | None = None) -> None:
        self.pairs.labels(kind).inc()
        if favoured is not None:
            self.position_flips.labels(favoured).inc()
        if winner is not None and len(x) != len(y):
            self.decided_unequal.inc()
            if winner == max(x, y, key=len):
                self.longer_wins.inc()
        consistent = self.pairs.labels("consistent")._value.get()
        inconsistent = self.pairs.labels("inconsistent")._value.get()
        if consistent + inconsistent:
            self.swap_consistency.set(consistent / (consistent + inconsistent))

    def summary(self) -> dict[str, float]:
        kinds = {k: self.pairs.labels(k)._value.get() for k in ("consistent", "inconsistent", "tie")}
        total = sum(kinds.values()) or 1
        unequal = self.decided_unequal._value.get()
        recent = sorted(self._recent)
        cuts = statistics.quantiles(recent, n=100, method="inclusive") if len(recent) >= 2 else recent * 99
        return {
            "pairs": sum(kinds.values()),
            "swap_consistency": round(kinds["consistent"] / max(1, kinds["consistent"] + kinds["inconsistent"]), 3),
            "tie_rate": round(kinds["tie"] / total, 3),
            "abstain_rate": round((kinds["inconsistent"] + kinds["tie"]) / total, 3),
            "failures": self.failures._value.get(),
            "position_flips": sum(self.position_flips.labels(p)._value.get() for p in ("A", "B")),
            "malformed_replies": self.malformed._value.get(),
            "circuit_open": self.circuit_open._value.get(),
            "endpoint_outages": self.endpoint_outages._value.get(),
            "longer_wins_rate": round(self.longer_wins._value.get() / unequal, 3) if unequal else 0.0,
            "latency_p50_s": round(cuts[49], 3) if cuts else 0.0,
            "latency_p95_s": round(cuts[94], 3) if cuts else 0.0,
            "tokens": self.tokens.labels("prompt")._value.get() + self.tokens.labels("completion")._value.get(),
        }

    def log_line(self) -> None:
        log.info("judge health %s", self.summary(), extra={"judge_health": self.summary()})
