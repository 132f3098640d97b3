"""DPO pairs/s and peak memory: prefloop's DPO job vs TRL's DPOTrainer, same model, same pairs.

Rows (each run in its own process, so its peak RSS is its own):
- TRL DPOTrainer with TRL's defaults and seed 001's settings (LoRA r16 on q/v, batch 2 x 2,
  max_length 1024, TRL's default activation checkpointing, `bf16=True`: bf16 autocast where the CPU
  computes bf16 natively, else fp32): what the seed's code runs.
- TRL DPOTrainer at prefloop's settings (same batch, LoRA targets, lengths, no activation
  checkpointing, precomputed reference log-probs), in fp32 (the trainer's TRL path on CPU) and, where
  the CPU computes bf16 natively, under bf16 autocast (`bf16=True`): like with like on dtype for
  prefloop's first run, whose frozen base computes in bf16 there.
- prefloop's job (`services/trainer/lean_dpo.py`, the trainer's real path), first run;
- the same pairs again with the reference log-probs cached (a replayed pair's cost);
- prefloop's job at seed 001's settings with TRL's default memory policy (activation checkpointing,
  LoRA r16 on q/v, 4 pairs per optimizer step, max_length 1024, lr 5e-5): like with like for the first row.
Last line: `ratio: X` = prefloop's job over TRL's DPOTrainer at TRL's defaults with seed 001's settings,
both checkpointing activations, in pairs/s (the issue's comparison); the table also prints prefloop's
first run over TRL at prefloop's settings, and each pair's peak-memory ratio.

usage: .venv/bin/python benchmarks/dpo.py [--model smollm2|tiny] [--registry DIR] [--pairs 64]
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
sys.path.insert(0, str(ROOT))
from benchmarks.common import add_model_args, ensure_registry  # noqa: E402
from shared.allocator import reexec_with_malloc_tunables  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SETTINGS = dict(beta=0.1, learning_rate=2e-4, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                num_train_epochs=1.0, max_length=384, lora_r=16, lora_alpha=32, lora_target_modules=ALL)
SEED_SETTINGS = dict(beta=0.1, learning_rate=5e-5, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                     num_train_epochs=1.0, max_length=1024, lora_r=16, lora_alpha=32, max_grad_norm=0.3,
                     lora_target_modules=["q_proj", "v_proj"], activation_checkpointing=True)


def make_pairs(parent: Path, n: int, out: Path) -> None:
    """The model's own answers to training questions, best vs worst under the rubric (margin 2)."""
    from shared.alignment_data import health_prompts
    from shared.engine import GenerationEngine, GenerationRequest
    from shared.judging.selection import best_worst_by_score
    from shared.wire import SamplingParams

    prompts = health_prompts("train")
    rows: list[dict] = []
    with GenerationEngine.from_path(parent, version="bench", max_batch_size=128) as engine:
        for start in range(0, len(prompts), 64):
            batch = prompts[start:start + 64]
            results = engine.generate([GenerationRequest(p.messages, SamplingParams(max_new_tokens=96, temperature=0.8),
                                                         n=4) for p in batch])
            for p, r in zip(batch, results):
                chosen, rejected = best_worst_by_score([c.text for c in r.candidates], 2.0)
                if chosen is not None:
                    rows.append({"pair_id": p.id, "prompt": [m.model_dump() for m in p.messages],
                                 "chosen": [{"role": "assistant", "content": chosen}],
                                 "rejected": [{"role": "assistant", "content": rejected}]})
            if len(rows) >= n:
                break
    out.write_text("\n".join(json.dumps(r) for r in rows[:n]))


def child(which: str, parent: Path, data: Path, cache: Path) -> None:
    import torch

    from services.trainer.dpo import DPOJobConfig, run_dpo
    from services.trainer.reference_cache import ReferenceCache

    torch.manual_seed(0)
    native_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    work = Path(tempfile.mkdtemp())
    started = time.perf_counter()
    if which in ("ours", "ours-replay"):
        run_dpo(parent, rows, DPOJobConfig(**SETTINGS, dpo_implementation="prefloop"), work, parent=str(parent),
                reference_cache=ReferenceCache(cache))
    elif which == "ours-seed":
        run_dpo(parent, rows, DPOJobConfig(**SEED_SETTINGS, dpo_implementation="prefloop"), work, parent=str(parent),
                reference_cache=ReferenceCache(cache.with_name("refs-seed.sqlite")))
    elif which == "trl-same":
        run_dpo(parent, rows, DPOJobConfig(**SETTINGS, dpo_implementation="trl", precompute_ref_log_probs=True), work)
    elif which == "trl-same-bf16":
        trl_train(parent, rows, work, bf16=native_bf16, precompute_ref_log_probs=True, activation_checkpointing=False,
                  **{k: v for k, v in SETTINGS.items() if k not in ("lora_r", "lora_alpha", "lora_target_modules")})
    else:  # seed 001's DPOConfig (bf16=True), on CPU: adamw_torch for its paged_adamw_8bit, which needs CUDA
        trl_train(parent, rows, work, per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=5e-5,
                  beta=0.1, max_length=1024, num_train_epochs=1, max_grad_norm=0.3, warmup_steps=0.03,
                  bf16=native_bf16, lora_target_modules=["q_proj", "v_proj"])
    seconds = time.perf_counter() - started
    # Where the CPU computes bf16 natively, prefloop's loop runs its frozen base in bf16 and TRL's rows (but the
    # trainer's own TRL path, which is fp32 on CPU) run under bf16 autocast, as seed 001 sets `bf16=True`.
    bf16 = native_bf16 and which != "trl-same"
    print(json.dumps({"pairs": len(rows), "seconds": seconds, "base": "bf16" if bf16 else "fp32",
                      "peak_mb": own_peak_mb()}))


