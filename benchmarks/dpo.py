"""DPO pairs/s and peak memory: our configured run (services/trainer/dpo.py) vs TRL's
defaults with seed 001's settings (LoRA r16/a32 q,v; beta 0.1; batch 2 x accum 2; lr 5e-5;
TRL's default gradient checkpointing), same model, same pairs. Each runs in its own
process so peak RSS is its own. Last line: `ratio: X` = our pairs/s over the baseline's.

usage: python benchmarks/dpo.py [--registry DIR] [--pairs 64]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/prefs.py builds realistic pairs


def pairs_file(registry: Path, n: int, out: Path) -> None:
    from services.trainer.ledger import to_trl_row
    from shared.engine import GenerationEngine
    from shared.registry import ModelRegistry
    from tests.prefs import judged_preferences

    prefs = judged_preferences(GenerationEngine.from_registry(ModelRegistry(registry)), prompts=n * 2)[:n]
    out.write_text("\n".join(json.dumps(to_trl_row(p)) for p in prefs))


def child(which: str, registry: Path, data: Path) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from services.trainer.dpo import DPOJobConfig, run_dpo
    from shared.registry import ModelRegistry

    torch.manual_seed(0)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    parent = ModelRegistry(registry).verified_path(ModelRegistry(registry).current())
    started = time.perf_counter()
    if which == "ours":
        run_dpo(parent, rows, DPOJobConfig(learning_rate=5e-5), Path(tempfile.mkdtemp()))
    else:
        tok = AutoTokenizer.from_pretrained(str(parent))
        args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                         learning_rate=5e-5, lr_scheduler_type="cosine", beta=0.1, max_length=1024,
                         num_train_epochs=1, max_grad_norm=0.3, warmup_steps=0.03, use_cpu=True, bf16=False,
                         report_to="none", save_strategy="no", logging_steps=10, disable_tqdm=True)
        trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(str(parent)), ref_model=None, args=args,
                             train_dataset=Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")}
                                                              for r in rows]),
                             processing_class=tok,
                             peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                    target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        trainer.train()
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"pairs": len(rows), "seconds": seconds, "peak_mb": peak_mb}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--registry", type=Path, default=None)
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--child", choices=["ours", "baseline"])
    ap.add_argument("--data", type=Path)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.registry, args.data)
    registry = args.registry or Path(tempfile.mkdtemp()) / "registry"
    from shared.registry import ModelRegistry

    if ModelRegistry(registry).current() is None:
        from services.trainer.bootstrap import bootstrap_tiny

        bootstrap_tiny(ModelRegistry(registry))
    data = Path(tempfile.mkdtemp()) / "pairs.jsonl"
    pairs_file(registry, args.pairs, data)
    results = {}
    for which in ("baseline", "ours"):
        out = subprocess.run([sys.executable, __file__, "--child", which, "--registry", str(registry),
                              "--data", str(data)], capture_output=True, text=True, check=True, cwd=ROOT)
        results[which] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{results['ours']['pairs']} pairs, 1 epoch, tiny model on CPU (each run in its own process)")
    print(f"{'runner':<44}{'seconds':>9}{'pairs/s':>9}{'peak MB':>9}")
    rates = {}
    for which, label in (("baseline", "TRL defaults + seed 001 settings"), ("ours", "prefloop DPO job")):
        r = results[which]
        rates[which] = r["pairs"] / r["seconds"]
        print(f"{label:<44}{r['seconds']:>9.1f}{rates[which]:>9.1f}{r['peak_mb']:>9.0f}")
    print(f"peak memory ratio (ours / baseline): {results['ours']['peak_mb'] / results['baseline']['peak_mb']:.2f}")
    print(f"ratio: {rates['ours'] / rates['baseline']:.2f}")


if __name__ == "__main__":
    main()
