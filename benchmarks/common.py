"""What the benchmark scripts share: the model they run on and the command-line flags that pick it."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

def add_model_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="smollm2",
                    help="smollm2 (SmolLM2-135M-Instruct from the installed wheel), tiny (the offline tiny model), "
                         "or any base `prefloop bootstrap --base` takes")
    ap.add_argument("--registry", type=Path, default=None,
                    help="a registry to reuse (bootstrapped with --model when it has no current version); "
                         "default: a fresh one in a temporary folder")


def ensure_registry(model: str, registry: Path) -> Path:
    """The folder of the registry's current version, registering `model` first if it has none."""
    from shared.registry import ModelRegistry

    reg = ModelRegistry(registry)
    if reg.current() is None:
        from services.trainer.bootstrap import bootstrap_base, bootstrap_tiny

        bootstrap_tiny(reg) if model == "tiny" else bootstrap_base(reg, model, "none")
    return reg.verified_path(reg.current())


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]
