"""DPO job paths on the real tiny model: QLoRA (nf4) on CPU with dequantize-then-merge, and a
ledger snapshot export that TRL trains on unchanged."""

from __future__ import annotations

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

from services.trainer.dpo import DPOJobConfig, merge_adapter, run_dpo
from services.trainer.ledger import PreferenceLedger, to_trl_row
from shared.registry import ModelRegistry


def test_qlora_nf4_trains_on_cpu_and_merges_into_full_precision(tiny_registry, preferences, tmp_path):
    parent = ModelRegistry(tiny_registry).verified_path("v0001")
    config = DPOJobConfig(quantization="nf4", max_steps=3, learning_rate=2e-3)
    result = run_dpo(parent, [to_trl_row(p) for p in preferences[:12]], config, tmp_path / "run")
    assert result.steps == 3 and (result.adapter_dir / "adapter_config.json").exists()
    merged, _ = merge_adapter(parent, result.adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(str(parent))
    assert all(p.dtype == torch.float32 for p in merged.parameters())  # merged in full precision
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)


def test_an_exported_snapshot_loads_with_datasets_and_trains_with_trl_unchanged(tiny_registry, preferences, tmp_path):
    ledger = PreferenceLedger(tmp_path / "ledger")
    assert ledger.append(preferences) == len(preferences) and ledger.append(preferences) == 0
    ids = ledger.ids[:16]
    snapshot = ledger.snapshot(ids)
    assert ledger.snapshot_ids(snapshot) == sorted(ids) and ledger.snapshot(reversed(ids)) == snapshot
    path = ledger.export(tmp_path / "snapshot.jsonl", ledger.snapshot_ids(snapshot))
    data = load_dataset("json", data_files=str(path), split="train")
    assert len(data) == 16
    assert {"prompt", "chosen", "rejected", "source", "judge_id", "policy_version", "pair_id"} <= set(data.column_names)
    assert data[0]["chosen"][0]["role"] == "assistant" and data[0]["prompt"][-1]["role"] == "user"

    model_dir = str(ModelRegistry(tiny_registry).verified_path("v0001"))
    model, tok = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), max_steps=2, per_device_train_batch_size=4, use_cpu=True,
                     bf16=False, activation_checkpointing=False, report_to="none", save_strategy="no",
                     learning_rate=1e-3, disable_tqdm=True)
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                task_type="CAUSAL_LM"))
    trainer.train()
    assert trainer.state.global_step == 2 and any("rewards/accuracies" in h for h in trainer.state.log_history)
