"""The CUDA paths CI cannot run: the engine's slot decoder and continuous batching on the GPU, the
bootstrap's SFT and DPO with LoRA and QLoRA (TRL + peft + bitsandbytes nf4) on CUDA, and the merge.
Skipped without CUDA (conftest.py); scripts/gpu_check.sh runs them on a GPU machine."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from services.trainer.dpo import DPOJobConfig, load_policy, merge_adapter, run_dpo
from services.trainer.ledger import to_trl_row
from shared.engine import GenerationEngine, GenerationRequest
from shared.engine.decoder import SlotDecoder
from shared.registry import ModelRegistry
from shared.wire import ChatMessage, SamplingParams


def ask(text: str) -> list[ChatMessage]:
    return [ChatMessage(role="user", content=text)]


def parent_path(tiny_registry):
    return ModelRegistry(tiny_registry).verified_path("v0001")


def test_the_bootstrap_trained_on_the_gpu_and_the_registry_saved_it(tiny_registry):
    meta = ModelRegistry(tiny_registry).get("v0001")
    losses = meta.metrics["sft_losses"]
    assert meta.training_config["sft"] and losses[-1] < losses[0]  # SFT on CUDA learned something


def test_the_slot_decoder_on_cuda_matches_the_models_own_forward_across_joins_and_frees(tiny_registry):
    model = AutoModelForCausalLM.from_pretrained(str(parent_path(tiny_registry)), dtype=torch.float32).to("cuda")
    model.eval()
    decoder = SlotDecoder(model, max_rows=2)
    assert decoder.device.type == "cuda" and decoder.native_attention is None  # attention.c is the CPU's

    def reference(ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return model(torch.tensor([ids], device="cuda")).logits[0, -1]

    rows = [[5, 17, 33, 101, 7], [9, 8, 7]]
    for ids in rows:
        assert torch.allclose(decoder.prefill(ids), reference(ids), atol=2e-3)
    for step in range(80):  # past the first cache block: the cache grows and keeps what it held
        logits = decoder.decode(torch.tensor([30 + step, 31 + step]))
        rows[0].append(30 + step)
        rows[1].append(31 + step)
    assert all(torch.allclose(logits[i], reference(rows[i]), atol=2e-3) for i in range(2))
    decoder.free(0)  # row 0 leaves; row 1 moves into slot 0
    joined = [40, 41, 42]
    assert torch.allclose(decoder.prefill(joined), reference(joined), atol=2e-3)
    logits = decoder.decode(torch.tensor([3, 4]))
    assert torch.allclose(logits[0], reference(rows[1] + [3]), atol=2e-3)
    assert torch.allclose(logits[1], reference(joined + [4]), atol=2e-3)


def test_the_engine_on_cuda_batches_mixed_requests_and_repeats_seeded_ones(tiny_registry):
    steps: list[int] = []
    with GenerationEngine.from_registry(ModelRegistry(tiny_registry),
                                        on_step=lambda rows, seconds: steps.append(rows)) as engine:
        assert engine.device.type == "cuda" and engine.dtype == torch.bfloat16
        assert engine.batching == "continuous"
        requests = [GenerationRequest(ask(q), SamplingParams(temperature=t, top_p=p, top_k=k, max_new_tokens=m,
                                                            seed=s), n=n)
                    for q, t, p, k, m, s, n in [("How do I sleep better?", 0.7, 0.9, 50, 48, 1, 2),
                                                ("What helps a headache?", 1.3, 0.5, 5, 16, 2, 1),
                                                ("Is coffee bad for me?", 0.2, 1.0, 0, 32, 3, 3)]]
        first = engine.generate(requests)
        second = engine.generate(requests)
    assert [len(r.candidates) for r in first] == [2, 1, 3]
    for request, result in zip(requests, first):
        assert all(c.text and c.completion_tokens <= request.sampling.max_new_tokens for c in result.candidates)
    assert [[c.text for c in r.candidates] for r in first] == [[c.text for c in r.candidates] for r in second]
    assert max(steps) >= 4  # rows of different requests and settings decoded in the same steps


@pytest.mark.parametrize("quantization,implementation", [("nf4", "trl"), ("none", "prefloop"), ("none", "trl")])
def test_dpo_on_cuda_trains_and_merges_into_full_precision(tiny_registry, preferences, tmp_path, quantization,
                                                           implementation):
    """QLoRA through TRL (what `auto` picks for nf4), LoRA through prefloop's loop (what it picks otherwise)
    and LoRA through TRL, each with its drift budget measured on the GPU."""
    parent = parent_path(tiny_registry)
    config = DPOJobConfig(quantization=quantization, max_steps=4, learning_rate=2e-3, max_drift=1.0,
                          drift_check_steps=2)
    assert config.resolved_implementation() == ("trl" if quantization == "nf4" else "prefloop")
    config.dpo_implementation = implementation
    if quantization == "nf4":
        import bitsandbytes as bnb

        policy = load_policy(parent, "nf4")
        quantized = [m for m in policy.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert quantized and all(m.weight.device.type == "cuda" for m in quantized)
        assert quantized[0].weight.quant_type == "nf4"
        del policy
    torch.cuda.reset_peak_memory_stats()
    result = run_dpo(parent, [to_trl_row(p) for p in preferences[:16]], config, tmp_path / "run")
    assert torch.cuda.max_memory_allocated() > 0  # it trained on the GPU
    assert result.steps == 4 and result.config["implementation"] == implementation
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in logged if "loss" in row]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    # the drift budget's checks at steps 2 and 4 (TRL's through BudgetCallback), and the kept version's reading
    # in the engine's dtype on the GPU
    drifts = [row["drift/perplexity_change"] for row in logged if "drift/perplexity_change" in row]
    assert len(drifts) == 2 and all(math.isfinite(v) for v in drifts)
    assert result.drift_monitor and result.drift_monitor[0] == "torch.bfloat16" and result.drift_monitor[1] > 1
    merged, _ = merge_adapter(parent, result.adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(str(parent))
    assert all(p.dtype == torch.float32 for p in merged.parameters())  # dequantize-then-merge: full precision
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)


@pytest.mark.parametrize("quantization", ["nf4", "none"])
def test_a_training_round_on_cuda_trains_merges_saves_and_gates_on_the_gpu(tiny_registry, preferences, tmp_path,
                                                                          quantization):
    """The trainer service's round as it runs in its pod: ledger pairs, DPO (QLoRA nf4 through TRL, or LoRA
    through prefloop's loop with a drift budget), the merge, the registry, and the gate's answers and
    perplexities computed on the GPU."""
    import shutil

    from services.trainer.ledger import PreferenceLedger
    from services.trainer.runner import TrainingRunner
    from services.trainer.settings import TrainerSettings
    from shared.observability import new_registry
    from shared.outbox import Outbox
    from shared.topics import MODEL_UPDATES

    shutil.copytree(tiny_registry, tmp_path / "registry")
    registry = ModelRegistry(tmp_path / "registry")
    ledger = PreferenceLedger(tmp_path / "ledger")
    ledger.append(preferences)
    s = TrainerSettings(runs_dir=str(tmp_path / "runs"), ledger_dir=str(tmp_path / "ledger"), quantization=quantization,
                        max_drift=1.0, drift_check_steps=2, max_steps=4, per_device_train_batch_size=2,
                        gradient_accumulation_steps=1, learning_rate=2e-3, eval_prompts=8, eval_samples=1, medical_reference_size=8, general_reference_size=8,
                        eval_max_new_tokens=16)
    metrics = new_registry()
    runner = TrainingRunner(s, ledger, registry, Outbox(tmp_path / "outbox.sqlite", [MODEL_UPDATES], metrics, "mu"),
                            MODEL_UPDATES, metrics)
    record = runner.run("test")
    assert record.error is None and record.status in {"promoted", "rejected"}, record.error
    assert record.version == "v0002" and set(record.phases) == {"dpo", "merge", "save", "gate"}
    config = registry.get("v0002").training_config
    assert config["implementation"] == ("trl" if quantization == "nf4" else "prefloop")
    assert config["quantization"] == quantization
    summary = record.eval_summary
    assert summary.win_rate_vs_parent is not None and 0.0 <= summary.win_rate_vs_parent <= 1.0
    assert registry.current() == ("v0002" if record.status == "promoted" else "v0001")
