"""`prefloop demo`: the flywheel on the embedded default, round after round, then a report.

Each round is on-policy: a fresh slice of the shipped training questions is ingested once the
generator serves the current version; the generator samples n candidates per question, the judge
pairs the best with the worst, the ledger keeps the pairs, and the trainer runs DPO from the
current version (replaying older pairs), gates the result on held-out questions against its parent
(and measures it against the original base), and promotes it only if it passes; generator and
gateway then serve it. Between rounds the demo plays users through the gateway with the `openai`
SDK: it asks for two answers and prefers the one a careful reader would (the one the offline rubric
scores at least 2 points higher; no verdict otherwise), and rates single answers thumbs-up when they
recommend a healthcare professional, thumbs-down when not; those picks, and rated answers re-judged
against fresh samples, are trained on in the next round.

Users who picked by the professional-mention rule alone were measured to push the next round's
medical perplexity from +1.1% (judge pairs only) to +3.7..+8.4% (same round, 7-10 such picks,
three samplings); rubric-margin picks, 15 of them: +0.7% (docs/alignment-log.md, "What changed, measured").
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from prefloop.report import DemoReport, collect, write
from prefloop.stack import Stack
from services.trainer.settings import TrainerSettings
from shared.alignment_data import health_prompts
from shared.judging.rubric import PROFESSIONAL
from shared.judging.selection import best_worst_by_score
from shared.kafka import EventProducer
from shared.kafka.reader import read_events
from shared.topics import ABSTENTIONS, CANDIDATES, PREFERENCES, PROMPTS
from shared.wire import SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoPlan:
    """What one demo round does for a model (its DPO settings are the model's recipe: services/trainer/recipes.py)."""

    prompts: int
    n: int
    max_new_tokens: int
    temperature: float = 0.8
    picks: int = 16
    ratings: int = 8
    trainer: dict[str, str] = field(default_factory=dict)
    judge: dict[str, str] = field(default_factory=dict)

    def env(self, service: str) -> dict[str, str]:
        """The plan's `PREFLOOP_<SERVICE>_*` settings that the operator's environment does not set: a variable
        the operator exported wins over the plan, as a set setting wins over a model's recipe."""
        return {k: v for k, v in getattr(self, service).items() if k not in os.environ}


PLANS = {
    # The trainer's DPO settings for each model are its recipe (services/trainer/recipes.py: the same for
    # `prefloop serve trainer`, compose and k8s); the demo sets only what trades gate precision for time:
    # 64 of the 110 held-out questions (two answers each, the service's default), 64 + 40 of the forgetting
    # guards' Q/A pairs, shorter answers. Two answers to 64 questions decide the win rate better than one
    # to 80 (README, "The gate"); the smaller guard sets pay for most of the extra answers.
    # SmolLM2's rounds: 96 questions x 4 answers, and a pair only where best and worst differ by 4 weighted
    # rubric points (the judge service's default is 2), so nearly every pair is a safety difference rather
    # than a point of clarity: run 76's margin-2 pairs won 0.670 against the base, the margin-4 subset 0.837
    # (docs/alignment-log.md, "Clearer labels"). Best and worst only among answers that ended alike (both cut
    # at the 96-token window or both finished): otherwise rounds learn to stop sooner, -18% to -34% length
    # ("Answers that ended alike"). 128 questions a round met the goals too but took up to 11.8 minutes.
    "smollm2": DemoPlan(prompts=96, n=4, max_new_tokens=96, trainer={
        "PREFLOOP_TRAINER_EVAL_PROMPTS": "64", "PREFLOOP_TRAINER_EVAL_SAMPLES": "2",
        "PREFLOOP_TRAINER_MEDICAL_REFERENCE_SIZE": "64", "PREFLOOP_TRAINER_GENERAL_REFERENCE_SIZE": "40",
        "PREFLOOP_TRAINER_EVAL_MAX_NEW_TOKENS": "96"}, judge={"PREFLOOP_JUDGE_MIN_MARGIN": "4",
                                                          "PREFLOOP_JUDGE_MATCH_FINISH": "true"}),
    "tiny": DemoPlan(prompts=80, n=2, max_new_tokens=64, temperature=0.7, trainer={
        "PREFLOOP_TRAINER_EVAL_MAX_NEW_TOKENS": "64"}),
}


USER_MARGIN = 2.0
"""how much higher (weighted rubric points) an answer must score for a demo user to prefer it"""


def user_pick(a: str, b: str) -> int | None:
    """The demo user's pick of two answers: the one the rubric scores clearly higher; else no verdict."""
    best, _ = best_worst_by_score([a, b], min_margin=USER_MARGIN)  # blank or identical answers: None
    return None if best is None else (0 if best == a.strip() else 1)


def draw_env(service: str, seed: int) -> dict[str, str]:
    """A service's settings for the demo's draw `seed`. Every draw in the loop is seeded (the candidates,
    DPO's initialisation and batch order, the replay sample, the gate's answers, the users' answers), so a demo
    repeats the same draw run after run; another seed draws all of them afresh, to measure the recipe rather than
    one draw. Seed 0 is the services' defaults."""
    if not seed:
        return {}
    if service == "GENERATOR":
        return {"PREFLOOP_GENERATOR_SAMPLING_SEED": str(seed)}
    return {"PREFLOOP_TRAINER_SEED": str(TrainerSettings.model_fields["seed"].default + seed),
            "PREFLOOP_TRAINER_EVAL_SEED": str(seed)}


class Demo:
    def __init__(self, out: Path, rounds: int, prompts: int | None, say, model: str = "smollm2",
                 seed: int = 0) -> None:
        self.out, self.rounds, self.say, self.seed = out, rounds, say, seed
        self.plan = PLANS.get(model, PLANS["smollm2"])
        self.per_round = prompts or self.plan.prompts
        self.stack = Stack(out / "state", model=model, generator_env=draw_env("GENERATOR", seed), trainer_env={
            "PREFLOOP_TRAINER_MIN_NEW_PAIRS": "100000",  # the demo triggers runs itself, once a round is judged
            **self.plan.env("trainer"), **draw_env("TRAINER", seed)}, judge_env=self.plan.env("judge"))
        self.report = DemoReport(rounds=rounds, model=model, seed=seed)
        self.expected_candidates = 0
        sampling = SamplingParams(max_new_tokens=self.plan.max_new_tokens, temperature=self.plan.temperature)
        self.train_prompts = health_prompts("train", n=self.plan.n, sampling=sampling)

    @contextmanager
    def phase(self, name: str):
        """Time one step of the demo for the report's "where the time went" table."""
        started = time.monotonic()
        try:
            yield
        finally:
            self.report.phases[name] = round(time.monotonic() - started, 1)

    # -- waiting on the loop -------------------------------------------------
    def _count(self, topic) -> list:
        return read_events(self.stack.broker.bootstrap, topic, None, timeout_s=30, idle_s=0.5)

    def _get(self, service: str, path: str):
        headers = {"Authorization": f"Bearer {self.stack.api_key}"} if service == "gateway" else {}
        return httpx.get(f"{self.stack.url(service)}{path}", timeout=10, headers=headers).json()

    def wait_judged(self, timeout_s: float = 900) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            cands = self._count(CANDIDATES)
            pref_records = self._count(PREFERENCES)
            judged = (len(pref_records) - self.report.gateway_picks + len(self._count(ABSTENTIONS))
                      + len(self._count(CANDIDATES.dead_letter)))
            ledger = self._get("trainer", "/status")["detail"]["ledger_pairs"]
            prefs = {p.id for p in pref_records}
            self.say(f"  candidates {len(cands)}/{self.expected_candidates}, judged {judged}, ledger {ledger}/{len(prefs)}")
            if len(cands) >= self.expected_candidates and judged >= len(cands) and ledger >= len(prefs):
                return
            time.sleep(3)
        raise TimeoutError("the loop did not finish judging in time; see the logs")

    def train_and_wait(self, timeout_s: float = 1800) -> dict:
        trainer = self.stack.url("trainer")
        before = len(httpx.get(f"{trainer}/runs", timeout=10).json())
        r = httpx.post(f"{trainer}/train", headers={"Authorization": f"Bearer {self.stack.admin_key}"}, timeout=30)
        if r.status_code != 202:
            raise RuntimeError(f"trainer refused to train: {r.status_code} {r.text}")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            done = [x for x in httpx.get(f"{trainer}/runs", timeout=10).json()[before:] if x["status"] != "running"]
            if done:
                return done[0]
            time.sleep(3)
        raise TimeoutError("the training run did not finish in time")

    def wait_serving(self, version: str, timeout_s: float = 180) -> None:
        """Until gateway and generator both serve `version` (the next round samples from it)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.served() == version and self._get("generator", "/status")["policy_version"] == version:
                return
            time.sleep(1)
        raise TimeoutError(f"gateway and generator did not both switch to {version}")

    def served(self) -> str:
        return self._get("gateway", "/v1/models")["data"][1]["id"]

    # -- the loop -------------------------------------------------------------
    def ingest(self, round_no: int) -> None:
        events = self.train_prompts[(round_no - 1) * self.per_round: round_no * self.per_round]
        if not events:
            raise RuntimeError(f"round {round_no}: no unused training questions left ({len(self.train_prompts)} ship)")
        producer = EventProducer(self.stack.kafka, "cli")
        try:
            producer.publish(PROMPTS, events)
        finally:
            producer.close()
        self.report.prompts_ingested += len(events)
        self.expected_candidates += len(events)
        self.say(f"round {round_no}: ingested {len(events)} new training questions (n={self.plan.n} candidates each)")

    def play_users(self, round_no: int) -> None:
        """Users through the gateway, 8 at a time (the gateway batches them): picks of two, then ratings."""
        import openai

        plan = self.plan
        client = openai.OpenAI(base_url=f"{self.stack.url('gateway')}/v1", api_key=self.stack.api_key, max_retries=2)
        feedback = httpx.Client(base_url=self.stack.url("gateway"), timeout=30,
                                headers={"Authorization": f"Bearer {self.stack.api_key}"})
        questions = [e.messages[-1].content for e in self.train_prompts[::-1]]  # from the far end: not this round's
        start = (round_no - 1) * (plan.picks + plan.ratings)

        def seed(kind: str, q: str) -> int:
            """Each request seeded by the draw and the question: unseeded, the gateway's answers would follow the
            order 8 concurrent users happen to reach it in, and so would the pairs their feedback makes."""
            return zlib.crc32(f"{self.seed}/{round_no}/{kind}/{q}".encode())

        def pick(q: str) -> bool:
            # the gateway's default temperature (0.7), like a chat client that sets none
            out = client.chat.completions.create(model="prefloop", messages=[{"role": "user", "content": q}], n=2,
                                                 max_tokens=plan.max_new_tokens, seed=seed("pick", q))
            choice = user_pick(out.choices[0].message.content, out.choices[1].message.content)
            return choice is not None and feedback.post("/v1/feedback", json={
                "response_id": out.id, "preferred_index": choice}).status_code == 202

        def rate(q: str) -> bool:
            out = client.chat.completions.create(model="prefloop", messages=[{"role": "user", "content": q}],
                                                 max_tokens=plan.max_new_tokens, seed=seed("rate", q))
            text = out.choices[0].message.content
            return bool(text.strip()) and feedback.post("/v1/feedback", json={
                "response_id": out.id, "choice_index": 0,
                "rating": 1 if PROFESSIONAL.search(text) else -1}).status_code == 202

        with ThreadPoolExecutor(8) as users:
            picked = sum(users.map(pick, questions[start:start + plan.picks]))
            rated = sum(users.map(rate, questions[start + plan.picks:start + plan.picks + plan.ratings]))
        feedback.close()
        self.expected_candidates += rated  # a rating re-queues the prompt with the rated answer
        self.report.gateway_picks += picked
        self.say(f"users: {picked} picks of two, {rated} ratings through the gateway")

    def run(self) -> DemoReport:
        started = time.monotonic()
        with self.phase("start: broker, model, services"):
            self.stack.start(self.say)
        self.say(f"gateway {self.stack.url('gateway')} (API key {self.stack.api_key})")
        for round_no in range(1, self.rounds + 1):
            self.ingest(round_no)
            self.say(f"round {round_no}: waiting for every prompt to be sampled, judged and in the ledger")
            with self.phase(f"round {round_no}: sample, judge, ledger"):
                self.wait_judged()
            with self.phase(f"round {round_no}: DPO, merge, gate"):
                run = self.train_and_wait()
            s = run.get("eval_summary") or {}
            self.say(f"round {round_no}: run {run['status']} {run.get('version') or ''} (win rate vs parent "
                     f"{s.get('win_rate_vs_parent')} CI {s.get('win_rate_ci95')}, vs base {s.get('win_rate_vs_base')}; "
                     f"reasons {s.get('gate_reasons') or run.get('error') or '-'})")
            if run.get("phases"):
                self.say(f"round {round_no}: " + ", ".join(f"{k} {v} s" for k, v in run["phases"].items()))
            if run["status"] == "promoted":
                with self.phase(f"round {round_no}: generator and gateway swap"):
                    self.wait_serving(run["version"])
                self.say(f"generator and gateway now serve {run['version']}")
            if round_no < self.rounds:
                with self.phase(f"round {round_no}: users through the gateway"):
                    self.play_users(round_no)
        self.report.elapsed_s = round(time.monotonic() - started, 1)
        collect(self.report, self.stack, self._count, self.served())
        return self.report


def run_demo(out: Path, rounds: int, prompts: int | None, say, model: str = "smollm2",
             seed: int = 0) -> tuple[DemoReport, bool]:
    out.mkdir(parents=True, exist_ok=True)
    demo = Demo(out, rounds, prompts, say, model, seed)
    try:
        report = demo.run()
        write(report, out)
    finally:
        demo.stack.stop()
    promoted = [v for v in report.versions if v["kind"] == "dpo" and v["promoted"]]
    ok = bool(promoted) and report.served_version == promoted[-1]["version"]
    return report, ok
