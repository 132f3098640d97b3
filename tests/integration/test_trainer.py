"""Trainer service (`prefloop serve trainer`) on the real broker with the real tiny model."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from shared.registry import ModelRegistry
from shared.topics import MODEL_UPDATES, PREFERENCES
from shared.wire import PreferenceEvent
from services.trainer.ledger import PreferenceLedger
from tests.helpers import read_events, read_records, wait_for
from tests.integration.procs import ServiceProcess


@pytest.fixture
def registry_copy(tiny_registry, tmp_path):
    shutil.copytree(tiny_registry, tmp_path / "registry")
    return ModelRegistry(tmp_path / "registry")


def trainer_proc(kafka, tmp_path, registry, **extra):
    settings = dict(registry_dir=registry.root, ledger_dir=tmp_path / "ledger", runs_dir=tmp_path / "runs",
                    check_interval_s=0.5, eval_prompts=16, eval_max_new_tokens=48, batch_timeout_ms=200,
                    admin_key="admin-secret")
    settings.update(extra)
    return ServiceProcess("trainer", kafka, tmp_path, **settings)


def finished_runs(trainer):
    return [r for r in trainer.get("/runs").json() if r["status"] != "running"]


def ledger_lines(tmp_path) -> list[str]:
    return [json.loads(line)["id"] for seg in sorted((tmp_path / "ledger" / "segments").glob("*.jsonl"))
            for line in seg.read_text().splitlines() if line.strip()]


def test_preferences_to_promoted_version_and_model_update(kafka, producer, tmp_path, registry_copy, preferences):
    trainer = trainer_proc(kafka, tmp_path, registry_copy, min_new_pairs=30, min_win_ci_lower=-1,
                           max_perplexity_increase=1.0, max_length_drift=1.0, safety_tolerance=10,
                           heldout_pairs=0).start()
    try:
        producer.publish(PREFERENCES.with_prefix(kafka.topic_prefix), preferences)
        run = wait_for(lambda: finished_runs(trainer), 240, "a finished training run", interval_s=1)[0]
        assert run["status"] == "promoted", run
        assert list(run["phases"]) == ["dpo", "merge", "save", "gate"], run["phases"]  # in the order they ran
        assert run["phases"]["dpo"] > 0 and run["phases"]["gate"] > 0 and min(run["phases"].values()) >= 0
        assert sum(run["phases"].values()) <= run["seconds"] + 0.2
        update = read_events(kafka.bootstrap_servers, MODEL_UPDATES.with_prefix(kafka.topic_prefix), 1, 30)[0]
        assert (update.version, update.parent, update.kind) == ("v0002", "v0001", "dpo")
        summary = update.eval_summary
        assert summary.promoted and summary.win_rate_vs_parent is not None and summary.perplexity_change is not None
        assert summary.pairs_trained == run["pairs_new"] + run["pairs_replay"] > 0
        assert registry_copy.current() == "v0002"
        meta = registry_copy.get("v0002")
        assert meta.parent == "v0001" and meta.snapshot_id == run["snapshot_id"]
        assert meta.metrics["eval_summary"]["win_rate_vs_parent"] == summary.win_rate_vs_parent
        # the tiny base's recipe filled what this service left unset (services/trainer/recipes.py)
        assert (meta.training_config["recipe"], meta.training_config["learning_rate"]) == ("prefloop-tiny-llama", 2e-3)
        snapshot = PreferenceLedger(tmp_path / "ledger").snapshot_ids(meta.snapshot_id)
        assert len(snapshot) == summary.pairs_trained
        run_dir = tmp_path / "runs" / run["run_id"]
        metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert any("rewards/accuracies" in m and "rewards/margins" in m and "logps/chosen" in m for m in metrics)
        assert (run_dir / "metrics.png").stat().st_size > 1000 and (run_dir / "blinded_eval.csv").exists()

        parent = AutoModelForCausalLM.from_pretrained(str(registry_copy.verified_path("v0001")))
        merged = AutoModelForCausalLM.from_pretrained(str(registry_copy.verified_path("v0002")))
        assert any(not torch.equal(a, b) for a, b in zip(parent.state_dict().values(), merged.state_dict().values()))
        adapted = PeftModel.from_pretrained(parent, str(run_dir / "adapter"))
        ids = torch.tensor([[5, 17, 33, 101, 7, 250]])
        with torch.no_grad():
            assert torch.allclose(adapted(ids).logits, merged(ids).logits, atol=1e-4)
    finally:
        trainer.kill()


def test_a_failing_gate_promotes_nothing_and_records_why(kafka, producer, tmp_path, registry_copy, preferences):
    trainer = trainer_proc(kafka, tmp_path, registry_copy, min_new_pairs=100_000, min_win_ci_lower=1,
                           max_pairs_per_run=12).start()
    try:
        producer.publish(PREFERENCES.with_prefix(kafka.topic_prefix), preferences)
        wait_for(lambda: trainer.get("/status").json()["detail"]["ledger_pairs"] == len(preferences), 60,
                 "the ledger to hold every pair")
        url = f"{trainer.url}/train"
        assert httpx.post(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.post(url).status_code == 401
        assert httpx.post(url, headers={"Authorization": "Bearer admin-secret"}).status_code == 202
        run = wait_for(lambda: finished_runs(trainer), 240, "the run", interval_s=1)[0]
        assert run["status"] == "rejected" and run["trigger"] == "POST /train"
        reasons = run["eval_summary"]["gate_reasons"]
        assert any(r.startswith("win rate vs parent") and "is not above 1" in r for r in reasons)  # min_win_ci_lower=1
        assert run["eval_summary"]["preference_accuracy"] is not None  # held-out pairs were evaluated
        assert registry_copy.current() == "v0001"
        assert registry_copy.get(run["version"]).metrics["eval_summary"]["gate_reasons"] == reasons
        assert read_records(kafka.bootstrap_servers, MODEL_UPDATES.with_prefix(kafka.topic_prefix), 1, 3) == []
        # a rejected run used up the pairs it trained on, and only those: max_pairs_per_run cut the rest
        train_ids = [p.id for p in preferences if p.split == "train"]
        assert run["pairs_new"] == len(run["new_pair_ids"]) == 12 and set(run["new_pair_ids"]) <= set(train_ids)
        assert trainer.get("/status").json()["detail"]["new_pairs"] == len(train_ids) - 12
    finally:
        trainer.kill()


def test_killed_while_writing_the_ledger_loses_and_duplicates_nothing(kafka, producer, tmp_path, registry_copy,
                                                                       preferences):
    many = [p.model_copy(update={"chosen": f"{p.chosen} ({i})", "id": ""}) for i in range(4) for p in preferences]
    many = [PreferenceEvent.model_validate(p.model_dump()) for p in many]  # fresh content ids
    bad_length = preferences[0].model_copy(update={"chosen": "x" * 5000, "id": ""})
    bad_length = PreferenceEvent.model_validate(bad_length.model_dump())
    topic = PREFERENCES.with_prefix(kafka.topic_prefix)
    trainer = trainer_proc(kafka, tmp_path, registry_copy, min_new_pairs=100_000, batch_size=8,
                           max_text_chars=4000).start()
    try:
        producer.publish(topic, many + preferences[:10])  # includes duplicates of earlier pairs
        wait_for(lambda: (tmp_path / "ledger" / "segments").exists() and 0 < len(ledger_lines(tmp_path)), 60,
                 "the ledger to start filling", interval_s=0.01)
    finally:
        trainer.kill()
    trainer = trainer_proc(kafka, tmp_path, registry_copy, min_new_pairs=100_000, max_text_chars=4000).start()
    try:
        producer.publish(topic, [bad_length, *preferences[:5]])
        expected = {p.id for p in many} | {p.id for p in preferences[:10]}
        wait_for(lambda: set(ledger_lines(tmp_path)) == expected, 90, "every pair in the ledger", interval_s=0.5)
        lines = ledger_lines(tmp_path)
        assert len(lines) == len(set(lines)) == len(expected)
        dead = read_events(kafka.bootstrap_servers, topic.dead_letter, 1, 30)
        assert "exceeds the limit" in dead[0].error and json.loads(dead[0].payload)["id"] == bad_length.id
    finally:
        trainer.kill()


def test_killed_mid_training_leaves_no_visible_version_and_resumes(kafka, producer, tmp_path, registry_copy,
                                                                   preferences):
    slow = trainer_proc(kafka, tmp_path, registry_copy, min_new_pairs=20, max_steps=2000).start()
    try:
        producer.publish(PREFERENCES.with_prefix(kafka.topic_prefix), preferences)
        wait_for(lambda: any((tmp_path / "runs").glob("*/metrics.jsonl")), 120, "training under way", interval_s=0.5)
    finally:
        slow.kill()
    assert [m.version for m in registry_copy.list()] == ["v0001"] and registry_copy.current() == "v0001"
    # the interrupted run counts as a failure: the resumed trainer backs off (here 1 s) before it trains again
    resumed = trainer_proc(kafka, tmp_path, registry_copy, min_new_pairs=20, min_win_ci_lower=-1,
                           max_perplexity_increase=1.0, max_length_drift=1.0, safety_tolerance=10,
                           heldout_pairs=0, failure_backoff_s=1).start()
    try:
        interrupted, run = wait_for(lambda: finished_runs(resumed)[1:] and finished_runs(resumed), 240,
                                    "the resumed run", interval_s=1)
        assert interrupted["status"] == "failed" and interrupted["error"].startswith("interrupted")
        assert run["status"] == "promoted" and run["pairs_new"] > 0
        assert [m.version for m in registry_copy.list()] == ["v0001", "v0002"]
    finally:
        resumed.kill()


def test_a_promotion_while_the_broker_is_down_is_recorded_and_announced_once_it_is_back(tmp_path, registry_copy,
                                                                                        preferences):
    from shared.broker import EmbeddedBroker
    from shared.kafka import EventProducer
    from shared.settings import KafkaSettings
    from shared.topics import all_topics_with_dlq

    broker = EmbeddedBroker(log_file=tmp_path / "broker.log").start(topics=all_topics_with_dlq())
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap)
    producer = EventProducer(kafka, "test")
    trainer = trainer_proc(kafka, tmp_path, registry_copy, min_new_pairs=100_000, min_win_ci_lower=-1,
                           max_perplexity_increase=1.0, max_length_drift=1.0, safety_tolerance=10,
                           heldout_pairs=0).start()
    try:
        producer.publish(PREFERENCES, preferences)
        wait_for(lambda: trainer.get("/status").json()["detail"]["ledger_pairs"] == len(preferences), 60,
                 "the ledger to hold every pair")
        broker.stop()
        assert httpx.post(f"{trainer.url}/train", headers={"Authorization": "Bearer admin-secret"}).status_code == 202
        run = wait_for(lambda: finished_runs(trainer), 240, "the run", interval_s=1)[0]
        assert run["status"] == "promoted" and registry_copy.current() == run["version"] == "v0002"
        status = trainer.get("/status").json()
        assert status["detail"]["announcements_queued"] == 1 and status["trigger"]["state"] == "idle"

        broker = EmbeddedBroker(port=broker.port, log_file=tmp_path / "broker.log").start(topics=all_topics_with_dlq())
        update = wait_for(lambda: read_events(broker.bootstrap, MODEL_UPDATES, 1, 2), 120, "the announcement")[0]
        assert (update.version, update.parent, update.eval_summary.promoted) == ("v0002", "v0001", True)
        wait_for(lambda: trainer.get("/status").json()["detail"]["announcements_queued"] == 0, 30, "an empty outbox")
        assert trainer.get("/healthz").json()["status"] == "ok"  # the loops lived through the outage
    finally:
        trainer.kill()
        producer.close()
        broker.stop()
