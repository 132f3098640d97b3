"""Turns a batch of PromptEvents into CandidatesEvents with the served policy. The batch runs on
the engine read once at its start, so a model swap never splits a batch between versions.

Sampling is seeded from (prompt id, policy version) unless the prompt carries a seed: a prompt
redelivered after a crash or an outage gets the same candidates again (same text, same ids), so
the judge's verdict cache and the ledger's content ids recognise it instead of labelling it twice.
"""

from __future__ import annotations

import hashlib
import logging
import time

from prometheus_client import CollectorRegistry, Counter, Histogram

from shared.engine import GenerationRequest
from shared.kafka import EventProducer, Received
from shared.model_follower import ModelFollower
from shared.topics import Topic
from shared.wire import CandidatesEvent, PromptEvent

log = logging.getLogger(__name__)


def delivery_seed(prompt_id: str, version: str, salt: int = 0) -> int:
    """`salt` (the service's `sampling_seed`) draws another set of candidates for the same prompts and
    version; 0 keeps the draws every earlier deployment made."""
    key = f"{prompt_id}:{version}" + (f":{salt}" if salt else "")
    return int(hashlib.sha256(key.encode()).hexdigest()[:15], 16)


class CandidateSampler:
    def __init__(self, follower: ModelFollower, producer: EventProducer, candidates: Topic, prompts_dlq: Topic,
                 metrics: CollectorRegistry, seed_salt: int = 0) -> None:
        self.follower = follower
        self.seed_salt = seed_salt
        self._producer = producer
        self._candidates = candidates
        self._prompts_dlq = prompts_dlq
        self.candidates_total = Counter("prefloop_generator_candidates", "candidates published", registry=metrics)
        self.tokens_total = Counter("prefloop_generator_tokens", "completion tokens generated", registry=metrics)
        self.rejected_total = Counter("prefloop_generator_rejected_prompts", "prompts dead-lettered", registry=metrics)
        self.seconds = Histogram("prefloop_generator_batch_seconds", "generate time per batch", registry=metrics)

    @property
    def ready(self) -> bool:
        return self.follower.ready

    @property
    def version(self) -> str | None:
        return self.follower.version

    def handle(self, batch: list[Received[PromptEvent]]) -> None:
        engine = self.follower.engine
        if engine is None:
            raise RuntimeError("no policy loaded yet")
        started = time.monotonic()
        requests = []
        for r in batch:
            sampling = r.event.sampling
            if sampling.seed is None:
                seed = delivery_seed(r.event.id, engine.version, self.seed_salt)
                sampling = sampling.model_copy(update={"seed": seed})
            requests.append(GenerationRequest(r.event.messages, sampling, r.event.n))
        results = engine.generate(requests)
        self.seconds.observe(time.monotonic() - started)
        events, dead = [], []
        for received, result in zip(batch, results):
            prompt = received.event
            if result.error:
                dead.append(received.dead_letter("generator", "validation", f"prompt rejected: {result.error}", 1))
                continue
            if result.truncated:
                log.warning("prompt %s truncated from the left to %d tokens", prompt.id, result.prompt_tokens)
            events.append(CandidatesEvent(producer="generator", prompt=prompt, policy_version=engine.version,
                                          prompt_tokens=result.prompt_tokens,
                                          candidates=[*result.candidates, *prompt.extra_candidates]))
            self.tokens_total.inc(sum(c.completion_tokens for c in result.candidates))
        # Publish (acks awaited) before the loop commits the prompts.
        self._producer.publish(self._candidates, events)
        if dead:
            self._producer.publish(self._prompts_dlq, dead)
            self.rejected_total.inc(len(dead))
        self.candidates_total.inc(sum(len(e.candidates) for e in events))
