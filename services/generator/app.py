"""Generator service: consumes PromptEvents in batches, publishes CandidatesEvents tagged with
the policy version, reloads on ModelUpdatedEvent."""

from __future__ import annotations

import logging
import threading
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.generator.sampler import CandidateSampler
from services.generator.settings import GeneratorSettings
from shared.kafka import ConsumeLoop, EventProducer
from shared.observability import health_router, new_registry
from shared.engine import GenerationEngine
from shared.model_follower import ModelFollower
from shared.registry import ModelRegistry
from shared.service import LoopThreads
from shared.topics import CANDIDATES, MODEL_UPDATES, PROMPTS
from shared.wire import ServiceStatus

log = logging.getLogger(__name__)


def create_app(settings: GeneratorSettings) -> FastAPI:
    metrics = new_registry()
    prefix = settings.kafka.topic_prefix
    state: dict = {}
    loops = LoopThreads()

    def ready() -> bool:
        sampler = state.get("sampler")
        return bool(sampler and sampler.ready and loops.healthy and state.get("consuming"))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        producer = EventProducer(settings.kafka, "generator")
        registry = ModelRegistry(settings.registry_dir)
        follower = ModelFollower(registry, metrics, "generator", engine_factory=lambda version: GenerationEngine.from_registry(
            registry, version, max_batch_size=settings.max_batch_sequences, overflow=settings.overflow,
            dtype=settings.engine.dtype, native_kernels=settings.engine.native_kernels))
        sampler = CandidateSampler(follower, producer, CANDIDATES.with_prefix(prefix),
                                   PROMPTS.with_prefix(prefix).dead_letter, metrics,
                                   seed_salt=settings.sampling_seed)
        state.update(sampler=sampler)
        loops.run("model-follower", lambda stop: follower.follow(stop, settings.registry_check_s))
        common = dict(kafka=settings.kafka, producer=producer, service="generator", registry=metrics,
                      max_attempts=settings.max_attempts, shutdown_grace_s=settings.shutdown_grace_s)
        # Every instance must see every model update: a group of its own.
        loops.start(ConsumeLoop(MODEL_UPDATES.with_prefix(prefix), group_id=f"{settings.group_id}-updates-{uuid.uuid4().hex[:8]}",
                                handler=follower.on_model_updated, batch_size=16, **common))
        stop = threading.Event()

        def start_consuming() -> None:
            # Prompts are consumed only once a policy is loaded; until then /readyz says no.
            try:
                while not sampler.ready:
                    if stop.wait(0.2):
                        return
                if not stop.is_set():
                    loops.start(ConsumeLoop(PROMPTS.with_prefix(prefix), group_id=settings.group_id,
                                            handler=sampler.handle, batch_size=settings.batch_size,
                                            batch_timeout_ms=settings.batch_timeout_ms,
                                            max_in_flight=settings.max_in_flight_batches, **common))
                    state["consuming"] = True
            except Exception:  # noqa: BLE001 - visible in the log and in /readyz
                log.exception("generator failed to start consuming")

        starter = threading.Thread(target=start_consuming, name="generator-start", daemon=True)
        starter.start()
        try:
            yield
        finally:
            stop.set()
            starter.join(5)
            loops.stop(settings.shutdown_grace_s)
            follower.close()
            producer.close()

    app = FastAPI(title="prefloop generator", lifespan=lifespan)
    app.include_router(health_router(metrics, ready, "generator", failing=loops.dead))

    @app.get("/status")
    def status() -> ServiceStatus:
        sampler = state.get("sampler")
        return ServiceStatus(service="generator", ready=ready(), policy_version=sampler.version if sampler else None)

    return app
