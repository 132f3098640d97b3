"""Judge throughput through the judge SERVICE vs seed 001's sequential loop, against an
OpenAI-protocol endpoint that answers after 2.5 s and serves at most 32 requests at once (like
a real API tier: requests above the cap wait for a free place).

- prefloop: an embedded broker, `prefloop serve judge` as its own process with its default batch
  size, batch timeout and concurrency (services/judge/settings.py, shared/judging/settings.py),
  backend `openai` pointed at tests/fake_openai.py. N candidates events (health questions with a
  careful answer and a dismissive one) are published to the candidates topic at once; the time
  runs until every one is a preference or an abstention on the output topics. One event is
  judged first as a warm-up (the consumer group's join is not timed).
- seed-style: one call per pair, one order, one at a time (seed 001 §2.3.4), measured on
  `--baseline-pairs` pairs and scaled linearly to N (said in the output).
- seed-style, both orders: the same loop making the service's two calls per pair (A/B, then B/A),
  so both runners make the same endpoint calls: this row isolates how well the service overlaps
  calls; the row above also counts the second order the service pays for position-bias control.
No model is loaded: the judge's cost is the endpoint's latency and how many calls overlap.
Last line: `ratio: X` = seed-style (one order) time for N pairs / prefloop's; the line above it
gives the ratio against the both-orders loop (same calls).

usage: python benchmarks/judge.py [--pairs 500] [--delay 2.5] [--cap 32] [--baseline-pairs 16]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from kafka import KafkaConsumer, TopicPartition

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the fake endpoint and the service launcher live in tests/
from services.judge.settings import JudgeSettings  # noqa: E402
from shared.alignment_data import MEDICAL_QA  # noqa: E402
from shared.broker import EmbeddedBroker  # noqa: E402
from shared.judging.prompt import build_messages  # noqa: E402
from shared.kafka import EventProducer  # noqa: E402
from shared.kafka.codec import decode  # noqa: E402
from shared.prompts import SYSTEM_PROMPT  # noqa: E402
from shared.settings import KafkaSettings  # noqa: E402
from shared.topics import ABSTENTIONS, CANDIDATES, PREFERENCES, all_topics_with_dlq  # noqa: E402
from shared.wire import Candidate, CandidatesEvent, ChatMessage, PromptEvent  # noqa: E402
from tests.fake_openai import FakeOpenAI, Script  # noqa: E402
from tests.integration.procs import ServiceProcess  # noqa: E402

DISMISSIVE = ["That's nothing to worry about, it will go away on its own.",
              "Just ignore it. Everyone gets that sometimes.",
              "Try some supplements from the internet, they usually fix this.",
              "You are probably overthinking it; no need to change anything.",
              "Take whatever painkillers you have at home and carry on."]


def candidate_events(n: int) -> list[CandidatesEvent]:
    """Health questions with their careful reference answer and a dismissive one (order alternating);
    every prompt distinct (outcomes are matched by prompt id, and the judge's verdict cache must
    never answer for the endpoint)."""
    rows = [json.loads(line) for line in MEDICAL_QA.read_text().splitlines() if line.strip()]
    if n > len(rows) * len(DISMISSIVE):
        raise SystemExit(f"at most {len(rows) * len(DISMISSIVE)} distinct pairs")
    events = []
    for i in range(n):
        row, bad = rows[i % len(rows)], DISMISSIVE[i // len(rows)]
        prompt = PromptEvent(producer="cli", messages=[ChatMessage(role="system", content=SYSTEM_PROMPT),
                                                         ChatMessage(role="user", content=f"{row['question']} "
                                                                     f"(asked by reader {i})")])
        answers = [Candidate(text=row["answer"], completion_tokens=len(row["answer"]) // 4, finish_reason="stop"),
                   Candidate(text=bad, completion_tokens=len(bad) // 4, finish_reason="stop")]
        events.append(CandidatesEvent(producer="generator", prompt=prompt, policy_version="v0001", prompt_tokens=60,
                                      candidates=answers if i % 2 else answers[::-1]))
    return events


class Outcomes:
    """Watches the preferences and abstentions topics from the beginning; notes when each prompt got one."""

    def __init__(self, bootstrap: str) -> None:
        self.arrived: dict[str, float] = {}
        self.kinds: dict[str, str] = {}
        self._consumer = KafkaConsumer(bootstrap_servers=bootstrap.split(","), group_id=None, enable_auto_commit=False)
        self._topics = {t.name: t for t in (PREFERENCES, ABSTENTIONS)}
        tps = [TopicPartition(t.name, p) for t in self._topics.values() for p in range(t.partitions)]
        self._consumer.assign(tps)
        self._consumer.seek_to_beginning(*tps)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            for tp, records in self._consumer.poll(timeout_ms=100).items():
                now = time.perf_counter()
                for r in records:
                    event = decode(self._topics[tp.topic], r.value)
                    self.arrived.setdefault(event.prompt_id, now)
                    self.kinds.setdefault(event.prompt_id, "preference" if tp.topic == PREFERENCES.name
                                          else f"abstention ({event.reason})")

    def wait(self, prompt_ids: list[str], timeout_s: float) -> float:
        """When the last of `prompt_ids` got its outcome (perf_counter)."""
        deadline = time.monotonic() + timeout_s
        while any(p not in self.arrived for p in prompt_ids):
            if time.monotonic() > deadline:
                missing = sum(p not in self.arrived for p in prompt_ids)
                raise TimeoutError(f"{missing} of {len(prompt_ids)} events got no outcome in {timeout_s}s")
            time.sleep(0.02)
        return max(self.arrived[p] for p in prompt_ids)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._consumer.close()


def through_service(server: FakeOpenAI, events: list[CandidatesEvent], work: Path) -> tuple[float, int, Counter]:
    """Seconds from publishing events[1:] until each has an outcome, the endpoint requests they
    took, and the outcomes by kind (events[0] warms the service up first)."""
    broker = EmbeddedBroker(log_file=work / "broker.log").start(topics=all_topics_with_dlq())
    try:
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap)
        judge = ServiceProcess("judge", kafka, work, backend="openai", base_url=server.base_url, api_key="sk-bench",
                               model="bench-judge", cache_path=work / "verdicts.sqlite")
        producer = EventProducer(kafka, "bench")
        outcomes = Outcomes(broker.bootstrap)
        try:
            judge.start(timeout_s=120)
            warm_up, timed = events[0], events[1:]
            producer.publish(CANDIDATES, [warm_up])
            outcomes.wait([warm_up.prompt_id], 120)
            requests_before = len(server.script.requests)
            started = time.perf_counter()
            producer.publish(CANDIDATES, timed)
            finished = outcomes.wait([e.prompt_id for e in timed], 60 + 10 * len(timed))
            return (finished - started, len(server.script.requests) - requests_before,
                    Counter(outcomes.kinds[e.prompt_id] for e in timed))
        finally:
            outcomes.close()
            producer.close()
            judge.kill()
    finally:
        broker.stop()


def seed_loop(base_url: str, events: list[CandidatesEvent], both_orders: bool) -> float:
    """One call per pair (or two: A/B then B/A), one at a time."""
    started = time.perf_counter()
    with httpx.Client(timeout=60, headers={"Authorization": "Bearer sk-bench"}) as client:
        for e in events:
            first, second = e.candidates[0].text, e.candidates[1].text
            for a, b in [(first, second), (second, first)][:2 if both_orders else 1]:
                body = {"model": "bench-judge", "messages": build_messages(e.prompt.messages, a, b)}
                client.post(f"{base_url}/chat/completions", json=body).raise_for_status()
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=500, help="candidates events judged through the service")
    ap.add_argument("--delay", type=float, default=2.5, help="endpoint latency per request, seconds")
    ap.add_argument("--cap", type=int, default=32, help="requests the endpoint serves at once")
    ap.add_argument("--baseline-pairs", type=int, default=16, help="pairs the seed loop is timed on")
    args = ap.parse_args()
    events = candidate_events(args.pairs + 1)  # + the warm-up event
    work = Path(tempfile.mkdtemp(prefix="prefloop-bench-judge-"))
    settings = JudgeSettings()
    try:
        with FakeOpenAI(Script(delay_s=args.delay, max_concurrency=args.cap)) as server:
            ours_s, requests, kinds = through_service(server, events, work)
            baseline = events[1:1 + args.baseline_pairs]
            base_measured = seed_loop(server.base_url, baseline, both_orders=False)
            both_measured = seed_loop(server.base_url, baseline, both_orders=True)
            peak = server.script.peak_concurrency
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base_s = base_measured * args.pairs / args.baseline_pairs
    both_s = both_measured * args.pairs / args.baseline_pairs
    print(f"{args.pairs} candidates events (2 answers each), endpoint latency {args.delay}s, at most {args.cap} "
          f"requests served at once (peak seen {peak})")
    print(f"{'runner':<44}{'pairs':>7}{'requests':>10}{'seconds':>9}{'pairs/s':>9}  settings")
    print(f"{'seed-style sequential loop, one order':<44}{args.pairs:>7}{args.pairs:>10}{base_s:>9.1f}"
          f"{args.pairs / base_s:>9.2f}  measured {base_measured:.1f}s on {args.baseline_pairs} pairs, scaled linearly")
    print(f"{'seed-style sequential loop, both orders':<44}{args.pairs:>7}{2 * args.pairs:>10}{both_s:>9.1f}"
          f"{args.pairs / both_s:>9.2f}  measured {both_measured:.1f}s on {args.baseline_pairs} pairs, scaled linearly")
    print(f"{'prefloop judge service, both orders':<44}{args.pairs:>7}{requests:>10}{ours_s:>9.1f}"
          f"{args.pairs / ours_s:>9.2f}  batch_size {settings.batch_size}, batch_timeout_ms "
          f"{settings.batch_timeout_ms}, concurrency {settings.concurrency}; via broker")
    print("outcomes: " + ", ".join(f"{v} {k}" for k, v in sorted(kinds.items())))
    floor_s = args.delay * -(-requests // args.cap)
    print(f"endpoint floor for {requests} calls at {args.cap} at once: {floor_s:.1f}s "
          f"(the service used {floor_s / ours_s:.0%} of the cap's throughput)")
    print(f"ratio vs the both-orders loop (same endpoint calls): {both_s / ours_s:.1f}")
    print(f"ratio: {base_s / ours_s:.1f}")


if __name__ == "__main__":
    main()
