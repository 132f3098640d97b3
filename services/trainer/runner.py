"""One training run at a time: select pairs (new + replay), DPO, merge, register, gate,
promote and announce (or record why not). Runs are recorded in `runs.jsonl` (append-only;
the last record of a run id wins), so a restarted trainer knows which pairs are new: only
the pairs a promoted or rejected run trained on (or dropped as stale) are used up; pairs of a
failed run, of one that never finished (crash), or cut by `max_pairs_per_run` stay new.

A promotion is announced through a durable outbox (`<runs_dir>/outbox.sqlite`, relayed by the
app's thread): promote, queue the ModelUpdatedEvent, record the run promoted; the event goes out
whenever the broker takes it, also after a restart. A run a previous process left `running` is
recorded on start: promoted (and announced) if its version became current, else failed.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import traceback
import uuid
from dataclasses import fields
from datetime import datetime, timezone
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import BaseModel

from services.trainer.dpo import DPOJobConfig, choose_reference, merge_adapter, run_dpo
from services.trainer.drift_budget import MonitorReadings, no_room
from services.trainer.gate import Gate
from services.trainer.ledger import PreferenceLedger, to_trl_row
from services.trainer.recipes import for_base_model, recipe_name
from services.trainer.reference_cache import ReferenceCache
from services.trainer.run_log import Phases, RunLog
from services.trainer.settings import TrainerSettings
from services.trainer.trigger import trigger_status
from shared.outbox import Outbox
from shared.registry import ModelRegistry, version_number
from shared.topics import Topic
from shared.torch_thread import on_torch_thread
from shared.wire import EvalSummary, ModelUpdatedEvent, PreferenceEvent, RunRecord, TriggerStatus

log = logging.getLogger(__name__)


def run_settings(settings: TrainerSettings, base_model: str | None, *, first_round: bool = False
                 ) -> tuple[TrainerSettings, DPOJobConfig]:
    """A run's settings (the recipe `base_model` names, in the fields the operator left unset) and its
    DPO job. `base_model` is a recipe's name: `recipe_name(meta.base_model, meta.source)`. A first round
    (a parent DPO has not trained) has `first_round_max_drift` as its drift budget, if set."""
    tuned, filled = for_base_model(settings, base_model)
    if filled:
        log.info("%s's recipe sets %s (services/trainer/recipes.py)", base_model,
                 ", ".join(f"{k}={getattr(tuned, k)}" for k in filled))
    # TrainerSettings carries the DPO fields under the same names.
    config = DPOJobConfig(**{f.name: getattr(tuned, f.name) for f in fields(DPOJobConfig) if hasattr(tuned, f.name)},
                          recipe=base_model if filled else None)
    if first_round and tuned.first_round_max_drift is not None:
        config.max_drift = tuned.first_round_max_drift
    return tuned, config


class Selection(BaseModel):
    """What one run trains on, and which new pairs it uses up."""

    new: list[PreferenceEvent]
    replay: list[PreferenceEvent]
    heldout: list[PreferenceEvent]
    stale_ids: list[str]
    """New pairs dropped as too old (`stale_versions`): used up without training."""

    @property
    def train(self) -> list[PreferenceEvent]:
        """In pair-id order: the ledger's order is the order pairs arrived in, which timing decides, and the
        DPO's batches must not depend on it (a seeded run repeats itself)."""
        return sorted(self.new + self.replay, key=lambda e: e.id)


