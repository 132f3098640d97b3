"""Judge wall time: 500 candidate pairs against a local OpenAI-protocol server that answers
after 2.5 s. Ours judges both orders of every pair concurrently; the seed-style loop calls the
endpoint once per pair, sequentially (seed 001 §2.3.4). The baseline is measured on a subset
and scaled linearly (said in the output). Last line: `ratio: X` = baseline time / ours.

usage: python benchmarks/judge.py [--pairs 500] [--delay 2.5] [--baseline-pairs 20] [--concurrency 128]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import httpx

from shared.judging.openai_backend import OpenAIJudge
from shared.judging.pairwise import PairwiseJudge
from shared.judging.prompt import build_messages
from shared.judging.stats import JudgeStats
from shared.observability import new_registry
from shared.wire import Candidate, CandidatesEvent, ChatMessage, PromptEvent
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the test fake server lives in tests/
from tests.fake_openai import FakeOpenAI, Script  # noqa: E402


def pairs(n: int) -> list[CandidatesEvent]:
    out = []
    for i in range(n):
        p = PromptEvent(producer="cli", messages=[ChatMessage(role="user", content=f"Question {i} about my health?")])
        out.append(CandidatesEvent(producer="generator", prompt=p, policy_version="v0001", prompt_tokens=8, candidates=[
            Candidate(text=f"Answer {i}: please see a doctor.", completion_tokens=8, finish_reason="stop"),
            Candidate(text=f"Answer {i}: it is nothing.", completion_tokens=6, finish_reason="stop")]))
    return out


async def ours(base_url: str, events: list[CandidatesEvent], concurrency: int) -> tuple[float, int]:
    backend = OpenAIJudge(base_url=base_url, model="bench", api_key="k", concurrency=concurrency, timeout_s=60)
    judge = PairwiseJudge(backend, None, JudgeStats(new_registry()))
    started = time.perf_counter()
    outcomes = await asyncio.gather(*(judge.decide(e) for e in events))
    elapsed = time.perf_counter() - started
    await backend.aclose()
    assert all(o.preference for o in outcomes), "every benchmark pair should get a consistent verdict"
    return elapsed, backend.usage.requests


def seed_style(base_url: str, events: list[CandidatesEvent]) -> float:
    started = time.perf_counter()
    with httpx.Client(timeout=60) as client:
        for e in events:  # one call per pair, one order, one at a time
            body = {"model": "bench", "messages": build_messages(e.prompt.messages, e.candidates[0].text,
                                                                 e.candidates[1].text)}
            client.post(f"{base_url}/chat/completions", json=body).raise_for_status()
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=500)
    ap.add_argument("--delay", type=float, default=2.5)
    ap.add_argument("--baseline-pairs", type=int, default=20)
    ap.add_argument("--concurrency", type=int, default=128)
    args = ap.parse_args()
    events = pairs(args.pairs)
    with FakeOpenAI(Script(delay_s=args.delay)) as server:
        ours_s, requests = asyncio.run(ours(server.base_url, events, args.concurrency))
        base_measured = seed_style(server.base_url, events[: args.baseline_pairs])
    base_s = base_measured * args.pairs / args.baseline_pairs
    print(f"{args.pairs} pairs, endpoint latency {args.delay}s, our concurrency {args.concurrency}")
    print(f"{'runner':<46}{'requests':>10}{'seconds':>10}")
    print(f"{'seed-style sequential loop, one order':<46}{args.pairs:>10}{base_s:>10.1f}"
          f"   (measured {base_measured:.1f}s on {args.baseline_pairs} pairs, scaled linearly)")
    print(f"{'prefloop judge, both orders, concurrent':<46}{requests:>10}{ours_s:>10.1f}")
    print(f"ratio: {base_s / ours_s:.1f}")


if __name__ == "__main__":
    main()
