"""One training run at a time: select pairs (new + replay), DPO, merge, register, gate,
promote and announce (or record why not). Runs are recorded in `runs.jsonl` (append-only;
the last record of a run id wins), so a restarted trainer knows which pairs are new: pairs
of a run that never finished (crash) count as new again and are trained on after restart.
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

from services.trainer.bootstrap import load_conversations
from services.trainer.dpo import DPOJobConfig, merge_adapter, run_dpo
from services.trainer.gate import evaluate_gate
from services.trainer.ledger import PreferenceLedger, to_trl_row
from services.trainer.settings import TrainerSettings
from shared.engine import GenerationEngine
from shared.evaluation import EvalPrompt
from shared.judging.pairwise import PairwiseJudge
from shared.judging.stats import JudgeStats
from shared.kafka import EventProducer
from shared.observability import new_registry
from shared.prompts import DEMO_PROMPTS, build_events
from shared.registry import ModelRegistry
from shared.topics import Topic
from shared.wire import ModelUpdatedEvent, PreferenceEvent, RunRecord

log = logging.getLogger(__name__)


def version_number(version: str | None) -> int:
    return int(version[1:]) if version and version[1:].isdigit() else 0


class TrainingRunner:
    def __init__(self, settings: TrainerSettings, ledger: PreferenceLedger, registry: ModelRegistry,
                 producer: EventProducer, model_updates: Topic, metrics: CollectorRegistry) -> None:
        self.settings = settings
        self.ledger = ledger
        self.registry = registry
        self._producer = producer
        self._model_updates = model_updates
        self.runs_dir = Path(settings.runs_dir)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self._runs_file = self.runs_dir / "runs.jsonl"
        self._lock = threading.Lock()
        # the interval trigger counts from the last finished run, across restarts (wall clock)
        finished = [r.finished.timestamp() for r in self.runs() if r.finished is not None]
        self._last_run_at = max(finished, default=time.time())
        self.runs_total = Counter("prefloop_trainer_runs", "training runs by outcome", ["status"], registry=metrics)
        self.last_duration = Gauge("prefloop_trainer_last_run_seconds", "duration of the last run", registry=metrics)
        self.ledger_size = Gauge("prefloop_trainer_ledger_pairs", "pairs in the ledger", registry=metrics)
        self.pending = Gauge("prefloop_trainer_pairs_since_last_run", "new pairs not yet trained on",
                             registry=metrics)

    # -- run history -----------------------------------------------------------
    def runs(self) -> list[RunRecord]:
        if not self._runs_file.exists():
            return []
        latest: dict[str, RunRecord] = {}
        for line in self._runs_file.read_text().splitlines():
            if line.strip():
                record = RunRecord.model_validate_json(line)
                latest[record.run_id] = record
        return list(latest.values())

    def _record(self, record: RunRecord) -> None:
        with open(self._runs_file, "a") as f:
            f.write(record.model_dump_json() + "\n")

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    # -- trigger -------------------------------------------------------------
    def new_pair_ids(self) -> list[str]:
        trained = {i for r in self.runs() if r.status in ("promoted", "rejected") for i in r.new_pair_ids}
        return [i for i in self.ledger.ids if i not in trained and self.ledger.split_of(i) == "train"]

    def trigger_reason(self) -> str | None:
        fresh = len(self.new_pair_ids())
        self.ledger_size.set(len(self.ledger))
        self.pending.set(fresh)
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
    def _select(self, new_ids: list[str], parent: str) -> tuple[list[PreferenceEvent], int, list[PreferenceEvent]]:
        events = {e.id: e for e in self.ledger.events()}
        heldout = [events[i] for i in self.ledger.ids if i in events and events[i].split == "eval"]
        def fresh_enough(e: PreferenceEvent) -> bool:
            k = self.settings.stale_versions
            return not k or version_number(e.policy_version) >= version_number(parent) - k
        new = [events[i] for i in new_ids if i in events and events[i].split == "train" and fresh_enough(events[i])]
        new = new[-self.settings.max_pairs_per_run:]
        older = [e for i, e in events.items() if e.split == "train" and i not in set(new_ids) and fresh_enough(e)]
        rng = random.Random(f"{self.settings.seed}-{len(self.runs())}")
        replay = rng.sample(older, min(len(older), int(len(new) * self.settings.replay_fraction)))
        return new + replay, len(replay), (heldout[-self.settings.heldout_pairs:] if self.settings.heldout_pairs else [])

    def eval_prompts(self, heldout: list[PreferenceEvent]) -> list[EvalPrompt]:
        seen, prompts = set(), []
        for e in heldout:
            if e.prompt_id not in seen:
                seen.add(e.prompt_id)
                prompts.append(EvalPrompt(e.prompt_messages))
        if len(prompts) < self.settings.eval_prompts:
            shipped, _ = build_events(str(DEMO_PROMPTS), eval_fraction=0.2)
            prompts += [EvalPrompt(e.messages, e.reference_answer) for e in shipped
                        if e.split == "eval" and e.id not in seen]
        return prompts[: self.settings.eval_prompts]

    def run(self, trigger: str) -> RunRecord:
        s = self.settings
        started = time.monotonic()
        run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        run_dir = self.runs_dir / run_id
        new_ids = self.new_pair_ids()
        parent = self.registry.current()
        record = RunRecord(run_id=run_id, status="running", trigger=trigger, started=datetime.now(timezone.utc),
                           parent=parent, new_pair_ids=new_ids, run_dir=str(run_dir))
        self._record(record)
        log.info("run %s started (%s), parent %s", run_id, trigger, parent)
        try:
            if parent is None:
                raise RuntimeError("the registry has no current version to train from")
            train, n_replay, heldout = self._select(new_ids, parent)
            if not train:
                raise RuntimeError("no trainable pairs (all new pairs are eval-split or stale)")
            snapshot = self.ledger.snapshot(e.id for e in train)
            record = record.model_copy(update={"snapshot_id": snapshot, "pairs_new": len(train) - n_replay,
                                               "pairs_replay": n_replay})
            parent_meta = self.registry.get(parent)
            parent_path = self.registry.verified_path(parent)
            # TrainerSettings carries the DPO fields under the same names.
            config = DPOJobConfig(**{f.name: getattr(s, f.name) for f in fields(DPOJobConfig) if hasattr(s, f.name)})
            dpo = run_dpo(parent_path, [to_trl_row(e) for e in train], config, run_dir, parent_meta.base_model)
            merged, tok = merge_adapter(parent_path, dpo.adapter_dir)
            meta = self.registry.save(merged, tok, kind="dpo", parent=parent, base_model=parent_meta.base_model,
                                      training_config=dpo.config, snapshot_id=snapshot,
                                      metrics={"dpo_history": dpo.history, "dpo_steps": dpo.steps,
                                               "dpo_seconds": dpo.seconds, "run_id": run_id})
            del merged
            # Both from the registry: the same device and dtype, the weights exactly as they will be served.
            new = GenerationEngine.from_registry(self.registry, meta.version)
            parent_engine = GenerationEngine.from_registry(self.registry, parent)
            judge = PairwiseJudge(s.judge.make_backend(), None, JudgeStats(new_registry()))
            gate = evaluate_gate(new, parent_engine, settings=s, judge=judge, prompts=self.eval_prompts(heldout),
                                 heldout=heldout,
                                 reference_set=[c["messages"] for c in load_conversations("heldout", quality="good")],
                                 history=dpo.history, pairs_trained=len(train))
            gate.comparison.write_blinded_csv(run_dir / "blinded_eval.csv")
            self.registry.annotate(meta.version, eval_summary=gate.summary.model_dump(mode="json"),
                                   gate_details=gate.details)
            if gate.passed:
                self.registry.promote(meta.version)
                self._producer.publish(self._model_updates, [ModelUpdatedEvent(
                    producer="trainer", version=meta.version, parent=parent, kind="dpo",
                    location=str(self.registry.root / meta.version), eval_summary=gate.summary)])
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
        seconds = round(time.monotonic() - started, 1)
        record = record.model_copy(update={"finished": datetime.now(timezone.utc), "seconds": seconds})
        self._record(record)
        self.runs_total.labels(record.status).inc()
        self.last_duration.set(seconds)
        (run_dir / "run.json").parent.mkdir(parents=True, exist_ok=True)
        (run_dir / "run.json").write_text(json.dumps(record.model_dump(mode="json"), indent=2))
        return record
