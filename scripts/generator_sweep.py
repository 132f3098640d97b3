"""Sweep the generator's batching settings on the service's own path (benchmarks/generation.py's
row (a)): batch_size prompts per handled batch x max_batch_sequences decoded together.
Prints candidates/s per setting; the best on this machine should be GeneratorSettings' default.

usage: python scripts/generator_sweep.py [--registry DIR] [--prompts 64] [--max-new-tokens 128]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import add_model_args, ensure_registry  # noqa: E402
from benchmarks.generation import Row, service_path  # noqa: E402
from shared.alignment_data import health_prompts  # noqa: E402
from shared.engine import GenerationEngine, GenerationRequest  # noqa: E402
from shared.registry import ModelRegistry  # noqa: E402
from shared.wire import SamplingParams  # noqa: E402

SETTINGS = [(16, 32), (32, 64), (48, 96), (64, 128)]
"""(batch_size, max_batch_sequences): n=2 candidates per prompt fill the sequences exactly"""


def main() -> None:
    ap = argparse.ArgumentParser()
    add_model_args(ap)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    args = ap.parse_args()
    root = args.registry or ROOT / "var" / "bench-registry"
    ensure_registry(args.model, root)
    prompts = health_prompts("train", sampling=SamplingParams(max_new_tokens=args.max_new_tokens))[:args.prompts]
    print(f"{'batch_size':>10}{'max_seq':>8}{'seconds':>9}{'cand/s':>8}", flush=True)
    for batch_size, sequences in SETTINGS:
        engine = GenerationEngine.from_registry(ModelRegistry(root), max_batch_size=sequences)
        try:
            engine.generate([GenerationRequest(prompts[0].messages, SamplingParams(max_new_tokens=8), 1)])  # warm-up
            row = Row("sweep", "", batch_size, sequences)
            service_path(engine, prompts, batch_size, row)
        finally:
            engine.close(drain=False)
        print(f"{batch_size:>10}{sequences:>8}{row.seconds:>9.1f}{row.rate:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
