"""Candidates/s: the generator service's own path vs seed 001's HF text-generation pipeline, on
one loaded model (same object, same dtype), the same health questions and the same sampling.

Rows (each says its settings):
(a) the generator service: GeneratorSettings' defaults (batch_size prompts per handled batch,
    max_batch_sequences, the engine dtype of EngineSettings), PromptEvent's n, one
    engine.generate per batch with delivery seeds, as CandidateSampler.handle runs a consumed batch;
(b) `pipeline("text-generation")` as seed 001 §2.3.2 calls it (num_return_sequences=2,
    do_sample, temperature 0.7, top_k 50, top_p 0.9), at the same sequences per forward pass as (a);
(c) the same pipeline at the seed's batch of 8 prompts.
The pipeline stops at the same end-of-turn tokens as the engine, so neither runs past an answer.

Every row computes on the process's one torch thread (shared/torch_thread.py), as the services do.
Then the machine and the engine, measured in turn three times and each taken at its best (the
machine's speed may drift; both then see it): 1 s measurements of FLOP/s of a decode-shaped matmul (rows x
hidden @ hidden x intermediate, the engine's dtype; a plain weight and one packed as the engine
packs it, the faster counts), FLOPs per token = 2 x (non-embedding + lm_head
parameters; attention over the cache left out), the bound in tokens/s, and the engine's decode
tokens/s at 32 sequences (steps with all 32 slots busy, prefill excluded: the engine's on_step times
decode steps only).

Last line: `ratio: X` = candidates/s of (a) over (c).

usage: python benchmarks/generation.py [--model smollm2|tiny] [--registry DIR] [--prompts 64]
       [--max-new-tokens 128] [--decode-rows 32]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if __name__ == "__main__":  # before torch: the torch services' malloc settings (shared/allocator.py), all rows alike
    from shared.allocator import reexec_with_malloc_tunables

    reexec_with_malloc_tunables()
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import add_model_args, ensure_registry  # noqa: E402
from services.generator.sampler import delivery_seed  # noqa: E402
from services.generator.settings import GeneratorSettings  # noqa: E402
from shared.alignment_data import health_prompts  # noqa: E402
from shared.engine import GenerationEngine, GenerationRequest  # noqa: E402
from shared.engine.decoder import Projection  # noqa: E402
from shared.registry import ModelRegistry  # noqa: E402
from shared.torch_thread import on_torch_thread  # noqa: E402
from shared.wire import PromptEvent, SamplingParams  # noqa: E402


class Row:
    def __init__(self, label: str, settings: str, prompts_per_call: int, sequences_per_pass: int) -> None:
        self.label, self.settings = label, settings
        self.prompts_per_call, self.sequences_per_pass = prompts_per_call, sequences_per_pass
        self.candidates = self.tokens = 0
        self.seconds = 0.0

    @property
    def rate(self) -> float:
        return self.candidates / self.seconds


REPEATS = 3
"""the bound and the engine's decode rate are each measured this many times, in turn, and taken at their
best: a machine whose speed drifts (other tenants) then weighs on both alike"""


def count_tokens(tokenizer, texts: list[str]) -> int:
    """Completion tokens, counted the same way for every row: the answer text re-tokenized."""
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def service_path(engine: GenerationEngine, prompts: list[PromptEvent], batch_size: int, row: Row) -> None:
    """What the generator does with each consumed batch (services/generator/sampler.py)."""
    torch.manual_seed(0)
    started = time.perf_counter()
    texts = []
    for start in range(0, len(prompts), batch_size):
        requests = [GenerationRequest(p.messages, p.sampling.model_copy(update={"seed": delivery_seed(p.id, engine.version)}),
                                      p.n) for p in prompts[start:start + batch_size]]
        texts += [c.text for r in engine.generate(requests) for c in r.candidates]
    row.seconds = time.perf_counter() - started
    row.candidates, row.tokens = len(texts), count_tokens(engine.tokenizer, texts)


def seed_pipeline(pipe, engine: GenerationEngine, prompts: list[PromptEvent], batch: int, row: Row) -> None:
    """Seed 001 §2.3.2: sequential pipeline calls of `batch` chat-formatted prompts, two samples each."""
    tok = engine.tokenizer
    formatted = [tok.apply_chat_template([m.model_dump() for m in p.messages], tokenize=False,
                                         add_generation_prompt=True) for p in prompts]
    s = prompts[0].sampling
    torch.manual_seed(0)
    started = time.perf_counter()
    texts = []
    for start in range(0, len(formatted), batch):
        outputs = pipe(formatted[start:start + batch], batch_size=batch, num_return_sequences=prompts[0].n,
                       do_sample=True, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                       max_new_tokens=s.max_new_tokens, eos_token_id=engine.eos_ids, pad_token_id=tok.pad_token_id,
                       return_full_text=False)
        texts += [o["generated_text"].strip() for per_prompt in outputs for o in per_prompt]
    row.seconds = time.perf_counter() - started
    row.candidates, row.tokens = len(texts), count_tokens(tok, texts)


def matmul_flops(config, dtype: torch.dtype, rows: int, seconds: float = 2.0,
                 device: torch.device = torch.device("cpu")) -> tuple[float, float]:
    """FLOP/s of one decode-shaped projection, [rows, hidden] x [hidden, intermediate], on the engine's
    device: with a plain weight (F.linear) and with the weight packed once as the engine runs it
    (decoder.Projection; on a GPU it runs the plain module). The machine's bound is the faster of the two."""
    x = torch.randn(rows, config.hidden_size, dtype=dtype, device=device)
    layer = torch.nn.Linear(config.hidden_size, config.intermediate_size, bias=False, dtype=dtype, device=device)
    packed = Projection(layer)
    finish = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)  # a GPU runs behind the host

    def rate(fn) -> float:
        with torch.inference_mode():
            for _ in range(20):
                fn(x)
            finish()
            reps, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                for _ in range(50):
                    fn(x)
                finish()
                reps += 50
            elapsed = time.perf_counter() - started
        return 2 * rows * config.hidden_size * config.intermediate_size * reps / elapsed

    return rate(lambda v: F.linear(v, layer.weight)), rate(packed)


