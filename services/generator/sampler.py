"""Turns a batch of PromptEvents into CandidatesEvents with the current policy, and swaps
to a newly promoted policy between batches (never mid-batch)."""

from __future__ import annotations

import logging
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shared.engine import GenerationEngine, GenerationRequest
from shared.kafka import EventProducer, Received, publish_dead_letters
from shared.registry import ModelRegistry
from shared.topics import Topic
from shared.wire import CandidatesEvent, ModelUpdatedEvent, PromptEvent

log = logging.getLogger(__name__)


def version_number(version: str) -> int:
    return int(version.lstrip("v")) if version.lstrip("v").isdigit() else -1


class CandidateSampler:
    def __init__(self, registry: ModelRegistry, producer: EventProducer, candidates: Topic, prompts_dlq: Topic,
                 metrics: CollectorRegistry, *, max_batch_sequences: int = 16, overflow: str = "truncate_left") -> None:
        self._registry = registry
        self._producer = producer
        self._candidates = candidates
        self._prompts_dlq = prompts_dlq
        self._engine_kw = {"max_batch_size": max_batch_sequences, "overflow": overflow}
        self.engine: GenerationEngine | None = None
        self._pending: GenerationEngine | None = None
        self._lock = threading.Lock()
        self.candidates_total = Counter("prefloop_generator_candidates", "candidates published", registry=metrics)
        self.tokens_total = Counter("prefloop_generator_tokens", "completion tokens generated", registry=metrics)
        self.rejected_total = Counter("prefloop_generator_rejected_prompts", "prompts dead-lettered", registry=metrics)
        self.seconds = Histogram("prefloop_generator_batch_seconds", "generate time per batch", registry=metrics)
        self.version_info = Gauge("prefloop_generator_policy_version", "loaded policy version number", registry=metrics)
        self.load_failures = Counter("prefloop_generator_model_load_failures", "failed model loads", registry=metrics)

    @property
    def ready(self) -> bool:
        return self.engine is not None

    @property
    def version(self) -> str | None:
        return self.engine.version if self.engine else None

    def load(self, version: str | None = None) -> bool:
        """Load a version (default: the registry's current) as the next policy. False if it failed."""
        try:
            engine = GenerationEngine.from_registry(self._registry, version, **self._engine_kw)
        except Exception as exc:  # noqa: BLE001 - a bad version must leave the old one serving
            self.load_failures.inc()
            log.error("could not load model version %s: %s; keeping %s", version, exc, self.version)
            return False
        with self._lock:
            if self.engine is None:
                self.engine = engine
                self.version_info.set(version_number(engine.version))
            else:
                self._pending = engine
        log.info("policy %s loaded", engine.version)
        return True

    def on_model_updated(self, batch: list[Received[ModelUpdatedEvent]]) -> None:
        newest = max(batch, key=lambda r: version_number(r.event.version)).event
        known = max(version_number(self.version or ""), version_number(self._pending.version if self._pending else ""))
        if version_number(newest.version) <= known:
            return  # an old update replayed at start-up
        threading.Thread(target=self.load, args=(newest.version,), name="model-load", daemon=True).start()

    def _swap_if_pending(self) -> GenerationEngine:
        with self._lock:
            if self._pending is not None:
                log.info("swapping policy %s -> %s between batches", self.version, self._pending.version)
                self.engine, self._pending = self._pending, None
                self.version_info.set(version_number(self.engine.version))
            assert self.engine is not None, "handler called before a model was loaded"
            return self.engine

    def handle(self, batch: list[Received[PromptEvent]]) -> None:
        engine = self._swap_if_pending()
        started = time.monotonic()
        results = engine.generate([GenerationRequest(r.event.messages, r.event.sampling, r.event.n) for r in batch])
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
            publish_dead_letters(self._producer, self._prompts_dlq, dead)
            self.rejected_total.inc(len(dead))
        self.candidates_total.inc(sum(len(e.candidates) for e in events))
