"""Candidates/s: our engine vs a seed-style loop (HF text-generation pipeline, batch 8,
sequential calls, two return sequences), same model, same prompts, same sampling.

usage: python benchmarks/generation.py [--registry DIR] [--prompts 64] [--max-new-tokens 128]
(bootstraps the tiny model into a temp registry when --registry has no current version)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import pipeline

from shared.prompts import DEMO_PROMPTS, SYSTEM_PROMPT
from shared.engine import GenerationEngine, GenerationRequest
from shared.registry import ModelRegistry
from shared.wire import ChatMessage, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--registry", type=Path, default=None)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--engine-batch", type=int, default=64, help="sequences per forward pass in our engine")
    args = ap.parse_args()
    root = args.registry or Path(tempfile.mkdtemp()) / "registry"
    registry = ModelRegistry(root)
    if registry.current() is None:
        from services.trainer.bootstrap import bootstrap_tiny

        bootstrap_tiny(registry)
    questions = [json.loads(line)["prompt"] for line in DEMO_PROMPTS.read_text().splitlines()][: args.prompts]
    conversations = [[ChatMessage(role="system", content=SYSTEM_PROMPT), ChatMessage(role="user", content=q)]
                     for q in questions]
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens)

    engine = GenerationEngine.from_registry(registry, max_batch_size=args.engine_batch)
    engine.generate([GenerationRequest(conversations[0], sampling, n=2)])  # warm-up
    torch.manual_seed(0)
    t0 = time.perf_counter()
    ours = engine.generate([GenerationRequest(c, sampling, n=2) for c in conversations])
    ours_s = time.perf_counter() - t0
    ours_n = sum(len(r.candidates) for r in ours)

    tok = engine.tokenizer
    pipe = pipeline("text-generation", model=engine.model, tokenizer=tok)
    texts = [tok.apply_chat_template([m.model_dump() for m in c], tokenize=False, add_generation_prompt=True)
             for c in conversations]
    pipe(texts[:1], max_new_tokens=8, do_sample=True)  # warm-up
    torch.manual_seed(0)
    t0 = time.perf_counter()
    base_n = 0
    for i in range(0, len(texts), 8):  # seed 001 §2.3.2, as written
        batch = texts[i:i + 8]
        outputs = pipe(batch, max_new_tokens=args.max_new_tokens, batch_size=8, num_return_sequences=2,
                       do_sample=True, temperature=0.7, top_k=50, top_p=0.9)
        base_n += sum(len(o) for o in outputs)
    base_s = time.perf_counter() - t0

    ours_rate, base_rate = ours_n / ours_s, base_n / base_s
    print(f"model {registry.current()} ({sum(p.numel() for p in engine.model.parameters()):,} params), "
          f"{len(conversations)} prompts x 2 candidates, max_new_tokens {args.max_new_tokens}, "
          f"device {engine.device}, torch threads {torch.get_num_threads()}")
    print(f"{'runner':<34}{'candidates':>12}{'seconds':>10}{'cand/s':>10}")
    print(f"{'seed-style pipeline (batch 8)':<34}{base_n:>12}{base_s:>10.2f}{base_rate:>10.1f}")
    print(f"{'prefloop engine (length-sorted)':<34}{ours_n:>12}{ours_s:>10.2f}{ours_rate:>10.1f}")
    print(f"ratio: {ours_rate / base_rate:.2f}")


if __name__ == "__main__":
    main()
