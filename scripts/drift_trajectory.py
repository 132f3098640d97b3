"""Retrain one run of a demo from its parent with the drift budget off and print the drift monitor at
every check: how far a round would move it, not only where the budget stopped it.

A rejected run works too (the budget's "no room" rounds are the reason this exists): the pairs are
rebuilt as `scripts/ablate_run.py` rebuilds them (new pairs in ledger order, then the replay draw),
the training configuration is the parent's own (a rejected run saved no version), the reference is
the run's (`--reference`, the demo's: the lineage's root). A variant is a JSON object of
DPOJobConfig fields (`{"learning_rate": 1.5e-4}`); `{}` is the run's own settings. Readings are
against the lower of the parent's and the reference's monitor perplexity, as the budget counts.

`--start root` trains the same pairs from the lineage's root instead: whether a round's drift comes from
its pairs or from where it starts.

usage: .venv/bin/python scripts/drift_trajectory.py --state DIR/state --run 2 --variant '{}' \
       --variant '{"warmup_ratio": 0.15}'
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from ablate_run import finished_runs, run_pairs  # noqa: E402

from services.trainer.dpo import DPOJobConfig, choose_reference, run_dpo  # noqa: E402
from services.trainer.drift_budget import MonitorReadings  # noqa: E402
from services.trainer.ledger import to_trl_row  # noqa: E402
from services.trainer.recipes import recipe_name  # noqa: E402
from services.trainer.reference_cache import ReferenceCache  # noqa: E402
from shared.evaluation import AnswerCache  # noqa: E402
from shared.registry import ModelRegistry  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--state", type=Path, required=True, help="a demo's state directory")
    ap.add_argument("--run", type=int, required=True, help="which finished run, 1-based")
    ap.add_argument("--variant", action="append", default=[], help="JSON object of DPOJobConfig fields")
    ap.add_argument("--reference", choices=["parent", "root"], default="root")
    ap.add_argument("--start", choices=["parent", "root"], default="parent",
                    help="train from the run's parent (as it trained) or from the lineage's root: the same pairs "
                         "and settings from the weights a first round starts at")
    ap.add_argument("--direction", action="store_true",
                    help="also print the cosine between each variant's change to the weights and the run's parent's "
                         "change from the root")
    ap.add_argument("--work", type=Path, default=ROOT / "var" / "drift")
    args = ap.parse_args()
    runs = finished_runs(args.state)
    run = runs[args.run - 1]
    registry, parent = ModelRegistry(args.state / "registry"), run["parent"]
    meta = registry.get(parent)
    if not meta.training_config:
        raise SystemExit(f"{parent} was not trained by a run: its configuration is unknown")
    config = DPOJobConfig(**{k: v for k, v in meta.training_config.items() if k in DPOJobConfig.__dataclass_fields__})
    pairs, _ = run_pairs(args.state, args.run - 1, runs, config.seed)
    start = registry.lineage(parent)[-1] if args.start == "root" else parent
    args.work.mkdir(parents=True, exist_ok=True)
    refs, readings = ReferenceCache(args.work / "refs.sqlite"), AnswerCache(args.work / "perplexity.sqlite")
    print(f"run {args.run} ({run['status']}) from {start}: {len(pairs)} pairs")
    for text in args.variant or ["{}"]:
        variant = json.loads(text)
        job = dataclasses.replace(config, **{**variant, "max_drift": 1.0})  # every check reads; none stops it
        started = time.monotonic()
        reference = choose_reference(registry, start, args.reference)
        result = run_dpo(registry.verified_path(start), [to_trl_row(e) for e in pairs], job,
                         args.work / f"run-{time.time_ns()}", recipe_name(meta.base_model, meta.source),
                         parent=start, reference_cache=refs, reference=reference,
                         readings=MonitorReadings(readings, registry.weights_id(start),
                                                  registry.weights_id(reference.version) if reference else ""))
        readings_text = ", ".join(f"{h['step']}: {h['drift/perplexity_change']:+.2%}" for h in result.history
                                  if "drift/perplexity_change" in h)
        print(f"{text}: {readings_text}; margin {result.history[-1]['rewards/margins']:.2f}; "
              f"{time.monotonic() - started:.0f} s", flush=True)
        if args.direction:
            print(f"  direction: cosine {direction(registry, parent, result.adapter_dir):+.3f} with {parent}'s own "
                  f"change from the root (all adapted weights)", flush=True)


def direction(registry: ModelRegistry, parent: str, adapter_dir: Path) -> float:
    """Cosine between the adapter's change to the weights and `parent`'s change from the lineage's root,
    over the weights the adapter adapts (the parent's change elsewhere is left out: the recipe's rounds
    adapt the same projections): whether this round goes on in the direction the parent went. NaN for a
    first round."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = registry.lineage(parent)[-1]
    if root == parent:
        return float("nan")  # a first round: the parent has no change of its own
    load = lambda v: AutoModelForCausalLM.from_pretrained(str(registry.verified_path(v)), dtype=torch.float32)
    base = load(root)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    after = load(parent).state_dict()
    adapted = PeftModel.from_pretrained(base, str(adapter_dir))
    dot = norm_a = norm_b = 0.0
    for name, module in adapted.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "active_adapters"):
            key = name.removeprefix("base_model.model.") + ".weight"
            change = module.get_delta_weight(module.active_adapters[0]).double()
            went = (after[key] - before[key]).double()
            dot, norm_a, norm_b = dot + (change * went).sum().item(), norm_a + change.square().sum().item(), \
                norm_b + went.square().sum().item()
    return dot / max(1e-30, (norm_a * norm_b) ** 0.5)


if __name__ == "__main__":
    main()
