"""The research scripts' pure parts: `ablate_run.run_pairs` rebuilds exactly the pairs, in exactly the order,
the trainer's selection gave a run (what `round_sweep` and `drift_trajectory` retrain), and `round_sweep`'s
variants and rubric tallies."""

from __future__ import annotations

import math
import random
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from services.trainer.dpo import DPOJobConfig
from services.trainer.dpo_pairs import Encoded, length_grouped
from services.trainer.ledger import PreferenceLedger
from services.trainer.runner import TrainingRunner
from services.trainer.settings import TrainerSettings
from shared.observability import new_registry
from shared.outbox import Outbox
from shared.registry import ModelRegistry
from shared.topics import MODEL_UPDATES
from shared.wire import PreferenceEvent, RubricScores, RunRecord
from tests.helpers import prompt

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from ablate_run import finished_runs, run_pairs  # noqa: E402
from round_sweep import apply, margin, parse_variant, score_diffs, tally  # noqa: E402

SCORES = RubricScores(correctness=7, clarity=7, safety=9, empathy=5)


def pairs(start: int, count: int) -> list[PreferenceEvent]:
    return [PreferenceEvent(producer="judge", prompt_id=p.id, prompt_messages=p.messages, chosen="See a doctor.",
                            rejected="It is nothing.", source="judge", judge_id="rubric-v1", reasoning="safer",
                            chosen_scores=SCORES, rejected_scores=SCORES, policy_version="v0001")
            for p in (prompt(f"question number {i}") for i in range(start, start + count))]


def selected_round(runner: TrainingRunner, ledger: PreferenceLedger, run_id: str, parent: str) -> list[str]:
    """What TrainingRunner.run records and trains on, without the training: its selection, in DPO's order."""
    record = RunRecord(run_id=run_id, status="running", trigger="test", started=datetime.now(timezone.utc),
                       parent=parent)
    runner._record(record)
    selection = runner._select(runner.new_pair_ids(), parent)
    runner._record(record.model_copy(update={
        "status": "promoted", "version": f"v000{int(parent[-1]) + 1}", "finished": datetime.now(timezone.utc),
        "snapshot_id": ledger.snapshot(e.id for e in selection.train), "pairs_new": len(selection.new),
        "pairs_replay": len(selection.replay), "new_pair_ids": [e.id for e in selection.new],
        "stale_pair_ids": selection.stale_ids}))
    return [e.id for e in selection.train]


@pytest.mark.parametrize("max_pairs_per_run", [2048, 12])
def test_a_rebuilt_run_trains_the_trainers_pairs_in_the_trainers_order(tmp_path, max_pairs_per_run, capsys):
    """Three rounds with replay; with `max_pairs_per_run` 12 some new pairs wait for a later round, and the
    trainer leaves every pair still new at the time out of its replay draw, waiting or not."""
    ledger = PreferenceLedger(tmp_path / "ledger")
    settings = TrainerSettings(runs_dir=str(tmp_path / "runs"), ledger_dir=str(tmp_path / "ledger"),
                               replay_fraction=0.5, max_pairs_per_run=max_pairs_per_run)
    metrics = new_registry()
    runner = TrainingRunner(settings, ledger, ModelRegistry(tmp_path / "registry"),
                            Outbox(tmp_path / "outbox.sqlite", [MODEL_UPDATES], metrics, "mu"), MODEL_UPDATES, metrics)
    trained = []
    for round_no, (start, count) in enumerate([(0, 24), (24, 20), (44, 16)], 1):
        ledger.append(pairs(start, count))
        trained.append(selected_round(runner, ledger, f"r{round_no}", f"v000{round_no}"))
    runs = finished_runs(tmp_path)
    assert [r["run_id"] for r in runs] == ["r1", "r2", "r3"]
    for index, ids in enumerate(trained):
        rebuilt, record = run_pairs(tmp_path, index, runs, DPOJobConfig().seed)
        assert record["run_id"] == f"r{index + 1}"
        assert [e.id for e in rebuilt] == ids  # the same pairs, in the same order
    assert any(runs[i]["pairs_replay"] for i in (1, 2))  # later rounds replayed older pairs
    assert "not reproduced" not in capsys.readouterr().out


