"""Trainer service: PreferenceEvents -> durable ledger (commit after fsync); a trigger starts
one DPO run at a time in the background while consumption goes on."""

from __future__ import annotations

import hmac
import logging
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Header, HTTPException, status
from prometheus_client import Counter

from services.trainer.console import ConsoleQueries
from services.trainer.console_api import install_console
from services.trainer.dead_letter_watch import DeadLetterWatch
from services.trainer.ledger import PreferenceLedger
from services.trainer.review import ReviewStore
from services.trainer.runner import TrainingRunner
from services.trainer.settings import TrainerSettings
from services.trainer.trigger import OPERATOR_TRIGGER
from shared.kafka import ConsumeLoop, EventProducer, Received, publish_dead_letters
from shared.observability import health_router, new_registry
from shared.outbox import Outbox
from shared.registry import ModelRegistry, RegistryError
from shared.service import LoopThreads
from shared.topics import ABSTENTIONS, MODEL_UPDATES, PREFERENCES
from shared.wire import PreferenceEvent, RollbackRequest, RollbackResult, RunRecord, ServiceStatus, TrainAccepted

log = logging.getLogger(__name__)


class LedgerWriter:
    """The consume handler: reject what must not become a label, append the rest durably."""

    def __init__(self, ledger: PreferenceLedger, producer: EventProducer, dlq, max_chars: int) -> None:
        self.ledger, self._producer, self._dlq, self._max = ledger, producer, dlq, max_chars

    def handle(self, batch: list[Received[PreferenceEvent]]) -> None:
        keep, dead = [], []
        for r in batch:
            e = r.event
            longest = max(len(e.chosen), len(e.rejected), sum(len(m.content) for m in e.prompt_messages))
            if longest > self._max:
                dead.append(r.dead_letter("trainer", "validation",
                                          f"preference text of {longest} chars exceeds the limit of {self._max}", 1))
            else:
                keep.append(e)
        added = self.ledger.append(keep)  # fsynced before returning; only then does the loop commit
        if dead:
            publish_dead_letters(self._producer, self._dlq, dead)
        log.info("ledger +%d new pairs (%d duplicates, %d rejected), %d total", added, len(keep) - added,
                 len(dead), len(self.ledger))


