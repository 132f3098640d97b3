"""Retrain one finished run of a demo (or any trainer state) with and without its pairs of one source.

Which pairs move the forgetting guard? This takes a run from `STATE/runs/runs.jsonl`, rebuilds the
exact pairs it trained on (its new pairs in ledger order, then the replayed older pairs in the
trainer's seeded sample order), and trains them again from the run's parent with the run's own
training configuration (the trainer's DPO path), once as they were and once per `--without` source
(`user`, `judge`, `human`) left out, and each of those once per `--reference` (the DPO reference:
the run's parent, or the lineage's root). Printed per variant: pairs, medical and general held-out
perplexity change vs the parent and vs the root (the gate's two forgetting sets at the sizes
given), DPO seconds. The `all` row with the run's own reference is the run retrained: compare it
with the run's own gate figure before reading the rest.

usage: .venv/bin/python scripts/ablate_run.py --state demo-out/state --run 2 [--without user]
       [--reference parent root]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.trainer.dpo import DPOJobConfig, choose_reference, merge_adapter, run_dpo  # noqa: E402
from services.trainer.ledger import PreferenceLedger, to_trl_row  # noqa: E402
from services.trainer.recipes import recipe_name  # noqa: E402
from shared.alignment_data import general_conversations, medical_conversations  # noqa: E402
from shared.engine import GenerationEngine  # noqa: E402
from shared.evaluation import perplexity  # noqa: E402
from shared.registry import ModelRegistry  # noqa: E402


def finished_runs(state: Path) -> list[dict]:
    """The last record of each run, in start order."""
    last: dict[str, dict] = {}
    for line in (state / "runs" / "runs.jsonl").read_text().splitlines():
        record = json.loads(line)
        last[record["run_id"]] = record
    return [r for r in last.values() if r["status"] != "running"]


def run_pairs(state: Path, index: int, runs: list[dict], seed: int) -> tuple[list, dict]:
    """The pairs run `index` (0-based) trained on, in the order the trainer gave them to DPO."""
    run = runs[index]
    ledger = PreferenceLedger(state / "ledger")
    events = list(ledger.events())
    trained = set(ledger.snapshot_ids(run["snapshot_id"]))
    new_ids = run["new_pair_ids"]
    new = set(new_ids)
    by_id = {e.id: e for e in events}
    # The replay is drawn from the pairs earlier runs used up (TrainingRunner.new_pair_ids): every pair
    # still new when the run started stays out of it, trained now or left waiting by `max_pairs_per_run`.
    used = {i for r in runs[:index] if r["status"] in ("promoted", "rejected")
            for i in r["new_pair_ids"] + r.get("stale_pair_ids", [])}
    older = sorted((e for e in events if e.id in used and e.split == "train"), key=lambda e: e.id)
    # the trainer seeds its replay sample with the number of runs recorded, this one included
    rng = random.Random(f"{seed}-{index + 1}")
    replay = rng.sample(older, run["pairs_replay"]) if run["pairs_replay"] else []
    if {e.id for e in replay} | new != trained:  # other settings (stale_versions, ...): fall back to the set
        replay = [by_id[i] for i in sorted(trained - new)]
        print("note: replay order not reproduced (the snapshot's set is used, in id order)", flush=True)
    # in pair-id order, as the trainer's (since 2026-12-05; runs before it trained in arrival order and drew
    # the replay from the ledger's order: for those this rebuilds the set, not the order)
    return sorted([by_id[i] for i in new_ids if i in trained] + replay, key=lambda e: e.id), run


def rebuild_run(state: Path, run_no: int, work_root: Path) -> tuple[DPOJobConfig, list, dict, ModelRegistry, Path]:
    """Run `run_no` (1-based) of `state`: its DPO config, its pairs in training order, its record, and a
    private registry holding its parent's lineage (nothing is ever written into `state`), in `work`."""
    runs, source = finished_runs(state), ModelRegistry(state / "registry")
    record = runs[run_no - 1]
    # a run rejected before the gate saved no version: its parent's configuration is the loop's
    fields = source.get(record["version"] or record["parent"]).training_config
    if not fields:
        raise SystemExit(f"run {run_no}: neither it nor its parent {record['parent']} was trained by a run")
    config = DPOJobConfig(**{k: v for k, v in fields.items() if k in DPOJobConfig.__dataclass_fields__})
    pairs, run = run_pairs(state, run_no - 1, runs, config.seed)
    work = work_root / f"{state.resolve().name}-run{run_no}"
    (work / "registry").mkdir(parents=True, exist_ok=True)
    lineage = source.lineage(run["parent"])
    copied = [v for v in lineage if (work / "registry" / v).exists()]
    if any(ModelRegistry(work / "registry").get(v).checksums != source.get(v).checksums for v in copied):
        shutil.rmtree(work / "registry")  # another state of the same folder name (every demo's is DIR/state)
    for version in lineage:
        if not (work / "registry" / version).exists():
            shutil.copytree(state / "registry" / version, work / "registry" / version)
    return config, pairs, run, ModelRegistry(work / "registry"), work


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--state", type=Path, required=True, help="a demo's state directory (registry, ledger, runs)")
    ap.add_argument("--run", type=int, required=True, help="which finished run, 1-based")
    ap.add_argument("--without", nargs="*", default=["user"], help="pair sources to leave out, one variant each")
    ap.add_argument("--work", type=Path, default=ROOT / "var" / "ablation")
    ap.add_argument("--medical", type=int, default=110, help="held-out medical Q/A pairs (the gate's guard: at most 110)")
    ap.add_argument("--general", type=int, default=100, help="general Q/A pairs")
    ap.add_argument("--reference", nargs="*", choices=["parent", "root"], help="DPO references to train with "
                    "(default: the run's own)")
    args = ap.parse_args()
    config, pairs, run, registry, work = rebuild_run(args.state, args.run, args.work)
    parent = run["parent"]
    root = registry.lineage(parent)[-1]
    parent_meta = registry.get(parent)
    base_model, recipe = parent_meta.base_model, recipe_name(parent_meta.base_model, parent_meta.source)
    medical, general = medical_conversations(args.medical), general_conversations(args.general)
    before = {}
    for version in dict.fromkeys([parent, root]):
        with GenerationEngine.from_registry(registry, version) as engine:
            before[version] = perplexity(engine, medical), perplexity(engine, general)
    print(f"run {args.run}: {run['version']} from {parent} (root {root}), {len(pairs)} pairs, "
          f"max steps {config.max_steps}, reference {config.reference}", flush=True)
    lines = [f"{'variant':<26} {'pairs':>5} {'medical vs parent':>17} {'general vs parent':>17} "
             f"{'medical vs root':>15} {'general vs root':>15} {'dpo s':>6}"]
    references = args.reference or [config.reference]
    for variant, reference in [(v, r) for v in ["all", *args.without] for r in references]:
        rows = [to_trl_row(e) for e in pairs if variant == "all" or e.source != variant]
        started = time.monotonic()
        name = ("all pairs" if variant == "all" else f"without {variant}") + f", ref {reference}"
        dpo = run_dpo(registry.verified_path(parent), rows, dataclasses.replace(config, reference=reference),
                      work / "runs" / name.replace(" ", "_").replace(",", ""), recipe, parent=parent,
                      reference=choose_reference(registry, parent, reference))
        merged, tok = merge_adapter(registry.verified_path(parent), dpo.adapter_dir)
        version = registry.save(merged, tok, kind="dpo", parent=parent, base_model=base_model,
                                training_config={"ablation": name}).version
        with GenerationEngine.from_registry(registry, version) as engine:
            after = perplexity(engine, medical), perplexity(engine, general)
        change = [after[i] / before[v][i] - 1 for v in (parent, root) for i in (0, 1)]
        lines.append(f"{name:<26} {len(rows):>5} {change[0]:>+17.1%} {change[1]:>+17.1%} {change[2]:>+15.1%} "
                     f"{change[3]:>+15.1%} {time.monotonic() - started:>6.0f}")
        print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
