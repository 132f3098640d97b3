"""The trainer's trigger: N new pairs, or T minutes since the last finished run (across restarts)."""

from datetime import datetime, timedelta, timezone

from services.trainer.ledger import PreferenceLedger
from services.trainer.runner import TrainingRunner
from services.trainer.settings import TrainerSettings
from shared.observability import new_registry
from shared.registry import ModelRegistry
from shared.topics import MODEL_UPDATES
from shared.wire import PreferenceEvent, RubricScores, RunRecord
from tests.helpers import prompt


def runner_with(tmp_path, finished_ago: timedelta | None, pairs: int, **settings) -> TrainingRunner:
    runs = tmp_path / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    if finished_ago is not None:
        now = datetime.now(timezone.utc)
        (runs / "runs.jsonl").write_text(RunRecord(run_id="r1", status="rejected", trigger="test",
                                                   started=now - finished_ago - timedelta(minutes=1),
                                                   finished=now - finished_ago).model_dump_json() + "\n")
    ledger = PreferenceLedger(tmp_path / "ledger")
    scores = RubricScores(correctness=7, clarity=7, safety=9, empathy=5)
    events = [PreferenceEvent(producer="judge", prompt_id=p.id, prompt_messages=p.messages, chosen="See a doctor.",
                              rejected="It is nothing.", source="judge", judge_id="rubric-v1", reasoning="safer",
                              chosen_scores=scores, rejected_scores=scores, policy_version="v0001")
              for p in (prompt(f"question number {i}") for i in range(40))]
    ledger.append([e for e in events if e.split == "train"][:pairs])
    s = TrainerSettings(runs_dir=str(runs), ledger_dir=str(tmp_path / "ledger"), **settings)
    return TrainingRunner(s, ledger, ModelRegistry(tmp_path / "registry"), None, MODEL_UPDATES, new_registry())


def test_enough_new_pairs_trigger_at_once(tmp_path):
    assert "new pairs >= 3" in runner_with(tmp_path, None, 3, min_new_pairs=3).trigger_reason()


def test_the_interval_counts_from_the_last_finished_run_even_after_a_restart(tmp_path):
    assert runner_with(tmp_path / "a", timedelta(minutes=90), 1, min_new_pairs=100, train_interval_min=60) \
        .trigger_reason().startswith("1 new pairs and 60")
    assert runner_with(tmp_path / "b", timedelta(minutes=10), 1, min_new_pairs=100,
                       train_interval_min=60).trigger_reason() is None
    assert runner_with(tmp_path / "c", timedelta(minutes=90), 0, min_new_pairs=100,
                       train_interval_min=60).trigger_reason() is None  # nothing new: no run
    assert runner_with(tmp_path / "d", None, 1, min_new_pairs=100, train_interval_min=60).trigger_reason() is None
