"""Two model processes on the same cores: the time of one engine's decode alone and beside a second process.

The demo runs four services on one machine; when two of them compute at once (the gateway decoding while
the generator samples a re-queued question), each process's OpenMP team waits at every parallel region
for a thread the other process has descheduled (docs/alignment-log.md, "Two services computing at once on 2 cores").
Try `OMP_WAIT_POLICY=PASSIVE` or `GOMP_SPINCOUNT=...` in the environment to compare.

usage: .venv/bin/python scripts/two_processes.py --registry DIR/state/registry --version v0002
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.alignment_data import SYSTEM_PROMPT, health_prompts  # noqa: E402
from shared.engine import GenerationEngine, GenerationRequest  # noqa: E402
from shared.registry import ModelRegistry  # noqa: E402
from shared.wire import ChatMessage, SamplingParams  # noqa: E402

PREFIX = [ChatMessage(role="system", content=SYSTEM_PROMPT)]


def rows(count: int, offset: int = 0, n: int = 1) -> list[GenerationRequest]:
    questions = [e.messages[-1].content for e in health_prompts("train")][offset:offset + count]
    return [GenerationRequest(PREFIX + [ChatMessage(role="user", content=q)],
                              SamplingParams(temperature=0.7, max_new_tokens=96), n=n) for q in questions]


def timed(engine: GenerationEngine, requests: list[GenerationRequest]) -> float:
    started = time.monotonic()
    engine.generate(requests)
    return time.monotonic() - started


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--registry", type=Path, required=True)
    ap.add_argument("--version", required=True)
    ap.add_argument("--rows", type=int, default=7, help="this process's rows (run 25's gateway: 7)")
    ap.add_argument("--other", type=int, default=4, help="the other process's answers to one question (n)")
    ap.add_argument("--as-other", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    registry = ModelRegistry(args.registry)
    with GenerationEngine.from_registry(registry, args.version, max_batch_size=64, shared_prefix=PREFIX) as engine:
        if args.as_other:
            print("ready", flush=True)
            seconds = timed(engine, rows(1, 100, n=args.other))
            print(f"other process: {args.other} answers in {seconds:.1f}s", flush=True)
            return
        mine = rows(args.rows)
        print(f"this process, {args.rows} rows alone: {timed(engine, mine):.1f}s", flush=True)
        other = start_other()
        print(f"{other.stdout.read().strip()} (alone)", flush=True)
        other.wait()
        other = start_other()
        print(f"this process, {args.rows} rows beside the other: {timed(engine, mine):.1f}s", flush=True)
        print(f"{other.stdout.read().strip()} (beside this one)", flush=True)
        other.wait()


def start_other() -> subprocess.Popen:
    """The second process, once its model is loaded (its generate starts as this returns)."""
    other = subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--as-other"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if other.stdout.readline().strip() != "ready":
        raise SystemExit("the second process did not start")
    return other


if __name__ == "__main__":
    main()
