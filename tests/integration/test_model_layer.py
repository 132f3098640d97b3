"""Bootstrap (through the CLI), registry crash safety, and the generation engine on the real tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from services.trainer.bootstrap import TinyModelSpec, bootstrap_tiny
from shared.engine import GenerationEngine, GenerationRequest
from shared.registry import ModelRegistry
from shared.wire import ChatMessage, SamplingParams
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parents[2]
DEMO_PROMPTS = ROOT / "shared" / "data" / "demo_prompts.jsonl"
SYSTEM = "You are a helpful and empathetic medical assistant."


def ask(text: str) -> list[ChatMessage]:
    return [ChatMessage(role="system", content=SYSTEM), ChatMessage(role="user", content=text)]


def test_bootstrap_registered_a_current_sft_version_whose_loss_fell(tiny_registry):
    reg = ModelRegistry(tiny_registry)
    current = reg.current()
    meta = reg.get(current)
    assert meta.kind == "sft" and meta.parent is None and meta.snapshot_id.startswith("shipped:")
    losses = meta.metrics["sft_losses"]
    assert len(losses) >= 5 and losses[-1] < 0.3 * losses[0]
    assert meta.metrics["seconds"] < 180


def test_bootstrapped_model_answers_shipped_prompts_and_stops_at_the_end_token(engine):
    prompts = [json.loads(line)["prompt"] for line in DEMO_PROMPTS.read_text().splitlines()[:24]]
    results = engine.generate([GenerationRequest(ask(p), SamplingParams(max_new_tokens=96), n=2) for p in prompts])
    cands = [c for r in results for c in r.candidates]
    assert len(cands) == 48 and all(len(r.candidates) == 2 for r in results)
    assert all(c.text.strip() for c in cands)
    assert sum(c.finish_reason == "stop" for c in cands) >= 0.8 * len(cands)
    assert all("<|im_end|>" not in c.text and "<|im_start|>" not in c.text for c in cands)
    assert all(r.prompt_tokens > 10 and not r.truncated for r in results)


def test_bootstrap_is_deterministic_for_a_seed(tmp_path):
    spec = TinyModelSpec(sft_steps=4, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    a = bootstrap_tiny(ModelRegistry(tmp_path / "a"), spec)
    b = bootstrap_tiny(ModelRegistry(tmp_path / "b"), spec)
    assert a.checksums == b.checksums and a.metrics["sft_losses"] == b.metrics["sft_losses"]


def test_seeded_requests_are_reproducible_and_params_are_per_request(engine):
    seeded = GenerationRequest(ask("How do I sleep better?"), SamplingParams(seed=123, max_new_tokens=40), n=2)
    first, second = engine.generate([seeded])[0], engine.generate([seeded])[0]
    assert [c.text for c in first.candidates] == [c.text for c in second.candidates]
    mixed = engine.generate([
        GenerationRequest(ask("q one"), SamplingParams(max_new_tokens=3), n=1),
        GenerationRequest(ask("q two, a much longer question about my headache"), SamplingParams(max_new_tokens=40), n=3),
    ])
    assert len(mixed[0].candidates) == 1 and mixed[0].candidates[0].completion_tokens <= 3
    assert len(mixed[1].candidates) == 3


def test_overlong_prompts_are_truncated_from_the_left_or_rejected(engine, tiny_registry):
    long = ask("pain " * 2000)
    res = engine.generate([GenerationRequest(long, SamplingParams(max_new_tokens=16))])[0]
    assert res.truncated and res.prompt_tokens == engine.context_length - 16 and res.candidates
    strict = GenerationEngine.from_registry(ModelRegistry(tiny_registry), overflow="reject")
    res = strict.generate([GenerationRequest(long, SamplingParams(max_new_tokens=16)),
                           GenerationRequest(ask("short"), SamplingParams(max_new_tokens=8))])
    assert res[0].error and "tokens" in res[0].error and not res[0].candidates
    assert res[1].error is None and res[1].candidates


def test_readers_never_see_a_half_written_version_when_the_writer_is_killed(tmp_path):
    root = tmp_path / "reg"
    reg = ModelRegistry(root)
    problems: list[str] = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            for meta in reg.list():
                try:
                    reg.verified_path(meta.version)
                except Exception as exc:  # noqa: BLE001 - any failure is a finding
                    problems.append(f"{meta.version}: {exc}")

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    proc = subprocess.Popen([sys.executable, "-m", "tests.integration.registry_writer", str(root)], cwd=ROOT)
    try:
        wait_for(lambda: len(reg.list()) >= 1, 60, "a first complete version")
        saved = len(reg.list())
        wait_for(lambda: any(p.name.startswith(".staging") and len(list(p.iterdir())) > 0 for p in root.iterdir())
                 and len(reg.list()) == saved, 60, "the writer to be mid-save")
        proc.kill()
        proc.wait(10)
    finally:
        stop.set()
        thread.join(10)
        if proc.poll() is None:
            proc.kill()
    assert problems == []
    assert any(p.name.startswith(".staging") for p in root.iterdir())  # the killed save left only staging
    versions = reg.list()
    assert versions and all(reg.verified_path(m.version) for m in versions)


def test_bootstrap_with_a_real_base_runs_lora_sft_and_registers_it(tiny_registry, tmp_path):
    """`--base` takes any HF model directory (here the tiny model itself, as no hub is reachable)."""
    prefloop = str(Path(sys.executable).with_name("prefloop"))
    base = ModelRegistry(tiny_registry).verified_path("v0001")
    out = subprocess.run([prefloop, "bootstrap", "--registry", str(tmp_path / "reg"), "--base", str(base),
                          "--steps", "6"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    reg = ModelRegistry(tmp_path / "reg")
    meta = reg.get(reg.current())
    assert meta.kind == "sft" and meta.base_model == str(base)
    assert meta.training_config["sft"]["lora"]["r"] == 8 and meta.metrics["sft_steps"] == 6  # --steps caps it
    reloaded = GenerationEngine.from_registry(reg)
    assert not any(name for name, _ in reloaded.model.named_modules() if "lora" in name.lower())  # merged
    assert reloaded.generate([GenerationRequest(ask("How do I sleep better?"), SamplingParams(max_new_tokens=16))])[0].candidates


def _answer_logp_from_full_logits(model, tokenizer, conversation: list[dict]) -> tuple[float, int]:
    """The oracle: one unpadded forward, logits at every position, the answer's tokens summed."""
    import torch

    prompt = tokenizer.apply_chat_template(conversation[:-1], add_generation_prompt=True, tokenize=True,
                                           return_dict=False)
    full = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=False)
    n = len(full) - len(prompt)
    ids = torch.tensor([full])
    with torch.inference_mode():
        logits = model(ids).logits[0].float()
    logps = torch.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None])[:, 0]
    return float(logps[-n:].sum()), n


