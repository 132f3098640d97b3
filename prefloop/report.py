"""The demo's report: what flowed through the topics, what each round trained and what the gate
measured, the final version against the original base (the numbers issue #12 is judged by), three
held-out questions answered by the base and by the final version, and the plots."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from shared.topics import ABSTENTIONS, ALL_TOPICS, CANDIDATES, FEEDBACK, PREFERENCES

TARGETS = {"win rate vs base": ">= 0.70", "CI lower bound": ">= 0.60", "safety change": ">= +1.0",
           "length change": "within +-20%", "perplexity change (medical, general)": "<= +5% each"}


@dataclass
class DemoReport:
    rounds: int = 0
    model: str = ""
    seed: int = 0
    """the draw (prefloop demo --seed): 0 is the services' default seeds"""
    prompts_ingested: int = 0
    candidates: int = 0
    preferences: int = 0
    judge_preferences: int = 0
    user_preferences: int = 0
    gateway_picks: int = 0
    abstentions: int = 0
    abstention_reasons: dict[str, int] = field(default_factory=dict)
    dead_letters: int = 0
    dead_letter_reasons: list[str] = field(default_factory=list)
    feedback_events: int = 0
    served_version: str | None = None
    elapsed_s: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    """seconds per step of the demo, in order (DPO seconds of each run are in `versions`)"""
    versions: list[dict] = field(default_factory=list)
    runs: list[dict] = field(default_factory=list)
    final: dict = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)


def collect(r: DemoReport, stack, count, served: str) -> None:
    r.candidates = len(count(CANDIDATES))
    prefs = {p.id: p for p in count(PREFERENCES)}
    r.preferences = len(prefs)
    r.judge_preferences = sum(p.source == "judge" for p in prefs.values())
    r.user_preferences = sum(p.source == "user" for p in prefs.values())
    abstentions = count(ABSTENTIONS)
    r.abstentions = len(abstentions)
    for a in abstentions:
        r.abstention_reasons[a.reason] = r.abstention_reasons.get(a.reason, 0) + 1
    r.feedback_events = len(count(FEEDBACK))
    dead = [d for t in ALL_TOPICS for d in count(t.dead_letter)]
    r.dead_letters = len(dead)
    r.dead_letter_reasons = [f"{d.original_topic}@{d.offset}: {d.error}" for d in dead]
    r.served_version = served
    r.runs = httpx.get(f"{stack.url('trainer')}/runs", timeout=10).json()
    runs = {run.get("version"): run for run in r.runs}
    registry = stack.registry
    stack_versions = registry.promotion_stack()
    for meta in registry.list():
        s = meta.metrics.get("eval_summary") or {}
        details = meta.metrics.get("gate_details") or {}
        r.versions.append({
            "version": meta.version, "parent": meta.parent, "kind": meta.kind, "promoted": meta.version in stack_versions,
            "gate_reasons": s.get("gate_reasons", []), "win_rate_vs_parent": s.get("win_rate_vs_parent"),
            "win_rate_ci95": s.get("win_rate_ci95"), "win_rate_vs_base": s.get("win_rate_vs_base"),
            "win_rate_vs_base_ci95": s.get("win_rate_vs_base_ci95"), "safety_mean": s.get("safety_mean"),
            "perplexity_change": s.get("perplexity_change"), "general_perplexity_change": s.get("general_perplexity_change"),
            "length_change": s.get("length_change"), "pairs_trained": s.get("pairs_trained"),
            "rubric": details.get("rubric", {}), "mean_tokens": details.get("mean_tokens", {}),
            "samples": details.get("samples", []), "dpo_seconds": meta.metrics.get("dpo_seconds"),
            "dpo_steps": _dpo_steps(meta.metrics), "perplexity_vs_base": details.get("perplexity_vs_base", {}),
            "gate_seconds": (runs.get(meta.version, {}).get("phases") or {}).get("gate"),
            "run_seconds": runs.get(meta.version, {}).get("seconds")})
    _final(r)


def _dpo_steps(metrics: dict) -> str | None:
    """The optimizer steps a version kept, and where the drift budget stopped its run if it did: the run
    then logged a step past the one it kept, with the drift monitor's reading."""
    kept, history = metrics.get("dpo_steps"), metrics.get("dpo_history") or []
    if kept is None:
        return None
    last = history[-1] if history else {}
    if last.get("step", kept) > kept and "drift/perplexity_change" in last:
        return f"{kept} (stopped at {last['step']}: drift {last['drift/perplexity_change']:+.1%})"
    return str(kept)


def _final(r: DemoReport) -> None:
    """The served version against the base, compounding per-round perplexity changes along its lineage."""
    by_version = {v["version"]: v for v in r.versions}
    final = by_version.get(r.served_version or "")
    if not final or final["kind"] != "dpo":
        return
    base = next(v for v in r.versions if v["parent"] is None)["version"]
    ppl = {"medical": 1.0, "general": 1.0}
    node = final
    while node and node["kind"] == "dpo":
        ppl["medical"] *= 1 + (node["perplexity_change"] or 0)
        ppl["general"] *= 1 + (node["general_perplexity_change"] or 0)
        node = by_version.get(node["parent"])
    rubric, tokens = final["rubric"], final["mean_tokens"]
    safety = (rubric.get(final["version"], {}).get("safety") or 0) - (rubric.get(base, {}).get("safety") or 0)
    r.final = {"version": final["version"], "base": base, "win_rate_vs_base": final["win_rate_vs_base"],
               "win_rate_vs_base_ci95": final["win_rate_vs_base_ci95"], "safety_change": round(safety, 3),
               "length_change": round(tokens[final["version"]] / tokens[base] - 1, 4) if tokens.get(base) else None,
               "perplexity_change_medical": round(ppl["medical"] - 1, 4),
               "perplexity_change_general": round(ppl["general"] - 1, 4)}
    r.samples = final["samples"]


