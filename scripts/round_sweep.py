"""Retrain one finished run with other settings and estimate each variant's win rate against the run's parent.

The gate decides on a few seeded answers per held-out question (the demo: 64 questions x 2 answers;
before 2026-12-01, 80 x 1 with about 45 decided), so whether a round lands is a coin with a bias:
this script measures the bias. It rebuilds the pairs a
run trained on (`scripts/ablate_run.py`'s `rebuild_run`: the new pairs in ledger order, then the replay
draw), trains them again from the run's parent once per variant, and has the parent and every variant
answer each held-out question `--samples` times (seeds fixed per label, sample and question, so a
variant's draw does not depend on its version number). The rubric verdict (the offline judge's: the
weighted rubric, a tie under one point; both orders agree by construction) decides every (question,
sample) pair. Printed per variant: pairs, win rate vs the parent with its 95% Wilson interval over the
decided comparisons, wins / losses / ties, mean safety and mean tokens (the parent's beside each), DPO seconds,
and what issue #12's goal reads: the win rate vs the lineage's base on the same draws (the base answers
with its own seeds) and held-out perplexity vs the base on the demo's forgetting sets (medical 64,
general 40; `--medical`, `--general`).

A variant is `name:key=value,key=value` over DPOJobConfig's fields (`learning_rate=3e-4`,
`max_steps=40`, `beta=0.1`), plus `replay=0` (the new pairs only; `replay=0.5`: the first half of the
replayed pairs as rebuilt), `without=user|judge` (leave a pair source out), `margin=4` (only judge pairs
whose weighted rubric margin is at least 4) and `start=root` (train the same pairs from the lineage's base
instead of the run's parent: a sibling of the parent, compared with it all the same).
`as-run:` (no keys) retrains the run as it was.

usage: .venv/bin/python scripts/round_sweep.py --state DEMO/state --run 2 --samples 4 \
       --variant as-run: --variant lr3:learning_rate=3e-4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from ablate_run import rebuild_run  # noqa: E402

from services.trainer.dpo import DPOJobConfig, choose_reference, merge_adapter, run_dpo  # noqa: E402
from services.trainer.gate import eval_prompts  # noqa: E402
from services.trainer.ledger import to_trl_row  # noqa: E402
from services.trainer.recipes import recipe_name  # noqa: E402
from services.trainer.reference_cache import ReferenceCache  # noqa: E402
from shared.engine import GenerationEngine, GenerationRequest  # noqa: E402
from shared.alignment_data import general_conversations, medical_conversations  # noqa: E402
from shared.evaluation import AnswerCache, Comparison  # noqa: E402
from shared.ids import content_id  # noqa: E402
from shared.judging.rubric import score, weighted  # noqa: E402
from shared.wire import SamplingParams  # noqa: E402


def margin(pair) -> float:
    """The judge's weighted rubric margin of a pair (inf for a pair without scores: a user's, kept)."""
    if pair.chosen_scores is None or pair.rejected_scores is None:
        return float("inf")
    return weighted(pair.chosen_scores) - weighted(pair.rejected_scores)


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """`name:key=value,key=value`; a comma starts a new setting only before `key=`, so a JSON list
    (`lora_target_modules=["q_proj","v_proj"]`) stays one value."""
    name, _, body = text.partition(":")
    settings = [kv for kv in re.split(r",(?=\w+=)", body) if kv]
    if bad := [kv for kv in settings if "=" not in kv]:
        raise SystemExit(f"variant {text!r}: {bad[0]!r} is not key=value")
    return name, dict(kv.split("=", 1) for kv in settings)


def apply(config: DPOJobConfig, overrides: dict[str, str]) -> DPOJobConfig:
    """Values as JSON (`3e-4`, `true`, `["q_proj","v_proj"]`), else as the string given (`reference=parent`)."""
    fields = {f.name for f in dataclasses.fields(DPOJobConfig)}
    changes = {}
    for key, text in overrides.items():
        if key in ("replay", "without", "margin", "start"):
            continue
        if key not in fields:
            raise SystemExit(f"unknown setting {key!r}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        changes[key] = float(value) if isinstance(getattr(config, key), float) and isinstance(value, int) else value
    return dataclasses.replace(config, **changes)


def sampled_answers(engine: GenerationEngine, label: str, prompts, sampling: SamplingParams, samples: int):
    """`samples` answers per prompt, seeded by (label, sample, prompt)."""
    requests = [GenerationRequest(p.messages, sampling.model_copy(update={"seed": int(content_id(
        "seed", {"l": label, "k": k, "q": p.messages[-1].content})[5:20], 16)}))
        for k in range(samples) for p in prompts]
    return [r.candidates[0] for r in engine.generate(requests)]


def score_diffs(new_scores, old_scores) -> list[float]:
    """Weighted rubric of answer k minus that of answer k; sample-major (question i at i, i + n, ...)."""
    return [weighted(n) - weighted(o) for n, o in zip(new_scores, old_scores)]


def tally(candidate: str, baseline: str, diffs: list[float], questions: int, samples: int) -> Comparison:
    """The rubric verdicts of `score_diffs`: a win from one point up, a loss from one point down."""
    per_prompt = [(sum(d >= 1 for d in diffs[i::questions]), sum(d <= -1 for d in diffs[i::questions]))
                  for i in range(questions)]
    return Comparison(candidate=candidate, baseline=baseline, prompts=questions, wins=sum(d >= 1 for d in diffs),
                      losses=sum(d <= -1 for d in diffs), samples=samples, per_prompt=per_prompt)


def rate(c: Comparison) -> str:
    low, high = c.win_rate_ci95()
    return f"{c.win_rate:.3f} ({low:.3f}-{high:.3f})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--state", type=Path, required=True)
    ap.add_argument("--run", type=int, required=True, help="which finished run, 1-based")
    ap.add_argument("--variant", action="append", required=True, help="name:key=value,...")
    ap.add_argument("--prompts", type=int, default=64, help="held-out questions (the demo's gate: 64)")
    ap.add_argument("--samples", type=int, default=4, help="answers per question and version")
    ap.add_argument("--max-new-tokens", type=int, default=96, help="the demo's gate: 96")
    ap.add_argument("--work", type=Path, default=ROOT / "var" / "round-sweep")
    ap.add_argument("--medical", type=int, default=64, help="medical forgetting set (the demo's: 64)")
    ap.add_argument("--general", type=int, default=40, help="general forgetting set (the demo's: 40)")
    args = ap.parse_args()
    config, pairs, run, registry, work = rebuild_run(args.state, args.run, args.work)
    parent = run["parent"]
    if (args.state / "runs" / "reference_logps.sqlite").exists():
        shutil.copy(args.state / "runs" / "reference_logps.sqlite", work / "reference_logps.sqlite")
    cache = ReferenceCache(work / "reference_logps.sqlite")
    meta = registry.get(parent)
    recipe = recipe_name(meta.base_model, meta.source)
    prompts = eval_prompts(args.prompts)
    refs = [p.reference for p in prompts] * args.samples
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens)
    rows = min(len(prompts) * args.samples, 128)
    base = registry.lineage(parent)[-1]
    sets = {"medical": medical_conversations(args.medical), "general": general_conversations(args.general)}
    perplexities = AnswerCache(work / "perplexity.sqlite")
    with GenerationEngine.from_registry(registry, parent, max_batch_size=rows) as engine:
        old = sampled_answers(engine, "parent", prompts, sampling, args.samples)
    with GenerationEngine.from_registry(registry, base, max_batch_size=rows) as engine:
        root = sampled_answers(engine, "base", prompts, sampling, args.samples)
        base_ppl = {name: perplexities.perplexity(engine, c) for name, c in sets.items()}
    old_scores = [score(a.text, r) for a, r in zip(old, refs)]
    parent_tokens = sum(a.completion_tokens for a in old) / len(old)
    root_scores = [score(a.text, r) for a, r in zip(root, refs)]
    print(f"run {args.run}: {run['version']} from {parent}, {len(pairs)} pairs ({run['pairs_replay']} replayed), "
          f"{args.prompts} questions x {args.samples} samples", flush=True)
    header = (f"{'variant':<14} {'pairs':>5} {'win vs parent (95% CI)':>24} {'W/L/T':>11} "
              f"{'safety (parent)':>16} {'tokens (parent)':>16} {'dpo s':>6} {'win vs base (95% CI)':>22} "
              f"{'safety vs base':>15} {'ppl vs base med/gen':>20}")
    lines = [header]
    replay = pairs[len(pairs) - run["pairs_replay"]:] if run["pairs_replay"] else []
    for name, overrides in map(parse_variant, args.variant):
        share = float(overrides.get("replay", "1"))  # of the run's replayed pairs, the first as rebuilt
        dropped = {e.id for e in replay[round(len(replay) * share):]}
        chosen = [e for e in pairs if e.id not in dropped
                  and e.source != overrides.get("without") and margin(e) >= float(overrides.get("margin", "-inf"))]
        variant_config = apply(config, overrides)
        origin = base if overrides.get("start") == "root" else parent
        started = time.monotonic()
        dpo = run_dpo(registry.verified_path(origin), [to_trl_row(e) for e in chosen], variant_config,
                      work / "runs" / name, recipe, parent=origin, reference_cache=cache,
                      reference=choose_reference(registry, origin, variant_config.reference))
        seconds = time.monotonic() - started
        merged, tok = merge_adapter(registry.verified_path(origin), dpo.adapter_dir)
        version = registry.save(merged, tok, kind="dpo", parent=origin, base_model=meta.base_model,
                                training_config={"sweep": name}).version
        with GenerationEngine.from_registry(registry, version, max_batch_size=rows) as engine:
            new = sampled_answers(engine, name, prompts, sampling, args.samples)
            drift = {k: perplexities.perplexity(engine, c) / base_ppl[k] - 1 for k, c in sets.items()}
        new_scores = [score(a.text, r) for a, r in zip(new, refs)]
        diffs = score_diffs(new_scores, old_scores)
        vs_parent = tally(version, parent, diffs, len(prompts), args.samples)
        vs_base = tally(version, base, score_diffs(new_scores, root_scores), len(prompts), args.samples)
        safety = sum(s.safety for s in new_scores) / len(new_scores)
        parent_safety = sum(s.safety for s in old_scores) / len(old_scores)
        base_safety = sum(s.safety for s in root_scores) / len(root_scores)
        tokens = sum(a.completion_tokens for a in new) / len(new)
        ties = len(new) - vs_parent.wins - vs_parent.losses
        ppl_text = f"{drift['medical']:+.1%} / {drift['general']:+.1%}"
        lines.append(f"{name:<14} {len(chosen):>5} {rate(vs_parent):>24} "
                     f"{f'{vs_parent.wins}/{vs_parent.losses}/{ties}':>11} "
                     f"{f'{safety:.2f} ({parent_safety:.2f})':>16} {f'{tokens:.1f} ({parent_tokens:.1f})':>16} "
                     f"{seconds:>6.0f} {rate(vs_base):>22} "
                     f"{f'{safety - base_safety:+.2f}':>15} {ppl_text:>20}")
        print(lines[-1], flush=True)
        (work / f"{name}.json").write_text(json.dumps({  # per (sample, question), for a closer look
            "questions": len(prompts), "samples": args.samples, "new": [a.text for a in new],
            "diffs_vs_parent": diffs,
            "parent": [a.text for a in old], "base": [a.text for a in root], "perplexity_vs_base": drift}))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
