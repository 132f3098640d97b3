"""The judge's batch handler: judge every CandidatesEvent of a batch concurrently on one
asyncio loop, publish preferences and abstentions, dead-letter failures; the consume loop
commits only after all of that was acknowledged.

An endpoint outage is no event's failure: if any event of the batch met one, nothing is
published and `JudgeEndpointUnavailable` makes the consume loop wait until the breaker's next
probe and run the same batch again (verdicts already obtained come from the cache)."""

from __future__ import annotations

import asyncio
import logging
import threading

from shared.judging.cache import VerdictCache
from shared.judging.openai_backend import OpenAIJudge
from shared.judging.pairwise import PairwiseJudge
from services.judge.settings import JudgeSettings
from shared.judging.stats import JudgeStats
from shared.kafka import EventProducer, Received, Unavailable, publish_dead_letters
from shared.topics import Topic
from shared.wire import CandidatesEvent

log = logging.getLogger(__name__)


class JudgeEndpointUnavailable(Unavailable):
    """The judge endpoint is down: the consume loop waits and runs the batch again."""


class JudgeService:
    def __init__(self, settings: JudgeSettings, producer: EventProducer, stats: JudgeStats, *,
                 preferences: Topic, abstentions: Topic, candidates_dlq: Topic) -> None:
        self.stats = stats
        self.backend = settings.make_backend(on_latency=stats.observe_latency, on_circuit=stats.circuit_changed)
        self.judge = PairwiseJudge(self.backend, VerdictCache(settings.cache_path, settings.cache_max_entries), stats,
                                   min_margin=settings.min_margin)
        self._producer = producer
        self._preferences, self._abstentions, self._dlq = preferences, abstentions, candidates_dlq
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="judge-asyncio", daemon=True)
        self._thread.start()

    def handle(self, batch: list[Received[CandidatesEvent]]) -> None:
        async def decide_all():
            return await asyncio.gather(*(self.judge.decide(r.event) for r in batch))

        outcomes = asyncio.run_coroutine_threadsafe(decide_all(), self._loop).result()
        outages = [o.outage for o in outcomes if o.outage]
        if outages:
            breaker = self.backend.breaker
            raise JudgeEndpointUnavailable(f"{len(outages)} of {len(batch)} events met a judge endpoint outage "
                                           f"(circuit {breaker.state}): {outages[0]}", breaker.seconds_until_probe())
        prefs = [o.preference for o in outcomes if o.preference]
        abstentions = [o.abstention for o in outcomes if o.abstention]
        dead = [r.dead_letter("judge", "handler", f"judge failed: {o.failure}", o.failure.attempts)
                for r, o in zip(batch, outcomes) if o.failure]
        self._producer.publish(self._preferences, prefs)
        self._producer.publish(self._abstentions, abstentions)
        if dead:
            publish_dead_letters(self._producer, self._dlq, dead)
        if isinstance(self.backend, OpenAIJudge):
            self.stats.tokens.labels("prompt").set(self.backend.usage.prompt_tokens)
            self.stats.tokens.labels("completion").set(self.backend.usage.completion_tokens)
            self.stats.malformed.set(self.backend.malformed)

    def status_detail(self) -> dict:
        """`/status` detail: judge health, plus the endpoint's circuit (`closed`, `open`, `half_open`)."""
        breaker = getattr(self.backend, "breaker", None)
        circuit = {"circuit": breaker.state, "circuit_open_for_s": round(breaker.open_for_s(), 1)} if breaker else {}
        return {**self.stats.summary(), **circuit}

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.backend.aclose(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self.judge.cache.close()
