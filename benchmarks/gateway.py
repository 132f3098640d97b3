"""Gateway throughput and latency under mixed traffic: continuous batching vs one request at a time.

The same gateway (`prefloop serve gateway` via prefloop.stack.Stack, embedded broker) runs twice
on the same model: with its defaults (continuous batching, `max_batch_sequences` 64), and with
`PREFLOOP_GATEWAY_MAX_BATCH_SEQUENCES=1`, which admits one request at a time (its n sequences
decode together). At 1, 8 and 32 concurrent clients (each sends its next request when its
previous answer is complete) both modes serve the same requests: request i asks health question
i and draws, from Random(i), temperature {0.2, 0.7, 1.0}, top_p {0.8, 0.9, 1.0}, max_tokens
{16, 48, 96}, n {1, 2} and stream true/false, with seed i (so both modes sample alike).
Reported: requests/s, completion tokens/s, p50/p99 latency (the whole answer) and time to first
token of the streamed requests (time to the first content delta).
Last line: `ratio: X` = requests/s at 32 clients, continuous batching over one-at-a-time.

usage: python benchmarks/gateway.py [--model smollm2|tiny] [--registry DIR] [--requests 24]
(each level sends max(--requests, 3 x clients) requests)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import add_model_args, ensure_registry, percentile  # noqa: E402
from prefloop.stack import Stack  # noqa: E402
from shared.alignment_data import health_prompts  # noqa: E402

CONCURRENCY = (1, 8, 32)
MODES = {"continuous": {}, "one-at-a-time": {"PREFLOOP_GATEWAY_MAX_BATCH_SEQUENCES": "1"}}


def request_body(i: int, questions: list[str]) -> dict:
    """Request i of the mixed traffic: the same in every mode and at every level."""
    rng = random.Random(i)
    return {"model": "prefloop", "messages": [{"role": "user", "content": questions[i % len(questions)]}],
            "temperature": rng.choice((0.2, 0.7, 1.0)), "top_p": rng.choice((0.8, 0.9, 1.0)),
            "max_tokens": rng.choice((16, 48, 96)), "n": rng.choice((1, 2)), "stream": rng.choice((True, False)),
            "seed": i}


async def send(http: httpx.AsyncClient, body: dict) -> tuple[float, float | None, int]:
    """(latency, time to the first content delta if streamed, completion tokens)."""
    started = time.perf_counter()
    if not body["stream"]:
        r = await http.post("/v1/chat/completions", json=body)
        r.raise_for_status()  # a failed request fails the benchmark, it is not averaged in
        return time.perf_counter() - started, None, r.json()["usage"]["completion_tokens"]
    first, tokens = None, None
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                first = time.perf_counter() - started
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    if tokens is None:
        raise RuntimeError("a streamed answer ended without its usage chunk")
    return time.perf_counter() - started, first, tokens


async def load(url: str, key: str, questions: list[str], clients: int, total: int) -> dict:
    latencies: list[float] = []
    by_request: dict[int, float] = {}
    firsts: list[float] = []
    tokens = 0
    sent = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens, sent
        while sent < total:
            index, body = sent, request_body(sent, questions)
            sent += 1
            latency, first, completion = await send(http, body)
            latencies.append(latency)
            by_request[index] = latency
            tokens += completion
            if first is not None:
                firsts.append(first)

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600,
                                 limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        elapsed = time.perf_counter() - started
    return {"requests": len(latencies), "streamed": len(firsts), "req_s": len(latencies) / elapsed,
            "tok_s": tokens / elapsed, "p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
            "ttft50": percentile(firsts, 50), "ttft99": percentile(firsts, 99), "by_request": by_request}


def run_mode(name: str, env: dict[str, str], model: str, registry: Path, work: Path, requests: int,
             questions: list[str]) -> dict[int, dict]:
    workdir = work / name
    workdir.mkdir(parents=True)
    (workdir / "registry").symlink_to(registry.resolve(), target_is_directory=True)  # read only by the gateway
    stack = Stack(workdir, model=model, services=("gateway",), gateway_env={
        "PREFLOOP_GATEWAY_REQUESTS_PER_MINUTE": "1000000", "PREFLOOP_LOG_LEVEL": "WARNING", **env})
    try:
        stack.start()
        url = stack.url("gateway")
        asyncio.run(load(url, stack.api_key, questions, 2, 4))  # warm-up
        return {c: asyncio.run(load(url, stack.api_key, questions, c, max(requests, 3 * c))) for c in CONCURRENCY}
    finally:
        stack.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    add_model_args(ap)
    ap.add_argument("--requests", type=int, default=24, help="requests per level (at least 3 per client)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="prefloop-bench-gw-"))
    try:
        registry = args.registry or work / "base-registry"
        ensure_registry(args.model, registry)
        questions = [p.messages[-1].content for p in health_prompts("train")]
        results = {name: run_mode(name, env, args.model, registry, work, args.requests, questions)
                   for name, env in MODES.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the links to --registry go, never the registry itself

    print(f"gateway, {args.model}; mixed traffic: temperature, top_p, max_tokens (16/48/96), n (1/2) and stream "
          f"drawn per request, seeded; max({args.requests}, 3 x clients) requests per level; "
          f"one-at-a-time = PREFLOOP_GATEWAY_MAX_BATCH_SEQUENCES=1")
    print(f"{'clients':>7} | {'mode':<13} | {'reqs':>4} | {'req/s':>6} | {'tok/s':>7} | {'p50 ms':>8} | "
          f"{'p99 ms':>8} | {'TTFT p50':>8} | {'TTFT p99':>8}")
    print("-" * 96)
    for c in CONCURRENCY:
        for name in MODES:
            r = results[name][c]
            print(f"{c:>7} | {name:<13} | {r['requests']:>4} | {r['req_s']:6.2f} | {r['tok_s']:7.1f} | "
                  f"{1000 * r['p50']:8.0f} | {1000 * r['p99']:8.0f} | {1000 * r['ttft50']:8.0f} | "
                  f"{1000 * r['ttft99']:8.0f}")
    print("TTFT: time to the first content delta, streamed requests only")
    ours, single = results["continuous"], results["one-at-a-time"]
    for c in CONCURRENCY:
        print(f"requests/s at {c:>2} client(s), continuous / one-at-a-time: {ours[c]['req_s'] / single[c]['req_s']:.2f}x")
    print(f"p50 latency at 1 client, continuous / one-at-a-time: {ours[1]['p50'] / single[1]['p50']:.2f} "
          f"(below 1: faster)")
    # the same request in both modes: the p50 of 24 mixed requests sits between max_tokens classes, and a
    # small shift moves it from one class to the next; the median of per-request ratios does not
    paired = [ours[1]["by_request"][i] / single[1]["by_request"][i] for i in ours[1]["by_request"]]
    print(f"latency at 1 client, median of per-request ratios (same requests), continuous / one-at-a-time: "
          f"{percentile(paired, 50):.2f}")
    print(f"ratio: {ours[32]['req_s'] / single[32]['req_s']:.2f}")


if __name__ == "__main__":
    main()