class TrainingRunner:
    def __init__(self, settings: TrainerSettings, ledger: PreferenceLedger, registry: ModelRegistry,
                 outbox: Outbox, model_updates: Topic, metrics: CollectorRegistry) -> None:
        self.settings = settings
        self.ledger = ledger
        self.registry = registry
        self.outbox = outbox
        self._model_updates = model_updates
        self.runs_dir = Path(settings.runs_dir)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.run_log = RunLog(self.runs_dir / "runs.jsonl")
        self._lock = threading.Lock()
        self._registry_lock = threading.Lock()  # promotion and rollback move `current` one at a time
        self.reference_cache = ReferenceCache(self.runs_dir / "reference_logps.sqlite")
        self.gate = Gate(settings, registry, self.runs_dir)
        self._reconcile_interrupted()
        # the interval trigger counts from the last finished run, across restarts (wall clock)
        finished = [r.finished.timestamp() for r in self.runs() if r.finished is not None]
        self._last_run_at = max(finished, default=time.time())
        self.runs_total = Counter("prefloop_trainer_runs", "training runs by outcome", ["status"], registry=metrics)
        self.last_duration = Gauge("prefloop_trainer_last_run_seconds", "duration of the last run", registry=metrics)
        self.ledger_size = Gauge("prefloop_trainer_ledger_pairs", "pairs in the ledger", registry=metrics)
        self.pending = Gauge("prefloop_trainer_pairs_since_last_run", "new pairs not yet trained on",
                             registry=metrics)
        self.consecutive_failures = Gauge("prefloop_trainer_consecutive_failed_runs",
                                          "failed runs since the last promoted/rejected or operator-started one",
                                          registry=metrics)
        self.halted = Gauge("prefloop_trainer_trigger_halted", "1 while automatic training is halted after "
                            "max_consecutive_failures failed runs", registry=metrics)

    # -- run history -----------------------------------------------------------
    def runs(self) -> list[RunRecord]:
        return self.run_log.runs()

    def _record(self, record: RunRecord) -> None:
        self.run_log.record(record)

    def _reconcile_interrupted(self) -> None:
        """Runs left `running` by a previous process: promoted if their version became current (then
        announce it: the process may have died before queueing the event), else failed."""
        interrupted = {r.run_id: r for r in self.runs() if r.status == "running"}
        if not interrupted:
            return
        produced = {m.metrics.get("run_id"): m for m in self.registry.list()}
        promoted = set(self.registry.promotion_stack())
        now = datetime.now(timezone.utc)
        for run_id, record in interrupted.items():
            meta = produced.get(run_id)
            if meta is not None and meta.version in promoted:
                summary = EvalSummary.model_validate(meta.metrics.get("eval_summary") or {})
                self._announce(meta.version, record.parent, summary)
                record = record.model_copy(update={"status": "promoted", "version": meta.version, "finished": now,
                                                   "eval_summary": summary})
            else:
                record = record.model_copy(update={"status": "failed", "finished": now,
                                                   "error": "interrupted: the trainer stopped during this run"})
            log.warning("run %s was interrupted by a restart; recorded as %s", run_id, record.status)
            self._record(record)

    def _announce(self, version: str, parent: str | None, summary: EvalSummary) -> None:
        self.outbox.put([(self._model_updates, ModelUpdatedEvent(
            producer="trainer", version=version, parent=parent, kind="dpo", location=str(self.registry.root / version),
            eval_summary=summary))])

    def rollback(self, version: str | None) -> str:
        """Make an earlier promoted version current again and announce it (durably). Held against
        promotions: a run that finishes later sees that its parent is no longer current."""
        with self._registry_lock:
            target = self.registry.rollback(version)
            meta = self.registry.get(target)
            self.outbox.put([(self._model_updates, ModelUpdatedEvent(
                producer="trainer", version=target, parent=meta.parent, kind=meta.kind,
                location=str(self.registry.root / target)))])
        log.warning("rolled back to %s", target)
        return target

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    # -- trigger -------------------------------------------------------------
    def new_pair_ids(self) -> list[str]:
        used = {i for r in self.runs() if r.status in ("promoted", "rejected")
                for i in r.new_pair_ids + r.stale_pair_ids}
        return [i for i in self.ledger.ids if i not in used and self.ledger.split_of(i) == "train"]

    def trigger_status(self) -> TriggerStatus:
        status = trigger_status(self.runs(), self.settings, self.busy)
        self.consecutive_failures.set(status.consecutive_failures)
        self.halted.set(int(status.state == "halted"))
        return status

    def trigger_reason(self) -> str | None:
        """Why an automatic run should start now, or None (nothing to do, backing off, halted)."""
        fresh = len(self.new_pair_ids())
        self.ledger_size.set(len(self.ledger))
        self.pending.set(fresh)
        if self.trigger_status().state != "idle":
            return None
        if fresh >= self.settings.min_new_pairs:
            return f"{fresh} new pairs >= {self.settings.min_new_pairs}"
        if fresh and time.time() - self._last_run_at >= self.settings.train_interval_min * 60:
            return f"{fresh} new pairs and {self.settings.train_interval_min} min since the last run"
        return None

    def start_run(self, trigger: str) -> bool:
        """Start a run in the background unless one is running. False if busy."""
        if not self._lock.acquire(blocking=False):
            return False
        threading.Thread(target=self._run_locked, args=(trigger,), name="training-run", daemon=True).start()
        return True

    def _run_locked(self, trigger: str) -> None:
        try:
            self.run(trigger)
        finally:
            self._last_run_at = time.time()
            self._lock.release()

    # -- the run ---------------------------------------------------------------
    def _select(self, new_ids: list[str], parent: str) -> Selection:
        events = {e.id: e for e in self.ledger.events()}
        heldout = [events[i] for i in self.ledger.ids if i in events and events[i].split == "eval"]

        def fresh_enough(e: PreferenceEvent) -> bool:
            k = self.settings.stale_versions
            return not k or version_number(e.policy_version) >= version_number(parent) - k
        new = [events[i] for i in new_ids if i in events and events[i].split == "train"]
        stale = [e.id for e in new if not fresh_enough(e)]
        new = [e for e in new if fresh_enough(e)][-self.settings.max_pairs_per_run:]  # the newest; the rest wait
        new_set = set(new_ids)
        older = sorted((e for i, e in events.items() if e.split == "train" and i not in new_set and fresh_enough(e)),
                       key=lambda e: e.id)  # as `train`: the seeded sample must not depend on arrival order
        rng = random.Random(f"{self.settings.seed}-{len(self.runs())}")
        replay = rng.sample(older, min(len(older), int(len(new) * self.settings.replay_fraction)))
        return Selection(new=new, replay=replay, stale_ids=stale,
                         heldout=heldout[-self.settings.heldout_pairs:] if self.settings.heldout_pairs else [])

    def run(self, trigger: str) -> RunRecord:
        s = self.settings
        started = time.monotonic()
        run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        run_dir = self.runs_dir / run_id
        new_ids = self.new_pair_ids()
        parent = self.registry.current()
        record = RunRecord(run_id=run_id, status="running", trigger=trigger, started=datetime.now(timezone.utc),
                           parent=parent, run_dir=str(run_dir))
        self._record(record)
        log.info("run %s started (%s), parent %s", run_id, trigger, parent)
        phases = Phases()
        try:
            if parent is None:
                raise RuntimeError("the registry has no current version to train from")
            selection = self._select(new_ids, parent)
            train, heldout = selection.train, selection.heldout
            if not train:
                raise RuntimeError("no trainable pairs (all new pairs are eval-split or stale)")
            snapshot = self.ledger.snapshot(e.id for e in train)
            record = record.model_copy(update={"snapshot_id": snapshot, "pairs_new": len(selection.new),
                                               "pairs_replay": len(selection.replay),
                                               "new_pair_ids": [e.id for e in selection.new],
                                               "stale_pair_ids": selection.stale_ids})
            parent_meta = self.registry.get(parent)
            parent_path = self.registry.verified_path(parent)
            recipe = recipe_name(parent_meta.base_model, parent_meta.source)
            tuned, config = run_settings(s, recipe, first_round=parent_meta.kind != "dpo")
            reference = choose_reference(self.registry, parent, tuned.reference)
            readings = MonitorReadings(self.gate.answers, self.registry.weights_id(parent),
                                       self.registry.weights_id(reference.version) if reference else "")
            dpo = phases.timed("dpo", on_torch_thread, run_dpo, parent_path, [to_trl_row(e) for e in train], config,
                               run_dir, recipe, parent=parent, reference_cache=self.reference_cache,
                               reference=reference, readings=readings)
            if dpo.steps == 0:  # the drift budget kept nothing: the adapter is the parent itself
                reason = no_room(dpo.history, config.max_drift)
                log.warning("run %s: rejected before the gate: %s", run_id, reason)
                return self._finish(record.model_copy(update={"status": "rejected", "eval_summary": EvalSummary(
                    pairs_trained=len(train), gate_reasons=[reason])}), run_dir, started, phases)
            merged, tok = phases.timed("merge", on_torch_thread, merge_adapter, parent_path, dpo.adapter_dir)
            meta = phases.timed("save", on_torch_thread, self.registry.save, merged, tok, kind="dpo", parent=parent,
                                base_model=parent_meta.base_model, training_config=dpo.config, snapshot_id=snapshot,
                                metrics={"dpo_history": dpo.history, "dpo_steps": dpo.steps,
                                         "dpo_seconds": dpo.seconds, "run_id": run_id})
            del merged
            if dpo.drift_monitor:  # the next round's drift budget starts from this version
                readings.keep(self.registry.weights_id(meta.version), dpo.drift_monitor)
            # Both from the registry: the same device and dtype, the weights exactly as they will be served.
            gate = phases.timed("gate", self.gate.evaluate, meta.version, parent, heldout=heldout,
                                history=dpo.history, pairs_trained=len(train), settings=tuned)
            gate.comparison.write_blinded_csv(run_dir / "blinded_eval.csv")
            self.registry.annotate(meta.version, eval_summary=gate.summary.model_dump(mode="json"),
                                   gate_details=gate.details)
            with self._registry_lock:
                moved = self.registry.current() != parent
                if moved:  # an operator rolled back while this run trained: its parent is not served any more
                    gate.summary = gate.summary.model_copy(update={
                        "promoted": False, "gate_reasons": [*gate.summary.gate_reasons, f"the registry moved from "
                                                            f"{parent} to {self.registry.current()} during the run"]})
                    gate.passed = False
                if gate.passed:
                    self.registry.promote(meta.version)
                    self._announce(meta.version, parent, gate.summary)  # durable; the relay publishes it
            if gate.passed:
                log.info("run %s: promoted %s (win rate %.3f)", run_id, meta.version, gate.summary.win_rate_vs_parent)
            else:
                log.warning("run %s: %s not promoted: %s", run_id, meta.version, "; ".join(gate.summary.gate_reasons))
            record = record.model_copy(update={"status": "promoted" if gate.passed else "rejected",
                                               "version": meta.version, "eval_summary": gate.summary})
        except Exception as exc:  # noqa: BLE001 - a failed run is recorded; the service keeps consuming
            log.exception("run %s failed", run_id)
            (run_dir / "error.txt").parent.mkdir(parents=True, exist_ok=True)
            (run_dir / "error.txt").write_text(traceback.format_exc())
            record = record.model_copy(update={"status": "failed", "error": f"{type(exc).__name__}: {exc}"})
        return self._finish(record, run_dir, started, phases)

    def _finish(self, record: RunRecord, run_dir: Path, started: float, phases: Phases) -> RunRecord:
        seconds = round(time.monotonic() - started, 1)
        log.info("run %s took %.1f s (%s)", record.run_id, seconds,
                 ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()))
        record = record.model_copy(update={"finished": datetime.now(timezone.utc), "seconds": seconds,
                                           "phases": phases})
        self._record(record)
        self.runs_total.labels(record.status).inc()
        self.last_duration.set(seconds)
        (run_dir / "run.json").parent.mkdir(parents=True, exist_ok=True)
        (run_dir / "run.json").write_text(json.dumps(record.model_dump(mode="json"), indent=2))
        return record