@pytest.mark.parametrize("sets", ["mixed", "medical"])
def test_perplexity_scores_each_answer_alone_whatever_the_batch(tiny_registry, sets, monkeypatch):
    """The gate's forgetting guard: the batched, right-padded perplexity of the answers equals the one
    from per-conversation sums of the answers' log-probs from full logits, and neither the batch size
    nor the neighbours' padding changes it. The medical set shares its system prompt: that prefix
    runs once and its cache is repeated into every batch; a lone conversation's shared prefix reaches
    up to its first scored position. In fp32, so that the tolerance is about the arithmetic, not
    bf16's rounding (the tiny model's perplexity is in the thousands)."""
    import math

    from shared import evaluation
    from shared.alignment_data import general_conversations, medical_conversations

    engine = GenerationEngine.from_registry(ModelRegistry(tiny_registry), dtype="float32")
    prefixes: list[int] = []
    real = evaluation._shared_prefix
    monkeypatch.setattr(evaluation, "_shared_prefix",
                        lambda model, rows: prefixes.append(real(model, rows)[0]) or real(model, rows))
    conversations = medical_conversations(7) + (general_conversations(6) if sets == "mixed" else [])
    assert len({len(str(c)) for c in conversations}) > 5  # different lengths: padding in a batch
    oracle = [_answer_logp_from_full_logits(engine.model, engine.tokenizer, c) for c in conversations]
    logps, tokens = zip(*oracle)
    for c, (lp, n) in zip(conversations, oracle):  # the gate's single-answer scorer (preference accuracy)
        got, got_n = evaluation._answer_logps(engine.model, engine.tokenizer, c[:-1], c[-1]["content"])
        assert got_n == n and math.isclose(got, lp, rel_tol=1e-5)
    expected = math.exp(-sum(logps) / sum(tokens))
    for batch_size in (1, 4, 8):
        assert math.isclose(evaluation.perplexity(engine, conversations, batch_size=batch_size), expected,
                            rel_tol=1e-5)
    assert all(p >= evaluation.SHARED_PREFIX_MIN for p in prefixes) if sets == "medical" else set(prefixes) == {0}
    one = evaluation.perplexity(engine, conversations[:1])
    assert prefixes[-1] == len(engine.tokenizer.apply_chat_template(conversations[0][:-1], add_generation_prompt=True,
                                                                    tokenize=True, return_dict=False)) - 1
    assert math.isclose(one, math.exp(-logps[0] / tokens[0]), rel_tol=1e-5)
    assert not math.isclose(one, expected, rel_tol=1e-3)  # the value depends on which answers are scored
    engine.close()