def _pct(x) -> str:
    return "-" if x is None else f"{x:+.1%}"


def write(r: DemoReport, out: Path) -> None:
    (out / "report.json").write_text(json.dumps(asdict(r), indent=2, default=str))
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    for run in r.runs:
        png = Path(run.get("run_dir") or "") / "metrics.png"
        if png.exists():
            shutil.copy(png, plots / f"training_{run.get('version') or run['run_id']}.png")
    plot_versions(r.versions, plots / "versions.png")
    lines = [f"# prefloop demo report ({r.model}, seed {r.seed})", "",
             f"{r.rounds} rounds in {r.elapsed_s}s; gateway serves **{r.served_version}**.", "",
             "| questions | candidates | preferences (judge / user) | abstentions | feedback | dead letters |",
             "|---|---|---|---|---|---|",
             f"| {r.prompts_ingested} | {r.candidates} | {r.preferences} ({r.judge_preferences} / {r.user_preferences}) "
             f"| {r.abstentions} {r.abstention_reasons or ''} | {r.feedback_events} | {r.dead_letters} |", "",
             "| version | parent | promoted | win vs parent (95% CI) | win vs base (95% CI) | safety | ppl medical "
             "vs parent (vs base) | ppl general vs parent (vs base) | length | pairs | DPO steps | DPO s | gate s "
             "| run s | gate |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for v in r.versions:
        ci, bci = v["win_rate_ci95"] or ("", ""), v["win_rate_vs_base_ci95"] or ("", "")
        vs_base = v.get("perplexity_vs_base") or {}
        lines.append(f"| {v['version']} | {v['parent'] or '-'} | {'yes' if v['promoted'] else 'no'} | "
                     f"{v['win_rate_vs_parent']} ({ci[0]}-{ci[1]}) | {v['win_rate_vs_base']} ({bci[0]}-{bci[1]}) | "
                     f"{v['safety_mean']} | {_pct(v['perplexity_change'])} ({_pct(vs_base.get('medical'))}) | "
                     f"{_pct(v['general_perplexity_change'])} ({_pct(vs_base.get('general'))}) | "
                     f"{_pct(v['length_change'])} | {v['pairs_trained']} | {v.get('dpo_steps') or '-'} | "
                     f"{v['dpo_seconds']} | "
                     f"{v['gate_seconds']} | {v['run_seconds']} | "
                     f"{'; '.join(v['gate_reasons']) or '-'} |")
    lines += [f"\nRun {run['run_id']} (from {run.get('parent')}) was rejected before the gate: "
              f"{'; '.join((run.get('eval_summary') or {}).get('gate_reasons') or [])}"
              for run in r.runs if run.get("status") == "rejected" and not run.get("version")]
    if r.phases:
        lines += ["", "Where the time went (seconds):", "", "| step | s |", "|---|---|",
                  *[f"| {name} | {sec} |" for name, sec in r.phases.items()],
                  f"| between the steps (ingest, logging) | {round(r.elapsed_s - sum(r.phases.values()), 1)} |"]
    rubric: dict[str, dict] = {}
    for v in r.versions:
        rubric.update(v["rubric"])
    if rubric:
        lines += ["", "Rubric means on the held-out questions (the judge, both orders):", "",
                  "| version | correctness | clarity | safety | empathy |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {m.get('correctness')} | {m.get('clarity')} | {m.get('safety')} | {m.get('empathy')} |"
                  for k, m in sorted(rubric.items())]
    if r.final:
        f = r.final
        lines += ["", f"**{f['version']} vs the base {f['base']}** (targets: {TARGETS}):", "",
                  f"win rate {f['win_rate_vs_base']} (95% CI {f['win_rate_vs_base_ci95']}), safety "
                  f"{f['safety_change']:+.2f}, length {_pct(f['length_change'])}, perplexity medical "
                  f"{_pct(f['perplexity_change_medical'])}, general {_pct(f['perplexity_change_general'])}"]
    for s in r.samples:
        lines += ["", f"> **{s['prompt']}**", "", f"- base: {s['base']}", f"- {r.served_version}: {s['new']}"]
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
    names = [v["version"] for v in dpo]
    x = range(len(dpo))
    a.bar([i - 0.2 for i in x], [v["win_rate_vs_parent"] or 0 for v in dpo], 0.4, label="vs parent",
          color=["tab:green" if v["promoted"] else "tab:gray" for v in dpo])
    a.bar([i + 0.2 for i in x], [v["win_rate_vs_base"] or 0 for v in dpo], 0.4, label="vs base", color="tab:blue")
    a.set_xticks(list(x), names)
    a.axhline(0.5, ls="--", c="k", lw=1)
    a.set_title("win rate (green: promoted)")
    a.set_ylim(0, 1)
    a.legend(fontsize=7)
    criteria = ["correctness", "clarity", "safety", "empathy"]
    rubric: dict[str, dict] = {}
    for v in versions:
        rubric.update(v["rubric"])
    width = 0.8 / max(1, len(rubric))
    for i, (name, means) in enumerate(sorted(rubric.items())):
        b.bar([c + i * width for c in range(4)], [means.get(k, 0) for k in criteria], width, label=name)
    b.set_xticks([c + 0.4 - width / 2 for c in range(4)], criteria)
    b.set_ylim(0, 10)
    b.set_title("rubric means on held-out questions")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
