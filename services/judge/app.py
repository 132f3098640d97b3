"""Judge service: CandidatesEvents in, PreferenceEvents / JudgementAbstainedEvents out."""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.judge.service import JudgeService
from services.judge.settings import JudgeSettings
from shared.judging.stats import JudgeStats
from shared.kafka import ConsumeLoop, EventProducer
from shared.observability import health_router, new_registry
from shared.service import LoopThreads
from shared.topics import ABSTENTIONS, CANDIDATES, PREFERENCES
from shared.wire import ServiceStatus

log = logging.getLogger(__name__)


def create_app(settings: JudgeSettings) -> FastAPI:
    metrics = new_registry()
    stats = JudgeStats(metrics)
    prefix = settings.kafka.topic_prefix
    state: dict = {}
    loops = LoopThreads()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        producer = EventProducer(settings.kafka, "judge")
        service = JudgeService(settings, producer, stats, preferences=PREFERENCES.with_prefix(prefix),
                               abstentions=ABSTENTIONS.with_prefix(prefix),
                               candidates_dlq=CANDIDATES.with_prefix(prefix).dead_letter)
        loop = loops.start(ConsumeLoop(CANDIDATES.with_prefix(prefix), group_id=settings.group_id,
                                       handler=service.handle, kafka=settings.kafka, producer=producer,
                                       service="judge", batch_size=settings.batch_size,
                                       batch_timeout_ms=settings.batch_timeout_ms, max_attempts=settings.max_attempts,
                                       shutdown_grace_s=settings.shutdown_grace_s, registry=metrics))
        state.update(loop=loop, service=service)

        def health_log(stop: threading.Event) -> None:
            while not stop.wait(settings.health_log_interval_s):
                stats.log_line()

        loops.run("judge-health", health_log)
        log.info("judge %s ready (backend %s%s)", settings.judge_id, settings.backend,
                 ", an offline stand-in, not an LLM" if settings.backend == "rubric" else f" at {settings.base_url}")
        try:
            yield
        finally:
            loops.stop(settings.shutdown_grace_s)
            stats.log_line()
            service.close()
            producer.close()

    app = FastAPI(title="prefloop judge", lifespan=lifespan)
    app.include_router(health_router(metrics, lambda: "loop" in state and loops.healthy, "judge",
                                     failing=loops.dead))

    @app.get("/status")
    def status() -> ServiceStatus:
        detail = state["service"].status_detail() if "service" in state else stats.summary()
        return ServiceStatus(service="judge", ready="loop" in state and loops.healthy, detail=detail)

    return app