def test_a_seeded_run_trains_the_same_batches_whatever_order_its_pairs_arrived_in(tmp_path):
    """The ledger keeps the order pairs arrived in, which timing decides: two demos with one seed judged the
    same 43 pairs into different orders and trained different models. The selection, its replay draw and
    the DPO's batches go by pair id."""
    trained, ledgers = [], []
    for name, shuffle in (("a", 1), ("b", 2)):
        ledger = PreferenceLedger(tmp_path / name / "ledger")
        settings = TrainerSettings(runs_dir=str(tmp_path / name / "runs"), ledger_dir=str(tmp_path / name / "ledger"),
                                   replay_fraction=0.5)
        metrics = new_registry()
        runner = TrainingRunner(settings, ledger, ModelRegistry(tmp_path / name / "registry"),
                                Outbox(tmp_path / name / "outbox.sqlite", [MODEL_UPDATES], metrics, "mu"),
                                MODEL_UPDATES, metrics)
        rounds = []
        for round_no, (start, count) in enumerate([(0, 24), (24, 20)], 1):
            arrived = pairs(start, count)
            random.Random(shuffle).shuffle(arrived)
            ledger.append(arrived)
            rounds.append(selected_round(runner, ledger, f"r{round_no}", f"v000{round_no}"))
        trained.append(rounds)
        ledgers.append(ledger.ids)
    assert ledgers[0] != ledgers[1] and sorted(ledgers[0]) == sorted(ledgers[1])
    assert trained[0] == trained[1] and len(trained[0][1]) == 20 + 10  # round 2 replays 10 of round 1's
    # equal lengths batch by pair id, not by the order they came in
    rows = [Encoded(f"p{i:02d}", [1] * (3 + i % 2), [2] * 3, 1) for i in range(12)]
    batches = [[e.pair_id for e in b] for b in length_grouped(rows, 4, seed=7)]
    assert [[e.pair_id for e in b] for b in length_grouped(rows[::-1], 4, seed=7)] == batches
    assert sorted(sum(batches, [])) == [e.pair_id for e in rows]


def test_a_variant_overrides_dpo_settings_as_json_and_refuses_unknown_ones():
    name, overrides = parse_variant("lr3:learning_rate=3e-4,max_steps=40,replay=0.5,"
                                    'lora_target_modules=["q_proj","v_proj"],reference=root')
    assert name == "lr3" and overrides["replay"] == "0.5"
    config = apply(DPOJobConfig(), overrides)
    assert config.learning_rate == 3e-4 and config.max_steps == 40 and config.reference == "root"
    assert config.lora_target_modules == ["q_proj", "v_proj"]
    assert isinstance(apply(DPOJobConfig(), {"beta": "1"}).beta, float)  # an int given for a float field
    assert parse_variant("as-run:") == ("as-run", {}) and apply(DPOJobConfig(), {}) == DPOJobConfig()
    with pytest.raises(SystemExit, match="unknown setting 'lerning_rate'"):
        apply(DPOJobConfig(), {"lerning_rate": "1e-4"})


def test_a_users_pair_has_no_margin_to_fall_short_of():
    judged = pairs(0, 1)[0].model_copy(update={"rejected_scores": RubricScores(correctness=3, clarity=7, safety=4,
                                                                                 empathy=5)})
    assert 0 < margin(judged) < math.inf
    user = judged.model_copy(update={"source": "user", "chosen_scores": None, "rejected_scores": None})
    assert margin(user) == math.inf


def test_rubric_tallies_count_a_point_either_way_per_question_and_sample():
    low = RubricScores(correctness=5, clarity=5, safety=5, empathy=5)
    high = RubricScores(correctness=9, clarity=9, safety=9, empathy=9)
    # 2 questions x 2 samples, sample-major: question 0 at 0 and 2, question 1 at 1 and 3
    diffs = score_diffs([high, low, high, low], [low, low, low, high])
    assert diffs[0] > 1 and diffs[1] == 0 and diffs[3] < -1
    c = tally("v0002", "v0001", diffs, questions=2, samples=2)
    assert (c.wins, c.losses, c.per_prompt) == (2, 1, [(2, 0), (0, 1)])


def test_a_variant_that_is_not_key_value_is_refused_with_its_name():
    with pytest.raises(SystemExit, match="variant 'lr3:learning_rate': 'learning_rate' is not key=value"):
        parse_variant("lr3:learning_rate")
