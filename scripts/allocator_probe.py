"""The torch services' malloc settings (shared/allocator.py) against glibc's defaults, on a demo's state.

Each row is a fresh child process (glibc reads GLIBC_TUNABLES at start), alternating the two settings
(and `--also`'s) `--repeat` times; each child times one piece of the services' work and reports its own rusage for it:
- `answers`: the gate's answers, 64 held-out-sized training questions x 2 (96 tokens, one engine batch),
  from the run's parent;
- `dpo`: `--steps` DPO steps on run `--run`'s pairs from its parent, reference pass included.
Printed per row: seconds, user and system CPU seconds, minor page faults, the child's peak RSS.

usage: .venv/bin/python scripts/allocator_probe.py --state DEMO/state --what answers --repeat 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from shared.allocator import MALLOC_TUNABLES  # noqa: E402

SETTINGS = {"glibc defaults": "", "services' settings": MALLOC_TUNABLES}


def answers(state: Path, run: int, _steps: int, _work: Path) -> Iterator[None]:
    from ablate_run import finished_runs
    from two_processes import PREFIX, rows

    from shared.engine import GenerationEngine
    from shared.registry import ModelRegistry

    registry = ModelRegistry(state / "registry")
    parent = finished_runs(state)[run - 1]["parent"]
    with GenerationEngine.from_registry(registry, parent, max_batch_size=128, shared_prefix=PREFIX) as engine:
        requests = rows(64, n=2)
        yield
        engine.generate(requests)


def dpo(state: Path, run: int, steps: int, work: Path) -> Iterator[None]:
    from ablate_run import rebuild_run

    from services.trainer.dpo import choose_reference, run_dpo
    from services.trainer.reference_cache import ReferenceCache
    from services.trainer.ledger import to_trl_row
    from services.trainer.recipes import recipe_name

    config, pairs, record, registry, work = rebuild_run(state, run, work)
    config = dataclasses.replace(config, max_steps=steps)
    parent = record["parent"]
    meta = registry.get(parent)
    cache = ReferenceCache(work / "ref.sqlite")
    yield
    run_dpo(registry.verified_path(parent), [to_trl_row(e) for e in pairs], config, work / "runs" / "probe",
            recipe_name(meta.base_model, meta.source), parent=parent, reference_cache=cache,
            reference=choose_reference(registry, parent, config.reference))


def child(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="allocator-probe-"))
    try:
        probe = {"answers": answers, "dpo": dpo}[args.child](args.state, args.run, args.steps, work)
        next(probe)  # loaded: time only the work itself
        before, started = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        next(probe, None)
        seconds, after = time.monotonic() - started, resource.getrusage(resource.RUSAGE_SELF)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"seconds": seconds, "user": after.ru_utime - before.ru_utime,
                      "sys": after.ru_stime - before.ru_stime, "minflt": after.ru_minflt - before.ru_minflt,
                      "peak_mb": after.ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--state", type=Path, required=True, help="a finished demo's state directory")
    ap.add_argument("--what", choices=["answers", "dpo"], default="answers")
    ap.add_argument("--run", type=int, default=1, help="which run's parent (and pairs), 1-based")
    ap.add_argument("--steps", type=int, default=10, help="DPO steps")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--also", help="a third GLIBC_TUNABLES value to try (e.g. ...:glibc.malloc.arena_max=1)")
    ap.add_argument("--child", choices=["answers", "dpo"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    settings = {**SETTINGS, **({"--also": args.also} if args.also else {})}
    print(f"{'setting':<20} {'seconds':>8} {'user':>7} {'sys':>6} {'minor faults':>13} {'peak MB':>8}", flush=True)
    for _ in range(args.repeat):
        for name, tunables in settings.items():
            out = subprocess.run([sys.executable, __file__, "--child", args.what, "--state", str(args.state),
                                  "--run", str(args.run), "--steps", str(args.steps)],
                                 env={**os.environ, "GLIBC_TUNABLES": tunables}, capture_output=True, text=True,
                                 check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{name:<20} {r['seconds']:>8.1f} {r['user']:>7.1f} {r['sys']:>6.1f} {r['minflt']:>13,} "
                  f"{r['peak_mb']:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