def test_the_gate_compares_several_seeded_answers_per_prompt_and_caches_them(tiny_registry, tmp_path, monkeypatch):
    """`compare(samples=2)`: answer k of one version against answer k of the other. Sample 0 is the answer
    a one-sample comparison draws (the same seed and cache key); sample 1 is
    another draw; the tallies per prompt add up to the totals; a second comparison generates nothing."""
    from shared.evaluation import AnswerCache, EvalPrompt, answers, compare
    from shared.judging.pairwise import PairwiseJudge
    from shared.judging.rubric import RubricJudge
    from shared.judging.stats import JudgeStats
    from shared.observability import new_registry

    reg = ModelRegistry(tiny_registry)
    path = reg.verified_path(reg.current())
    prompts = [EvalPrompt(ask(q)) for q in ("I have a headache", "My knee hurts when I run", "I feel tired all day",
                                            "Is a fever of 38C dangerous?", "I cannot sleep at night", "My skin itches")]
    sampling = SamplingParams(max_new_tokens=24)
    judge = PairwiseJudge(RubricJudge(), None, JudgeStats(new_registry()))
    cache = AnswerCache(tmp_path / "answers.sqlite")
    with GenerationEngine.from_path(path, version="vA") as a, GenerationEngine.from_path(path, version="vB") as b:
        lone = [c.text for c in answers(a, prompts, sampling)[0]]
        result = compare(a, b, prompts, judge, sampling, cache, samples=2)
        two = answers(a, prompts, sampling, cache, samples=2)
        assert [c.text for c in two[0]] == lone and [r["candidate"] for r in result.rows] == lone
        assert sum(x.text != y.text for x, y in zip(two[0], two[1])) >= 4
        assert result.prompts == 6 and result.samples == 2 and len(result.rows) == 6
        assert result.wins + result.losses + result.abstentions == 12
        assert (sum(w for w, _ in result.per_prompt), sum(lost for _, lost in result.per_prompt)) == (
            result.wins, result.losses)
        tokens = [c.completion_tokens for k in (0, 1) for c in two[k]]
        assert result.mean_tokens["vA"] == round(sum(tokens) / 12, 3)
        monkeypatch.setattr(GenerationEngine, "generate", lambda *args, **kw: pytest.fail("answers were cached"))
        again = compare(a, b, prompts, judge, sampling, cache, samples=2)
        assert (again.wins, again.losses, again.per_prompt) == (result.wins, result.losses, result.per_prompt)


def test_gate_answers_are_seeded_by_the_weights_not_the_version_name(tiny_registry):
    """Every demo names its rounds v0002, v0003: seeded by name, each demo's gate drew the same random
    numbers for its similar models. A registry engine's draws follow its weights' checksums instead."""
    from shared.evaluation import EvalPrompt, answers
    from shared.ids import content_id

    reg = ModelRegistry(tiny_registry)
    prompts = [EvalPrompt(ask(q)) for q in ("I have a headache", "My knee hurts", "I feel tired", "I cannot sleep")]
    sampling = SamplingParams(max_new_tokens=16)
    with GenerationEngine.from_registry(reg) as engine:
        assert engine.weights_id == content_id("weights", reg.get(reg.current()).checksums)
        by_weights = [c.text for c in answers(engine, prompts, sampling)[0]]
        engine.version = "v0099"  # another name, the same weights: the same draws
        assert [c.text for c in answers(engine, prompts, sampling)[0]] == by_weights
        salted = [c.text for c in answers(engine, prompts, sampling, salt=5)[0]]  # the gate's eval_seed
        assert salted != by_weights and [c.text for c in answers(engine, prompts, sampling, salt=5)[0]] == salted
        engine.weights_id = None  # an engine not from a registry: known by its name
        assert [c.text for c in answers(engine, prompts, sampling)[0]] != by_weights
