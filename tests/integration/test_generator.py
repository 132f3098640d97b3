"""Generator service on the real broker with the real tiny model, run as `prefloop serve generator`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from shared.allocator import MALLOC_TUNABLES
from shared.engine import GenerationEngine
from shared.registry import ModelRegistry
from shared.topics import CANDIDATES, MODEL_UPDATES, PROMPTS
from shared.wire import ModelUpdatedEvent, SamplingParams
from tests.helpers import prompt, read_events, wait_for
from tests.integration.procs import ServiceProcess


@pytest.fixture
def registry_copy(tiny_registry, tmp_path):
    shutil.copytree(tiny_registry, tmp_path / "registry")
    return ModelRegistry(tmp_path / "registry")


def candidates_by_prompt(kafka, count, timeout_s=60):
    events = read_events(kafka.bootstrap_servers, CANDIDATES.with_prefix(kafka.topic_prefix), count, timeout_s)
    return {e.prompt_id: e for e in events}


def test_prompts_in_candidates_out_and_a_model_update_switches_the_version(kafka, producer, registry_copy, tmp_path):
    gen = ServiceProcess("generator", kafka, tmp_path, registry_dir=registry_copy.root, batch_size=4,
                         batch_timeout_ms=200).start()
    try:
        # `prefloop serve` restarted itself (same pid) with the malloc settings, or kept the runner's own;
        # its log says what it runs with (glibc before 2.39 parses the variable in place, so /proc shows
        # only a prefix of it)
        expected = os.environ.get("GLIBC_TUNABLES", MALLOC_TUNABLES)
        assert f"malloc: GLIBC_TUNABLES={expected}" in gen.log.read_text()
        environ = dict(v.partition("=")[::2] for v in Path(f"/proc/{gen.proc.pid}/environ").read_text().split("\0"))
        assert environ.get("PREFLOOP_MALLOC_RESTARTED") == (None if "GLIBC_TUNABLES" in os.environ else "1")
        assert expected.startswith(environ["GLIBC_TUNABLES"])
        assert gen.get("/status").json()["policy_version"] == "v0001"
        first = [prompt(f"My head hurts, day {i}. What should I do?", sampling=SamplingParams(max_new_tokens=48))
                 for i in range(6)]
        producer.publish(PROMPTS.with_prefix(kafka.topic_prefix), first)
        got = wait_for(lambda: len(c := candidates_by_prompt(kafka, 6, 5)) >= 6 and c, 90, "6 candidates events")
        assert set(got) == {p.id for p in first}
        for event in got.values():
            assert event.policy_version == "v0001" and len(event.candidates) == 2
            assert all(c.origin == "policy" and c.completion_tokens > 0 for c in event.candidates)

        # A new version is promoted: later events must carry it.
        parent = GenerationEngine.from_registry(registry_copy)
        v2 = registry_copy.save(parent.model, parent.tokenizer, kind="dpo", parent="v0001").version
        registry_copy.promote(v2)
        producer.publish(MODEL_UPDATES.with_prefix(kafka.topic_prefix), [ModelUpdatedEvent(
            producer="test", version=v2, parent="v0001", kind="dpo", location=str(registry_copy.root / v2))])
        wait_for(lambda: gen.get("/status").json()["policy_version"] == v2 or
                 producer.publish(PROMPTS.with_prefix(kafka.topic_prefix), [prompt("nudge a batch")]) < 0,
                 60, "the generator to swap to the new version", interval_s=1.0)
        later = prompt("After the update: is my cough serious?", sampling=SamplingParams(max_new_tokens=32))
        producer.publish(PROMPTS.with_prefix(kafka.topic_prefix), [later])
        event = wait_for(lambda: candidates_by_prompt(kafka, 100, 3).get(later.id), 60, "the post-update event")
        assert event.policy_version == v2
        assert "prefloop_generator_candidates_total" in gen.get("/metrics").text
    finally:
        gen.kill()


def test_killing_the_generator_mid_batch_loses_no_prompt(kafka, producer, registry_copy, tmp_path):
    # 12 batches, 4 in flight at a time (the default): the kill finds some published, some running, some queued
    prompts = [prompt(f"Long question number {i} about my sleep", sampling=SamplingParams(max_new_tokens=200))
               for i in range(96)]
    gen = ServiceProcess("generator", kafka, tmp_path, registry_dir=registry_copy.root, batch_size=8,
                         batch_timeout_ms=100).start()
    producer.publish(PROMPTS.with_prefix(kafka.topic_prefix), prompts)
    wait_for(lambda: candidates_by_prompt(kafka, 1, 2), 90, "a first batch published")
    gen.kill()  # mid-run: some batch is in flight or not yet started
    seen_before = set(candidates_by_prompt(kafka, 96, 3))
    assert len(seen_before) < 96
    restarted = ServiceProcess("generator", kafka, tmp_path, registry_dir=registry_copy.root, batch_size=8,
                               batch_timeout_ms=100).start()
    try:
        wait_for(lambda: set(candidates_by_prompt(kafka, 300, 3)) >= {p.id for p in prompts}, 180,
                 "candidates for every prompt after the restart")
    finally:
        restarted.kill()


def test_a_version_that_fails_to_load_leaves_the_old_one_serving(kafka, producer, registry_copy, tmp_path):
    gen = ServiceProcess("generator", kafka, tmp_path, registry_dir=registry_copy.root).start()
    updates = MODEL_UPDATES.with_prefix(kafka.topic_prefix)
    try:
        # never promoted: the event is refused and dead-lettered, nothing is loaded
        shutil.copytree(registry_copy.root / "v0001", registry_copy.root / "v0002")
        producer.publish(updates, [ModelUpdatedEvent(producer="test", version="v0002", parent="v0001", kind="dpo",
                                                     location="elsewhere")])
        dead = wait_for(lambda: read_events(kafka.bootstrap_servers, updates.dead_letter, 1, 2), 60,
                        "the unpromoted update dead-lettered")
        assert "never promoted" in dead[0].error
        # promoted, then corrupted on disk: the load fails, the old version keeps serving
        registry_copy.promote("v0002")
        (registry_copy.root / "v0002" / "model.safetensors").write_bytes(b"corrupt")
        producer.publish(updates, [ModelUpdatedEvent(producer="test", version="v0002", parent="v0001", kind="dpo",
                                                     location=str(registry_copy.root / "v0002"))])
        wait_for(lambda: "prefloop_generator_model_load_failures_total 1.0" in gen.get("/metrics").text, 60,
                 "the failed load to be counted")
        p = prompt("Still there?", sampling=SamplingParams(max_new_tokens=16))
        producer.publish(PROMPTS.with_prefix(kafka.topic_prefix), [p])
        event = wait_for(lambda: candidates_by_prompt(kafka, 1, 3).get(p.id), 60, "an answer from the old model")
        assert event.policy_version == "v0001"
    finally:
        gen.kill()
