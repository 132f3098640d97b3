"""The judge's batch handler: judge every CandidatesEvent of a batch concurrently on one
asyncio loop, publish preferences and abstentions, dead-letter failures; the consume loop
commits only after all of that was acknowledged.

An endpoint outage is no event's failure: if any event of the batch met one, nothing is
published and `JudgeEndpointUnavailable` makes the consume loop wait until the breaker's next
probe and run the same batch again; events already decided are kept, not judged again."""

from __future__ import annotations

import asyncio
import logging
import threading

from shared.judging.cache import VerdictCache
from shared.judging.openai_backend import OpenAIJudge
from shared.judging.pairwise import Outcome, PairwiseJudge
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
                                   min_margin=settings.min_margin,
                                   match_finish=settings.match_finish)
        self._producer = producer
        self._preferences, self._abstentions, self._dlq = preferences, abstentions, candidates_dlq
        self._decided: dict[str, Outcome] = {}
        """outcomes of the batch being handled, kept while it waits for the endpoint or the broker"""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="judge-asyncio", daemon=True)
        self._thread.start()

    def handle(self, batch: list[Received[CandidatesEvent]]) -> None:
        ids = {r.event.id for r in batch}
        self._decided = {k: o for k, o in self._decided.items() if k in ids}  # held only for a batch run again
        todo = list({r.event.id: r.event for r in batch if r.event.id not in self._decided}.values())

        async def decide_all():
            return await asyncio.gather(*(self.judge.decide(e) for e in todo))

        outages = []
        for event, outcome in zip(todo, asyncio.run_coroutine_threadsafe(decide_all(), self._loop).result()):
            if outcome.outage:
                outages.append(outcome.outage)
            else:
                self._decided[event.id] = outcome  # not judged (or counted) again when the batch runs again
        if outages:
            breaker = self.backend.breaker
            raise JudgeEndpointUnavailable(f"{len(outages)} of {len(batch)} events met a judge endpoint outage "
                                           f"(circuit {breaker.state}): {outages[0]}", breaker.seconds_until_probe())
        outcomes = [self._decided[r.event.id] for r in batch]
        prefs = [o.preference for o in outcomes if o.preference]
        abstentions = [o.abstention for o in outcomes if o.abstention]
        dead = [r.dead_letter("judge", "handler", f"judge failed: {o.failure}", o.failure.attempts)
                for r, o in zip(batch, outcomes) if o.failure]
        self._producer.publish(self._preferences, prefs)
        self._producer.publish(self._abstentions, abstentions)
        if dead:
            publish_dead_letters(self._producer, self._dlq, dead)
        self._decided.clear()
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
