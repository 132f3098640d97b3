"""Gateway throughput and latency: dynamic batching vs one-request-at-a-time serving.

The same gateway (`prefloop serve gateway`, tiny model, embedded broker) runs twice: with its
default dynamic batching, and with `MAX_BATCH_SEQUENCES=1, MAX_WAIT_MS=0`, which serves one
request per generate call. At 1, 8 and 32 concurrent clients (each sends its next request when
the previous answer arrives), it measures requests/s, completion tokens/s and p50/p99 latency.
The last line is `ratio: X`: requests/s at 32 clients, batching over one-at-a-time.

usage: python benchmarks/gateway.py [--registry DIR] [--max-tokens 48] [--requests 96]
(bootstraps the tiny model into a temp registry when --registry has no current version)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from prefloop.stack import Stack
from shared.prompts import DEMO_PROMPTS
from shared.registry import ModelRegistry

CONCURRENCY = (1, 8, 32)
MODES = {"batching": {}, "one-at-a-time": {"PREFLOOP_GATEWAY_MAX_BATCH_SEQUENCES": "1",
                                            "PREFLOOP_GATEWAY_MAX_WAIT_MS": "0"}}


async def load(url: str, key: str, questions: list[str], clients: int, total: int, max_tokens: int) -> dict:
    latencies: list[float] = []
    tokens = 0
    sent = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens, sent
        while sent < total:
            question = questions[sent % len(questions)]
            sent += 1
            t0 = time.perf_counter()
            r = await http.post("/v1/chat/completions", json={
                "model": "prefloop", "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": question}]})
            r.raise_for_status()  # a failed request fails the benchmark, it is not averaged in
            latencies.append(time.perf_counter() - t0)
            tokens += r.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300,
                                 limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {"requests": len(latencies), "req_s": len(latencies) / elapsed, "tok_s": tokens / elapsed,
            "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


def run_mode(name: str, env: dict[str, str], registry: Path, work: Path, args, questions) -> dict[int, dict]:
    workdir = work / name
    shutil.copytree(registry, workdir / "registry")
    stack = Stack(workdir, services=("gateway",), gateway_env={
        "PREFLOOP_GATEWAY_REQUESTS_PER_MINUTE": "1000000", "PREFLOOP_LOG_LEVEL": "WARNING", **env})
    try:
        stack.start()
        url = stack.url("gateway")
        asyncio.run(load(url, stack.api_key, questions, 2, 4, args.max_tokens))  # warm-up
        return {c: asyncio.run(load(url, stack.api_key, questions, c, max(args.requests, 2 * c), args.max_tokens))
                for c in CONCURRENCY}
    finally:
        stack.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--registry", type=Path, default=None)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--requests", type=int, default=96, help="requests per concurrency level")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="prefloop-bench-gw-"))
    root = args.registry or work / "base-registry"
    if ModelRegistry(root).current() is None:
        from services.trainer.bootstrap import bootstrap_tiny

        bootstrap_tiny(ModelRegistry(root))
    questions = [json.loads(line)["prompt"] for line in DEMO_PROMPTS.read_text().splitlines()]
    try:
        results = {name: run_mode(name, env, root, work, args, questions) for name, env in MODES.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"gateway, tiny model, max_tokens={args.max_tokens}, non-streaming; "
          f"{args.requests}+ requests per level")
    print(f"{'clients':>7} | {'mode':<13} | {'req/s':>7} | {'tok/s':>7} | {'p50 ms':>8} | {'p99 ms':>8}")
    print("-" * 66)
    for c in CONCURRENCY:
        for name in MODES:
            r = results[name][c]
            print(f"{c:>7} | {name:<13} | {r['req_s']:7.2f} | {r['tok_s']:7.1f} | {r['p50_ms']:8.1f} | "
                  f"{r['p99_ms']:8.1f}")
    for c in CONCURRENCY:
        print(f"throughput at {c} clients, batching / one-at-a-time: "
              f"{results['batching'][c]['req_s'] / results['one-at-a-time'][c]['req_s']:.2f}x")
    print(f"ratio: {results['batching'][32]['req_s'] / results['one-at-a-time'][32]['req_s']:.2f}")


if __name__ == "__main__":
    main()