def flops_per_token(model) -> tuple[int, int, int]:
    """2 x (non-embedding + lm_head parameters), and those two counts (tied embeddings counted once)."""
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    tied = embed.data_ptr() == head.data_ptr()
    non_embedding = total - embed.numel() - (0 if tied else head.numel())
    return 2 * (non_embedding + head.numel()), non_embedding, head.numel()


def decode_rate(engine: GenerationEngine, prompts: list[PromptEvent], rows: int, max_new_tokens: int) -> tuple[float, int]:
    """Decode tokens/s with all `rows` slots busy: twice as many one-sequence requests as slots
    keep the batch full (a finished row's slot is refilled between steps); prefill is not timed."""
    steps: list[tuple[int, float]] = []
    decoder = GenerationEngine(engine.model, engine.tokenizer, engine.version, max_batch_size=rows,
                               on_step=lambda n, seconds: steps.append((n, seconds)),
                               native_kernels=engine.native_kernels)
    try:
        sampling = SamplingParams(max_new_tokens=max_new_tokens)
        questions = (prompts * (2 * rows // len(prompts) + 1))[:2 * rows]
        decoder.generate([GenerationRequest(p.messages, sampling.model_copy(update={"seed": i}), 1)
                          for i, p in enumerate(questions)])
    finally:
        decoder.close()
    full = [seconds for n, seconds in steps if n == rows]
    return (rows * len(full) / sum(full) if full else 0.0), len(full)


def main() -> None:
    ap = argparse.ArgumentParser()
    add_model_args(ap)
    ap.add_argument("--prompts", type=int, default=64, help="training health questions sampled by every row")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--decode-rows", type=int, default=32, help="sequences for the decode-rate measurement")
    args = ap.parse_args()
    work = None if args.registry else Path(tempfile.mkdtemp(prefix="prefloop-bench-gen-"))
    root = args.registry or work / "registry"
    ensure_registry(args.model, root)
    settings = GeneratorSettings()
    prompts = health_prompts("train", sampling=SamplingParams(max_new_tokens=args.max_new_tokens))[:args.prompts]
    n = prompts[0].n

    engine = GenerationEngine.from_registry(ModelRegistry(root), max_batch_size=settings.max_batch_sequences,
                                            overflow=settings.overflow, dtype=settings.engine.dtype,
                                            native_kernels=settings.engine.native_kernels)
    if work is not None:
        shutil.rmtree(work)  # loaded: a registry made for this run is not kept
    from transformers import pipeline

    pipe = on_torch_thread(pipeline, "text-generation", model=engine.model, tokenizer=engine.tokenizer)
    per_call = min(settings.batch_size, len(prompts))  # fewer only when --prompts is below one batch
    per_pass = min(per_call * n, settings.max_batch_sequences)
    service = Row("(a) generator service path", f"batch_size {settings.batch_size} prompts x n {n}, "
                  f"max_batch_sequences {settings.max_batch_sequences}, continuous batching", per_call, per_pass)
    same = Row("(b) seed pipeline, same seq/pass", f"{per_pass // n} prompts x num_return_sequences {n} per call",
               per_pass // n, per_pass)
    seed = Row("(c) seed pipeline, seed's batch 8", f"8 prompts x num_return_sequences {n} per call", 8,
               min(8, len(prompts)) * n)
    try:
        engine.generate([GenerationRequest(prompts[0].messages, SamplingParams(max_new_tokens=8), n)])  # warm-up
        # Every row computes on the process's one torch thread, as the engine does: a pipeline
        # called from another thread would pay for a second OpenMP team (shared/torch_thread.py).
        on_torch_thread(pipe, [prompts[0].messages[-1].content], max_new_tokens=8, do_sample=True)
        service_path(engine, prompts, settings.batch_size, service)
        on_torch_thread(seed_pipeline, pipe, engine, prompts, same.prompts_per_call, same)
        on_torch_thread(seed_pipeline, pipe, engine, prompts, seed.prompts_per_call, seed)
        measured, decodes = [], []
        for _ in range(REPEATS):
            measured.append(on_torch_thread(matmul_flops, engine.model.config, engine.dtype, args.decode_rows, 1.0,
                                            engine.device))
            decodes.append(decode_rate(engine, prompts, args.decode_rows, args.max_new_tokens))
        plain, packed = max(m[0] for m in measured), max(m[1] for m in measured)
        flops = max(plain, packed)
        per_token, non_embedding, head = flops_per_token(engine.model)
        decode, full_steps = max(decodes)
    finally:
        engine.close(drain=False)

    c = engine.model.config
    print(f"{args.model} ({engine.version}, {engine.batching} batching), {engine.dtype} on {engine.device}, "
          f"torch threads {torch.get_num_threads()}; {len(prompts)} training health questions x {n} candidates, "
          f"max_new_tokens {args.max_new_tokens}, temperature 0.7, top_k 50, top_p 0.9")
    print(f"{'runner':<36}{'seq/pass':>9}{'candidates':>11}{'seconds':>9}{'cand/s':>8}{'tok/s':>8}  settings")
    for r in (service, same, seed):
        print(f"{r.label:<36}{r.sequences_per_pass:>9}{r.candidates:>11}{r.seconds:>9.1f}{r.rate:>8.2f}"
              f"{r.tokens / r.seconds:>8.1f}  {r.settings}")
    print("tok/s: the answers re-tokenized, for every row alike")
    print(f"(a)/(b), same sequences per pass: {service.rate / same.rate:.2f}x candidates/s")
    print(f"(a)/(c), the seed's batch of 8:   {service.rate / seed.rate:.2f}x candidates/s")
    bound = flops / per_token
    print(f"machine: {flops / 1e9:.1f} GFLOP/s (plain weight {plain / 1e9:.1f}, packed {packed / 1e9:.1f}) on "
          f"[{args.decode_rows} x {c.hidden_size}] @ "
          f"[{c.hidden_size} x {c.intermediate_size}] in {engine.dtype}; {per_token / 1e9:.3f} GFLOP per token "
          f"= 2 x ({non_embedding / 1e6:.1f} M non-embedding + {head / 1e6:.1f} M lm_head parameters)")
    print(f"decode at {args.decode_rows} sequences: bound {bound:.0f} tokens/s, engine {decode:.0f} tokens/s "
          f"({decode / bound:.0%} of the bound; {full_steps} full steps, prefill excluded; kernels: "
          f"{engine.kernels}); best of {REPEATS} each, "
          f"the engine's runs {', '.join(f'{d:.0f}' for d, _ in decodes)} tokens/s, the bound's "
          f"{', '.join(f'{max(m) / per_token:.0f}' for m in measured)}")
    print(f"ratio: {service.rate / seed.rate:.2f}")


if __name__ == "__main__":
    main()
