"""`prefloop demo`: one full turn of the flywheel on the embedded default, then a report.

Round 1: ingest the shipped demo prompts -> generator -> judge -> ledger; once every prompt
is judged, the trainer runs DPO, gates and (if it passes) promotes; the gateway hot-swaps.
Then the demo plays users through the gateway with the `openai` SDK: it asks for two answers
and prefers, by a fixed rule, the one that recommends a healthcare professional (if both or
neither do, it gives no verdict), and rates single answers thumbs-up / thumbs-down by the same
rule. Round 2 (and later): those user preferences and the re-judged rated prompts are trained on.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from prefloop.stack import Stack
from shared.judging.rubric import PROFESSIONAL
from shared.kafka import EventProducer
from shared.kafka.reader import read_events
from shared.prompts import DEMO_PROMPTS, build_events
from shared.topics import (ABSTENTIONS, ALL_TOPICS, CANDIDATES, FEEDBACK, PREFERENCES, PROMPTS)
from shared.wire import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class DemoReport:
    rounds: int = 0
    prompts_ingested: int = 0
    candidates: int = 0
    preferences: int = 0
    judge_preferences: int = 0
    abstentions: int = 0
    dead_letters: int = 0
    dead_letter_reasons: list[str] = field(default_factory=list)
    feedback_events: int = 0
    user_preferences: int = 0
    served_version: str | None = None
    elapsed_s: float = 0.0
    versions: list[dict] = field(default_factory=list)
    runs: list[dict] = field(default_factory=list)


def user_pick(a: str, b: str) -> int | None:
    """The demo user's rule: prefer the answer that recommends a professional; else no verdict."""
    pa, pb = bool(PROFESSIONAL.search(a)), bool(PROFESSIONAL.search(b))
    return None if pa == pb or not a.strip() or not b.strip() or a.strip() == b.strip() else (0 if pa else 1)


