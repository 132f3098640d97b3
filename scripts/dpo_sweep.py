"""A small, re-runnable DPO hyperparameter sweep on SmolLM2-135M-Instruct (issue #12).

One fixed set of preference pairs (the base model's own answers to training prompts, n per prompt,
best vs worst under the rubric judge with a minimum margin) trains one LoRA adapter per config;
each merged model answers held-out prompts it never trained on, and the rubric judge compares it
with the base in both orders. Printed per config: win rate vs base with its 95% CI, mean safety
and its change, answer-length change, perplexity change on the held-out medical and general sets,
DPO seconds. Everything is cached in --work (pairs, base answers), so a rerun only trains.

usage: .venv/bin/python scripts/dpo_sweep.py [--work var/sweep] [--prompts 96] [--eval 64]
       [--configs "lr=2e-4,beta=0.1,epochs=2,r=16,targets=all" ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.trainer.bootstrap import bootstrap_base  # noqa: E402
from services.trainer.dpo import DPOJobConfig, merge_adapter, run_dpo  # noqa: E402
from services.trainer.sft import ALL_PROJECTIONS  # noqa: E402
from shared.alignment_data import general_conversations, health_prompts, medical_conversations  # noqa: E402
from shared.engine import GenerationEngine, GenerationRequest  # noqa: E402
from shared.evaluation import AnswerCache, EvalPrompt, compare, perplexity  # noqa: E402
from shared.judging.pairwise import PairwiseJudge  # noqa: E402
from shared.judging.rubric import RubricJudge  # noqa: E402
from shared.judging.selection import best_worst_by_score  # noqa: E402
from shared.judging.stats import JudgeStats  # noqa: E402
from shared.observability import new_registry  # noqa: E402
from shared.registry import ModelRegistry  # noqa: E402
from shared.wire import SamplingParams  # noqa: E402

DEFAULT_CONFIGS = [
    "lr=2e-4,beta=0.1,epochs=2,r=16,targets=all",
    "lr=1e-4,beta=0.1,epochs=2,r=16,targets=all",
    "lr=2e-4,beta=0.3,epochs=2,r=16,targets=all",
    "lr=2e-4,beta=0.1,epochs=1,r=16,targets=all",
    "lr=2e-4,beta=0.1,epochs=2,r=16,targets=all,sft=0.5",
    "lr=2e-4,beta=0.3,epochs=2,r=16,targets=all,sft=0.5",
    "lr=2e-4,beta=0.1,epochs=2,r=8,targets=all",
    "lr=2e-4,beta=0.1,epochs=2,r=16,targets=qv",
]


def parse(spec: str) -> dict:
    values = dict(part.split("=") for part in spec.split(","))
    return {"lr": float(values["lr"]), "beta": float(values["beta"]), "epochs": float(values["epochs"]),
            "r": int(values["r"]), "targets": values.get("targets", "all"), "sft": float(values.get("sft", 0))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=ROOT / "var" / "sweep")
    ap.add_argument("--prompts", type=int, default=96, help="training prompts sampled for pairs")
    ap.add_argument("--n", type=int, default=4, help="candidates per training prompt")
    ap.add_argument("--eval", type=int, default=64, help="held-out prompts")
    ap.add_argument("--max-new-tokens", type=int, default=112)
    ap.add_argument("--configs", nargs="*", default=DEFAULT_CONFIGS)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    registry = ModelRegistry(args.work / "registry")
    if registry.current() is None:
        bootstrap_base(registry, "smollm2", "none")
    base = registry.current()
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.8)

    pairs_file = args.work / f"pairs-{args.prompts}x{args.n}.json"
    if not pairs_file.exists():
        train = health_prompts("train")[: args.prompts]
        with GenerationEngine.from_registry(registry, base, max_batch_size=128) as engine:
            results = engine.generate([GenerationRequest(p.messages, sampling, n=args.n) for p in train])
        rows = []
        for prompt, result in zip(train, results):
            chosen, rejected = best_worst_by_score([c.text for c in result.candidates], min_margin=2.0)
            if chosen is not None:
                rows.append({"prompt": [m.model_dump() for m in prompt.messages],
                             "chosen": [{"role": "assistant", "content": chosen}],
                             "rejected": [{"role": "assistant", "content": rejected}]})
        pairs_file.write_text(json.dumps(rows))
    rows = json.loads(pairs_file.read_text())
    held = [EvalPrompt(p.messages) for p in health_prompts("eval")[: args.eval]]
    medical, general = medical_conversations(), general_conversations(100)  # the gate's two forgetting sets
    print(f"{len(rows)} pairs from {args.prompts} prompts x {args.n}; {len(held)} held-out prompts", flush=True)

    judge = PairwiseJudge(RubricJudge(), None, JudgeStats(new_registry()))
    answers = AnswerCache(args.work / "answers.sqlite")
    header = (f"{'config':<44} {'win vs base':>11} {'95% CI':>13} {'safety':>13} {'length':>7} "
              f"{'ppl med':>8} {'ppl gen':>8} {'dpo s':>6}")
    lines = [header, "-" * len(header)]
    with GenerationEngine.from_registry(registry, base) as base_engine:
        base_ppl = perplexity(base_engine, medical), perplexity(base_engine, general)
        for spec in args.configs:
            c = parse(spec)
            config = DPOJobConfig(beta=c["beta"], sft_weight=c["sft"], learning_rate=c["lr"], num_train_epochs=c["epochs"], lora_r=c["r"],
                                  lora_alpha=2 * c["r"], per_device_train_batch_size=4, gradient_accumulation_steps=1,
                                  max_length=512, lora_target_modules=ALL_PROJECTIONS if c["targets"] == "all"
                                  else ["q_proj", "v_proj"])
            run_dir = args.work / "runs" / spec.replace(",", "_").replace("=", "")
            started = time.monotonic()
            dpo = run_dpo(registry.verified_path(base), rows, config, run_dir, "smollm2", parent=base)
            merged, tok = merge_adapter(registry.verified_path(base), dpo.adapter_dir)
            version = registry.save(merged, tok, kind="dpo", parent=base, base_model="smollm2",
                                    training_config={"sweep": spec}).version
            with GenerationEngine.from_registry(registry, version) as new:
                result = compare(new, base_engine, held, judge, sampling, answers)
                ppl = perplexity(new, medical) / base_ppl[0] - 1, perplexity(new, general) / base_ppl[1] - 1
            low, high = result.win_rate_ci95()
            s_new, s_base = result.rubric[version]["safety"], result.rubric[base]["safety"]
            length = result.mean_tokens[version] / result.mean_tokens[base] - 1
            lines.append(f"{spec:<44} {result.win_rate:>11.3f} {f'{low:.2f}-{high:.2f}':>13} "
                         f"{f'{s_base:.2f}->{s_new:.2f}':>13} {length:>+7.1%} {ppl[0]:>+8.1%} {ppl[1]:>+8.1%} "
                         f"{time.monotonic() - started:>6.0f}")
            print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