def trl_train(parent: Path, rows: list[dict], work: Path, *, lora_target_modules: list[str] = ALL, **config) -> None:
    """TRL's DPOTrainer as a user of TRL would run it (no prefloop code but the LM head's tile fit the
    trainer's TRL path also applies), LoRA r16 / alpha 32 / dropout 0.05."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from services.trainer.sft import fit_trl_logprob_tiles

    args = DPOConfig(output_dir=str(work), lr_scheduler_type="cosine", use_cpu=True, report_to="none",
                     save_strategy="no", logging_steps=10, disable_tqdm=True, **config)
    model = AutoModelForCausalLM.from_pretrained(str(parent))
    fit_trl_logprob_tiles(model)
    trainer = DPOTrainer(model=model, ref_model=None, args=args,
                         train_dataset=Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")}
                                                          for r in rows]),
                         processing_class=AutoTokenizer.from_pretrained(str(parent)),
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                target_modules=lora_target_modules, task_type="CAUSAL_LM"))
    trainer.train()


def own_peak_mb() -> float:
    """This process's peak RSS since its exec. Not ru_maxrss: Linux carries the forking parent's peak
    across exec into it, so every row showed at least the parent's RSS after it generated the pairs."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


ROWS = [("trl-seed", "TRL DPOTrainer, seed 001 settings (bf16=True)"),
        ("trl-same", "TRL DPOTrainer, prefloop's settings, trainer's path"),
        ("trl-same-bf16", "TRL DPOTrainer, prefloop's settings, autocast"),
        ("ours", "prefloop DPO job (first run)"),
        ("ours-replay", "prefloop DPO job (references cached)"),
        ("ours-seed", "prefloop DPO job, seed 001 settings + checkpointing")]


def main() -> None:
    ap = argparse.ArgumentParser()
    add_model_args(ap)
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--child")
    ap.add_argument("--parent", type=Path)
    ap.add_argument("--data", type=Path)
    ap.add_argument("--cache", type=Path)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.parent, args.data, args.cache)
    work = Path(tempfile.mkdtemp(prefix="prefloop-bench-dpo-"))
    parent = ensure_registry(args.model, args.registry or work / "registry")
    data = work / "pairs.jsonl"
    make_pairs(parent, args.pairs, data)
    results = {}
    for which, _ in ROWS:
        out = subprocess.run([sys.executable, __file__, "--child", which, "--parent", str(parent), "--data", str(data),
                              "--cache", str(work / "refs.sqlite")], capture_output=True, text=True, check=True, cwd=ROOT)
        results[which] = json.loads(out.stdout.strip().splitlines()[-1])
    pairs = results["ours"]["pairs"]
    print(f"{args.model}: {pairs} pairs, 1 epoch, CPU, {SETTINGS['per_device_train_batch_size']} pairs per step "
          f"(each row in its own process)")
    print(f"{'runner':<52}{'base':>6}{'seconds':>9}{'pairs/s':>9}{'peak MB':>9}")
    for which, label in ROWS:
        r = results[which]
        print(f"{label:<52}{r['base']:>6}{r['seconds']:>9.1f}{r['pairs'] / r['seconds']:>9.2f}{r['peak_mb']:>9.0f}")
    for mine, theirs, what in (("ours", "trl-same", "prefloop's settings"),
                               ("ours", "trl-same-bf16", "prefloop's settings, TRL with autocast"),
                               ("ours-seed", "trl-seed", "TRL defaults + seed 001 settings, both checkpointing")):
        a, b = results[mine], results[theirs]
        print(f"at {what}: {b['seconds'] / a['seconds']:.2f}x pairs/s, peak memory prefloop / TRL "
              f"{a['peak_mb'] / b['peak_mb']:.2f}")
    print(f"ratio: {results['trl-seed']['seconds'] / results['ours-seed']['seconds']:.2f}")


if __name__ == "__main__":
    reexec_with_malloc_tunables()  # the torch services' malloc settings (shared/allocator.py), both rows alike
    main()
