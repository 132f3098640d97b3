"""The trainer's trigger: N new pairs, or T minutes since the last finished run (across restarts);
back-off after failed runs and a halt after N of them in a row, both derived from runs.jsonl."""

from datetime import datetime, timedelta, timezone

from services.trainer.ledger import PreferenceLedger
from services.trainer.runner import TrainingRunner
from services.trainer.settings import TrainerSettings
from services.trainer.trigger import OPERATOR_TRIGGER
from shared.observability import new_registry
from shared.outbox import Outbox
from shared.registry import ModelRegistry
from shared.topics import MODEL_UPDATES
from shared.wire import PreferenceEvent, RubricScores, RunRecord
from tests.helpers import prompt, random_tiny_model

NOW = datetime.now(timezone.utc)


def run(run_id: str, status: str, ago: timedelta, trigger: str = "32 new pairs", **kw) -> RunRecord:
    return RunRecord(run_id=run_id, status=status, trigger=trigger, started=NOW - ago - timedelta(minutes=1),
                     finished=NOW - ago, error="RuntimeError: out of memory" if status == "failed" else None, **kw)


def runner_with(tmp_path, finished_ago: timedelta | None, pairs: int, history: list[RunRecord] = (),
                registry: ModelRegistry | None = None, **settings) -> TrainingRunner:
    runs = tmp_path / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    if finished_ago is not None:
        history = [run("r1", "rejected", finished_ago, trigger="test"), *history]
    if history:
        (runs / "runs.jsonl").write_text("".join(r.model_dump_json() + "\n" for r in history))
    ledger = PreferenceLedger(tmp_path / "ledger")
    scores = RubricScores(correctness=7, clarity=7, safety=9, empathy=5)
    events = [PreferenceEvent(producer="judge", prompt_id=p.id, prompt_messages=p.messages, chosen="See a doctor.",
                              rejected="It is nothing.", source="judge", judge_id="rubric-v1", reasoning="safer",
                              chosen_scores=scores, rejected_scores=scores, policy_version="v0001")
              for p in (prompt(f"question number {i}") for i in range(40))]
    ledger.append([e for e in events if e.split == "train"][:pairs])
    s = TrainerSettings(runs_dir=str(runs), ledger_dir=str(tmp_path / "ledger"), **settings)
    metrics = new_registry()
    outbox = Outbox(runs / "outbox.sqlite", [MODEL_UPDATES], metrics, "model-updates")
    return TrainingRunner(s, ledger, registry or ModelRegistry(tmp_path / "registry"), outbox, MODEL_UPDATES, metrics)


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


def test_failed_runs_back_off_exponentially_then_halt_until_an_operator_run(tmp_path):
    backoff = dict(min_new_pairs=3, failure_backoff_s=60, failure_backoff_max_s=300, max_consecutive_failures=4)
    # NOW is taken at import: a failure "30 s ago" may be minutes ago by the time a loaded machine runs this
    one = runner_with(tmp_path / "a", None, 3, [run("f1", "failed", timedelta(seconds=30))],
                      **{**backoff, "failure_backoff_s": 3600, "failure_backoff_max_s": 7200})
    status = one.trigger_status()
    assert status.state == "backing_off" and status.consecutive_failures == 1
    assert abs((status.next_attempt_at - (NOW + timedelta(seconds=3570))).total_seconds()) < 2  # 1 h after it failed
    assert one.trigger_reason() is None and "RuntimeError: out of memory" in status.last_error

    three = [run(f"f{i}", "failed", timedelta(seconds=200 - i)) for i in range(3)]
    slow = {**backoff, "failure_backoff_s": 3600, "failure_backoff_max_s": 100_000}  # 3 failures: wait 4 h
    waits = runner_with(tmp_path / "b", None, 3, three, **slow).trigger_status()
    assert waits.state == "backing_off" and waits.consecutive_failures == 3  # 200 s after the last: not yet
    assert runner_with(tmp_path / "c", None, 3, [run(f"f{i}", "failed", timedelta(hours=4, seconds=200 - i))
                                                  for i in range(3)], **slow).trigger_reason()  # 4 h passed

    four = [run(f"f{i}", "failed", timedelta(hours=10 - i)) for i in range(4)]
    halted = runner_with(tmp_path / "d", None, 3, four, **backoff)
    assert halted.trigger_status().state == "halted" and halted.trigger_reason() is None  # hours later, still
    assert halted.halted._value.get() == 1 and halted.consecutive_failures._value.get() == 4

    operator = [*four, run("op", "failed", timedelta(hours=1), trigger=OPERATOR_TRIGGER)]
    assert runner_with(tmp_path / "e", None, 3, operator, **backoff).trigger_status().consecutive_failures == 1
    recovered = [*four, run("ok", "rejected", timedelta(hours=1))]
    assert runner_with(tmp_path / "f", None, 3, recovered, **backoff).trigger_status().state == "idle"


def test_a_failing_run_is_not_retried_at_the_next_check_even_after_a_restart(tmp_path):
    settings = dict(min_new_pairs=3, failure_backoff_s=3600)
    runner = runner_with(tmp_path, None, 5, **settings)  # an empty registry: the run fails at once
    assert runner.trigger_reason()
    record = runner.run("test")
    assert record.status == "failed" and "no current version" in record.error
    assert runner.trigger_reason() is None and runner.trigger_status().state == "backing_off"
    assert runner.runs_total.labels("failed")._value.get() == 1
    restarted = runner_with(tmp_path, None, 5, **settings)
    assert restarted.trigger_reason() is None and restarted.trigger_status().consecutive_failures == 1


def test_a_run_a_previous_process_left_running_is_recorded_on_start(tmp_path):
    runner = runner_with(tmp_path, None, 3, [RunRecord(run_id="r-crashed", status="running", trigger="t",
                                                       started=NOW - timedelta(minutes=5))])
    (record,) = runner.runs()
    assert record.status == "failed" and record.error.startswith("interrupted")
    assert runner.trigger_status().consecutive_failures == 1 and not len(runner.outbox)


def test_a_run_that_died_after_promoting_is_recorded_promoted_and_announced(tmp_path):
    """The process died between `promote` and queueing the announcement: on start the run is
    recorded as promoted and its ModelUpdatedEvent is queued, so consumers still hear of it."""
    registry = ModelRegistry(tmp_path / "registry")
    model, tok = random_tiny_model()
    registry.promote(registry.save(model, tok, kind="sft").version)
    v2 = registry.save(model, tok, kind="dpo", parent="v0001", metrics={"run_id": "r-died"}).version
    registry.annotate(v2, eval_summary={"win_rate_vs_parent": 0.7, "promoted": True})
    registry.promote(v2)
    runner = runner_with(tmp_path, None, 3, [RunRecord(run_id="r-died", status="running", trigger="t",
                                                       parent="v0001", started=NOW)], registry=registry)
    (record,) = runner.runs()
    assert (record.status, record.version, record.eval_summary.win_rate_vs_parent) == ("promoted", v2, 0.7)
    assert len(runner.outbox) == 1