def create_app(settings: TrainerSettings) -> FastAPI:
    metrics = new_registry()
    prefix = settings.kafka.topic_prefix
    state: dict = {}
    loops = LoopThreads()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        producer = EventProducer(settings.kafka, "trainer")
        ledger = PreferenceLedger(settings.ledger_dir)
        Counter("prefloop_trainer_ledger_skipped_lines", "unreadable ledger lines skipped when the ledger was loaded",
                registry=metrics).inc(len(ledger.skipped))
        updates = MODEL_UPDATES.with_prefix(prefix)
        outbox = Outbox(Path(settings.runs_dir) / "outbox.sqlite", [updates], metrics, "model-updates")
        runner = TrainingRunner(settings, ledger, ModelRegistry(settings.registry_dir), outbox, updates, metrics)
        writer = LedgerWriter(ledger, producer, PREFERENCES.with_prefix(prefix).dead_letter, settings.max_text_chars)

        def consume(topic, group_id: str, handler) -> None:
            loops.start(ConsumeLoop(topic, group_id=group_id, handler=handler, kafka=settings.kafka, producer=producer,
                                    service="trainer", batch_size=settings.batch_size,
                                    batch_timeout_ms=settings.batch_timeout_ms, max_attempts=settings.max_attempts,
                                    shutdown_grace_s=settings.shutdown_grace_s, registry=metrics))
        consume(PREFERENCES.with_prefix(prefix), settings.group_id, writer.handle)

        def trigger_loop(stop: threading.Event) -> None:
            while not stop.wait(settings.check_interval_s):
                try:
                    if not runner.busy and (reason := runner.trigger_reason()):
                        runner.start_run(reason)
                except Exception:  # noqa: BLE001 - the trigger must survive a bad check
                    log.exception("trigger check failed")

        # its own client, so a broker outage blocks only the announcements (max_block_ms)
        announcer = EventProducer(settings.kafka, "trainer", max_block_ms=5000)
        loops.run("trainer-trigger", trigger_loop)
        loops.run("model-update-outbox", lambda stop: outbox.relay_until(stop, announcer, settings.announce_retry_s))
        # the console: abstentions -> review queue; human picks -> review outbox -> preferences topic -> ledger
        preferences = PREFERENCES.with_prefix(prefix)
        review_outbox = Outbox(Path(settings.ledger_dir) / "review-outbox.sqlite", [preferences], metrics, "review")
        review = ReviewStore(Path(settings.ledger_dir) / "review.sqlite", review_outbox, preferences)
        consume(ABSTENTIONS.with_prefix(prefix), f"{settings.group_id}-review", review.handle)
        loops.run("review-outbox", lambda stop: review_outbox.relay_until(stop, announcer, settings.announce_retry_s))
        dead_letters = DeadLetterWatch(settings.kafka)
        loops.run("dead-letter-watch", dead_letters.run)
        state.update(runner=runner, ledger=ledger, queries=ConsoleQueries(runner, ledger, review, dead_letters))
        try:
            yield
        finally:
            loops.stop(settings.shutdown_grace_s)
            announcer.close()
            producer.close()
            outbox.close()
            review_outbox.close()
            review.close()

    app = FastAPI(title="prefloop trainer", lifespan=lifespan)

    def ready() -> bool:
        return "runner" in state and loops.healthy

    def needs_operator() -> list[str]:
        trigger = state["runner"].trigger_status() if "runner" in state else None
        return [f"{trigger.detail} (last error: {trigger.last_error})"] if trigger and trigger.state == "halted" else []

    app.include_router(health_router(metrics, ready, "trainer", failing=loops.dead, degraded=needs_operator))

    @app.get("/runs")
    def runs() -> list[RunRecord]:
        return state["runner"].runs()

    @app.get("/status")
    def status_() -> ServiceStatus:
        runner = state["runner"]
        return ServiceStatus(service="trainer", ready=ready(), policy_version=runner.registry.current(),
                             detail={"ledger_pairs": len(state["ledger"]), "new_pairs": len(runner.new_pair_ids()),
                                     "training": int(runner.busy), "announcements_queued": len(runner.outbox)},
                             trigger=runner.trigger_status())

    def require_admin(authorization: Annotated[str | None, Header()] = None) -> None:
        if not settings.admin_key:
            raise HTTPException(503, "admin routes are disabled: set PREFLOOP_TRAINER_ADMIN_KEY")
        token = (authorization or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(token.encode(), settings.admin_key.encode()):
            raise HTTPException(401, "a valid admin bearer key is required")

    @app.post("/train", status_code=status.HTTP_202_ACCEPTED, responses={401: {}, 409: {}, 503: {}},
              dependencies=[Depends(require_admin)])
    def train() -> TrainAccepted:
        """Start a run now: also after failures, and it resets the failure count (see trigger.py)."""
        runner = state["runner"]
        if not runner.new_pair_ids():
            raise HTTPException(409, "no new pairs to train on")
        if not runner.start_run(OPERATOR_TRIGGER):
            raise HTTPException(409, "a training run is already in progress")
        return TrainAccepted(accepted=True, detail="training run started")

    @app.post("/admin/rollback", responses={401: {}, 409: {}, 503: {}}, dependencies=[Depends(require_admin)])
    def rollback(body: RollbackRequest | None = None) -> RollbackResult:
        """Point the registry's current back at an earlier promoted version and announce it; every
        generator and gateway replica converges on it (also after restarts)."""
        runner = state["runner"]
        previous = runner.registry.current()
        try:
            current = runner.rollback((body or RollbackRequest()).version)
        except RegistryError as exc:
            raise HTTPException(409, str(exc)) from exc
        return RollbackResult(current=current, previous=previous, detail=f"rolled back from {previous} to {current}; "
                              "the announcement is queued in the trainer's outbox")

    install_console(app, settings, lambda: state)
    return app