class Demo:
    def __init__(self, out: Path, rounds: int, prompts: int, say, model: str = "tiny") -> None:
        self.out, self.rounds, self.n_prompts, self.say = out, rounds, prompts, say
        trainer_env = {
            "PREFLOOP_TRAINER_MIN_NEW_PAIRS": "100000",  # the demo triggers runs itself, once a round is judged
            "PREFLOOP_TRAINER_EVAL_PROMPTS": "48", "PREFLOOP_TRAINER_EVAL_MAX_NEW_TOKENS": "96"}
        if model == "tiny":
            # The 2M-parameter demo model moves its reference perplexity ~10% per DPO run at the
            # step size it needs to change at all; the 5% default stays for real models.
            trainer_env["PREFLOOP_TRAINER_MAX_PERPLEXITY_INCREASE"] = "0.15"
        self.stack = Stack(out / "state", model=model, trainer_env=trainer_env)
        self.report = DemoReport(rounds=rounds)
        self.expected_candidates = 0

    # -- waiting on the loop -------------------------------------------------
    def _count(self, topic) -> list:
        return read_events(self.stack.broker.bootstrap, topic, None, timeout_s=30, idle_s=0.5)

    def wait_judged(self, timeout_s: float = 600) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            cands = self._count(CANDIDATES)
            pref_records = self._count(PREFERENCES)
            judged = (len(pref_records) - self.report.user_preferences + len(self._count(ABSTENTIONS))
                      + len(self._count(CANDIDATES.dead_letter)))
            status = httpx.get(f"{self.stack.url('trainer')}/status", timeout=10).json()["detail"]
            prefs = {p.id for p in pref_records}
            self.say(f"  candidates {len(cands)}/{self.expected_candidates}, judged {judged}, "
                     f"ledger {status['ledger_pairs']}/{len(prefs)}")
            if len(cands) >= self.expected_candidates and judged >= len(cands) and status["ledger_pairs"] >= len(prefs):
                return
            time.sleep(2)
        raise TimeoutError("the loop did not finish judging in time; see the logs")

    def train_and_wait(self, timeout_s: float = 900) -> dict:
        trainer = self.stack.url("trainer")
        before = len(httpx.get(f"{trainer}/runs", timeout=10).json())
        r = httpx.post(f"{trainer}/train", headers={"Authorization": f"Bearer {self.stack.admin_key}"}, timeout=30)
        if r.status_code != 202:
            raise RuntimeError(f"trainer refused to train: {r.status_code} {r.text}")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            runs = httpx.get(f"{trainer}/runs", timeout=10).json()
            done = [x for x in runs[before:] if x["status"] != "running"]
            if done:
                return done[0]
            time.sleep(2)
        raise TimeoutError("the training run did not finish in time")

    def wait_served(self, version: str, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.served() == version:
                return
            time.sleep(1)
        raise TimeoutError(f"the gateway did not switch to {version}")

    def served(self) -> str:
        models = httpx.get(f"{self.stack.url('gateway')}/v1/models", timeout=10,
                           headers={"Authorization": f"Bearer {self.stack.api_key}"}).json()
        return models["data"][1]["id"]

    # -- the loop -------------------------------------------------------------
    def ingest(self) -> None:
        events, report = build_events(str(DEMO_PROMPTS), eval_fraction=0.2, limit=self.n_prompts,
                                      sampling=SamplingParams(max_new_tokens=96))
        producer = EventProducer(self.stack.kafka, "cli")
        try:
            producer.publish(PROMPTS, events)
        finally:
            producer.close()
        self.report.prompts_ingested += len(events)
        self.expected_candidates += len(events)
        self.say(f"ingested {len(events)} prompts ({report.train} train, {report.eval} eval)")

    def play_users(self, round_no: int, picks: int = 40, ratings: int = 8) -> int:
        import openai

        client = openai.OpenAI(base_url=f"{self.stack.url('gateway')}/v1", api_key=self.stack.api_key, max_retries=2)
        fb = httpx.Client(base_url=self.stack.url("gateway"), timeout=30,
                          headers={"Authorization": f"Bearer {self.stack.api_key}"})
        questions = [e.messages[-1].content for e in build_events(str(DEMO_PROMPTS), eval_fraction=0.2)[0]
                     if e.split == "train"]
        start = (round_no * (picks + ratings)) % max(1, len(questions) - picks - ratings)
        chosen = 0
        for q in questions[start:start + picks]:
            out = client.chat.completions.create(model="prefloop", messages=[{"role": "user", "content": q}], n=2,
                                                 max_tokens=96, temperature=1.0)
            pick = user_pick(out.choices[0].message.content, out.choices[1].message.content)
            if pick is not None and fb.post("/v1/feedback", json={"response_id": out.id,
                                                                  "preferred_index": pick}).status_code == 202:
                chosen += 1
        for q in questions[start + picks:start + picks + ratings]:
            out = client.chat.completions.create(model="prefloop", messages=[{"role": "user", "content": q}],
                                                 max_tokens=96)
            text = out.choices[0].message.content
            if text.strip() and fb.post("/v1/feedback", json={"response_id": out.id, "choice_index": 0,
                                                              "rating": 1 if PROFESSIONAL.search(text) else -1}
                                        ).status_code == 202:
                self.expected_candidates += 1  # a rating re-queues the prompt with the rated answer
        self.report.user_preferences += chosen
        self.say(f"users: {chosen} picks of two, {ratings} ratings through the gateway")
        return chosen

    def run(self) -> DemoReport:
        started = time.monotonic()
        self.stack.start(self.say)
        self.say(f"gateway {self.stack.url('gateway')} (API key {self.stack.api_key})")
        self.ingest()
        for round_no in range(1, self.rounds + 1):
            self.say(f"round {round_no}: waiting for every prompt to be sampled, judged and in the ledger")
            self.wait_judged()
            run = self.train_and_wait()
            summary = run.get("eval_summary") or {}
            self.say(f"round {round_no}: run {run['status']} {run.get('version') or ''} "
                     f"(win rate vs parent {summary.get('win_rate_vs_parent')}, "
                     f"reasons {summary.get('gate_reasons') or run.get('error') or '-'})")
            if run["status"] == "promoted":
                self.wait_served(run["version"])
                self.say(f"gateway now serves {run['version']}")
            if round_no < self.rounds:
                self.play_users(round_no)
        self.report.elapsed_s = round(time.monotonic() - started, 1)
        self.collect()
        return self.report

    # -- the report -------------------------------------------------------------
    def collect(self) -> None:
        r = self.report
        r.candidates = len(self._count(CANDIDATES))
        prefs = {p.id: p for p in self._count(PREFERENCES)}
        r.preferences = len(prefs)
        r.judge_preferences = sum(p.source == "judge" for p in prefs.values())
        r.user_preferences = sum(p.source == "user" for p in prefs.values())
        r.abstentions = len(self._count(ABSTENTIONS))
        r.feedback_events = len(self._count(FEEDBACK))
        dead = [d for t in ALL_TOPICS for d in self._count(t.dead_letter)]
        r.dead_letters = len(dead)
        r.dead_letter_reasons = [f"{d.original_topic}@{d.offset}: {d.error}" for d in dead]
        r.served_version = self.served()
        r.runs = httpx.get(f"{self.stack.url('trainer')}/runs", timeout=10).json()
        registry = self.stack.registry
        for meta in registry.list():
            s = meta.metrics.get("eval_summary") or {}
            r.versions.append({
                "version": meta.version, "parent": meta.parent, "kind": meta.kind,
                "promoted": meta.version in registry.promotion_stack(), "gate_reasons": s.get("gate_reasons", []),
                "win_rate_vs_parent": s.get("win_rate_vs_parent"), "safety_mean": s.get("safety_mean"),
                "perplexity_change": s.get("perplexity_change"), "pairs_trained": s.get("pairs_trained"),
                "rubric": (meta.metrics.get("gate_details") or {}).get("rubric", {}).get(meta.version),
            })

    def write(self) -> None:
        r, out = self.report, self.out
        (out / "report.json").write_text(json.dumps(asdict(r), indent=2, default=str))
        plots = out / "plots"
        plots.mkdir(exist_ok=True)
        for run in r.runs:
            png = Path(run.get("run_dir") or "") / "metrics.png"
            if png.exists():
                shutil.copy(png, plots / f"training_{run.get('version') or run['run_id']}.png")
        plot_versions(r.versions, plots / "versions.png")
        lines = ["# prefloop demo report", "",
                 f"{r.rounds} rounds in {r.elapsed_s}s; gateway serves **{r.served_version}**.", "",
                 "| prompts | candidates | preferences (judge / user) | abstentions | feedback | dead letters |",
                 "|---|---|---|---|---|---|",
                 f"| {r.prompts_ingested} | {r.candidates} | {r.preferences} ({r.judge_preferences} / "
                 f"{r.user_preferences}) | {r.abstentions} | {r.feedback_events} | {r.dead_letters} |", "",
                 "| version | parent | kind | promoted | win rate vs parent | safety | perplexity change | pairs | gate |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for v in r.versions:
            lines.append(f"| {v['version']} | {v['parent'] or '-'} | {v['kind']} | {'yes' if v['promoted'] else 'no'} "
                         f"| {v['win_rate_vs_parent']} | {v['safety_mean']} | {v['perplexity_change']} "
                         f"| {v['pairs_trained']} | {'; '.join(v['gate_reasons']) or '-'} |")
        if r.dead_letter_reasons:
            lines += ["", "Dead letters:", *[f"- {x}" for x in r.dead_letter_reasons]]
        lines += ["", "Plots: `plots/training_*.png` (DPO curves per run), `plots/versions.png`.",
                  "The judge is the offline rubric stand-in unless PREFLOOP_JUDGE_BACKEND=openai is set."]
        (out / "report.md").write_text("\n".join(lines) + "\n")


def plot_versions(versions: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dpo = [v for v in versions if v["kind"] == "dpo"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    a.bar([v["version"] for v in dpo], [v["win_rate_vs_parent"] or 0 for v in dpo],
          color=["tab:green" if v["promoted"] else "tab:gray" for v in dpo])
    a.axhline(0.55, ls="--", c="k", lw=1)
    a.set_title("win rate vs parent (green: promoted)")
    a.set_ylim(0, 1)
    criteria = ["correctness", "clarity", "safety", "empathy"]
    width = 0.8 / max(1, len(dpo))
    for i, v in enumerate(dpo):
        rubric = v.get("rubric") or {}
        b.bar([c + i * width for c in range(4)], [rubric.get(k, 0) for k in criteria], width, label=v["version"])
    b.set_xticks([c + 0.4 - width / 2 for c in range(4)], criteria)
    b.set_ylim(0, 10)
    b.set_title("rubric means on held-out prompts")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run_demo(out: Path, rounds: int, prompts: int, say, model: str = "tiny") -> tuple[DemoReport, bool]:
    out.mkdir(parents=True, exist_ok=True)
    demo = Demo(out, rounds, prompts, say, model)
    try:
        report = demo.run()
        demo.write()
    finally:
        demo.stack.stop()
    promoted = [v for v in report.versions if v["kind"] == "dpo" and v["promoted"]]
    ok = bool(promoted) and report.served_version == promoted[-1]["version"]
    return report, ok
