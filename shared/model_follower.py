"""Serving the registry's `current` version: the one hot-swap of generator and gateway.

The registry's `current` pointer is the single source of truth; only the trainer writes it
(promotion, rollback). A `ModelUpdatedEvent` is a prompt to look again, not an order: every
replica converges on `current`, at start, on each event and on a periodic check, so a rollback
survives restarts and reaches replicas that missed the event. An event naming a version the
registry never promoted is refused (the consume loop dead-letters it).

Loads are serialized. A new version is loaded beside the old one, smoke-tested, then swapped in
with one reference assignment; requests already running finish on the old engine, which is then
closed. A failed load keeps the old version serving and is retried with back-off.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge

from shared.engine import GenerationEngine, GenerationRequest
from shared.kafka import Received
from shared.registry import ModelRegistry, version_number
from shared.wire import ChatMessage, ModelUpdatedEvent, SamplingParams

log = logging.getLogger(__name__)


class NotPromoted(ValueError):
    """A model-update event names a version the gate never promoted."""


class ModelFollower:
    def __init__(self, registry: ModelRegistry, metrics: CollectorRegistry, service: str, *,
                 engine_factory: Callable[[str], GenerationEngine] | None = None, retry_max_s: float = 300.0) -> None:
        self.registry = registry
        self.engine: GenerationEngine | None = None
        self._factory = engine_factory or (lambda version: GenerationEngine.from_registry(registry, version))
        self._load_lock = threading.Lock()
        self._retry_max_s = retry_max_s
        self._retry_at = 0.0
        self._failures_in_a_row = 0
        self.swaps = Counter(f"prefloop_{service}_model_swaps", "successful model swaps", registry=metrics)
        self.failures = Counter(f"prefloop_{service}_model_load_failures", "failed model loads", registry=metrics)
        self.served = Gauge(f"prefloop_{service}_served_version", "served version number", registry=metrics)

    @property
    def version(self) -> str | None:
        return self.engine.version if self.engine else None

    @property
    def ready(self) -> bool:
        return self.engine is not None

    def converge(self, force: bool = False) -> bool:
        """Serve the registry's current version. True when it is served (now or already)."""
        target = self.registry.current()
        if target is None or target == self.version:
            return target is not None
        if not force and time.monotonic() < self._retry_at:
            return False  # backing off after a failed load of this version
        return self.load(target)

    def load(self, version: str) -> bool:
        """Load `version`, smoke-test it, swap it in. False keeps the old one serving."""
        with self._load_lock:
            if version == self.version:
                return True
            try:
                engine = self._factory(version)
                smoke = engine.generate([GenerationRequest([ChatMessage(role="user", content="Hello")],
                                                           SamplingParams(max_new_tokens=4, seed=0))])
                if smoke[0].error or not smoke[0].candidates:
                    raise RuntimeError(f"smoke generation failed: {smoke[0].error}")
            except Exception as exc:  # noqa: BLE001 - a bad version must never replace a good one
                self.failures.inc()
                self._failures_in_a_row += 1
                delay = min(self._retry_max_s, 2.0 ** self._failures_in_a_row)
                self._retry_at = time.monotonic() + delay
                log.error("could not load model %s: %s; still serving %s (retry in %.0fs)", version, exc,
                          self.version, delay)
                return False
            previous, self.engine = self.engine, engine  # one reference assignment: atomic
            self._failures_in_a_row, self._retry_at = 0, 0.0
            self.swaps.inc()
            self.served.set(version_number(version))
            log.info("now serving %s (was %s)", version, previous.version if previous else None)
        if previous is not None:  # its running requests finish first
            threading.Thread(target=previous.close, name="close-old-engine", daemon=True).start()
        return True

    def on_model_updated(self, batch: list[Received[ModelUpdatedEvent]]) -> None:
        """Consume-loop handler: refuse versions never promoted, then converge on `current`."""
        promoted = self.registry.promoted_versions()
        refused = [r.event.version for r in batch if r.event.version not in promoted]
        if refused:
            raise NotPromoted(f"model update names {', '.join(refused)}, which the registry never promoted; "
                              f"refusing to serve it")
        self.converge(force=True)

    def follow(self, stop: threading.Event, interval_s: float) -> None:
        """Converge at start and then every `interval_s` (a missed event, a failed load)."""
        while True:
            try:
                self.converge()
            except Exception:  # noqa: BLE001 - an unreadable registry must not kill the follower
                log.exception("checking the registry failed")
            if stop.wait(interval_s if self.ready else min(interval_s, 2.0)):
                return

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close(drain=False)
