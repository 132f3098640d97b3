"""The closed loop as a user runs it: `prefloop demo` (a shorter configuration). `prefloop up` is
tested on SmolLM2 in test_real_model."""

from __future__ import annotations

import json
import subprocess

from services.trainer.ledger import PreferenceLedger
from tests.integration.procs import PREFLOOP


def test_demo_runs_the_whole_loop_on_the_tiny_model(tmp_path):
    """The loop's plumbing on the toy model. Whether the gate promotes the tiny model's versions is
    noise (its gains are within the gate's confidence interval): both outcomes must be reported right."""
    out = tmp_path / "demo"
    proc = subprocess.run([PREFLOOP, "demo", "--model", "tiny", "--out", str(out), "--rounds", "2", "--prompts", "80"],
                          capture_output=True, text=True, timeout=1500)
    report = json.loads((out / "report.json").read_text())
    dpo = [v for v in report["versions"] if v["kind"] == "dpo"]
    promoted = [v for v in dpo if v["promoted"]]
    assert proc.returncode == (0 if promoted else 1), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(dpo) == 2  # a run per round, each recorded with its outcome
    if promoted:
        assert report["served_version"] == promoted[-1]["version"]
        # the real gate: a promoted version's win rate vs its parent is above 0.5 with 95% confidence,
        # and nothing else held it back
        assert all(v["win_rate_ci95"][0] > 0.5 and v["win_rate_vs_parent"] > 0.5 for v in promoted)
        assert not [r for v in promoted for r in v["gate_reasons"] if not r.startswith("flag:")]
    else:
        assert report["served_version"] == "v0001"
    assert all(v["gate_reasons"] for v in dpo if not v["promoted"])  # every rejection says why
    assert report["prompts_ingested"] == 160 and report["candidates"] >= 160
    assert report["judge_preferences"] > 0 and report["user_preferences"] > 0 and report["feedback_events"] > 0
    assert report["dead_letters"] == 0, report["dead_letter_reasons"]
    ledger = PreferenceLedger(out / "state" / "ledger")
    assert sum(e.source == "user" for e in ledger.events()) == report["user_preferences"]
    assert (out / "report.md").exists() and (out / "plots" / "versions.png").exists()
    # where the time went: every round's steps, timed inside the whole run
    phases = report["phases"]
    assert {"round 1: sample, judge, ledger", "round 2: DPO, merge, gate",
            "round 1: users through the gateway"} <= set(phases)
    assert all(s >= 0 for s in phases.values()) and sum(phases.values()) <= report["elapsed_s"] + 0.05 * len(phases)
    assert phases["round 1: sample, judge, ledger"] > 0 and phases["round 2: DPO, merge, gate"] > 0
    assert "Where the time went" in (out / "report.md").read_text()
    assert list((out / "plots").glob("training_*.png"))

    best = dpo[-1]["version"]
    ev = subprocess.run([PREFLOOP, "eval", "--a", best, "--b", dpo[-1]["parent"], "--registry",
                         str(out / "state" / "registry"), "--out", str(tmp_path / "eval"), "--limit", "24"],
                        capture_output=True, text=True, timeout=600)
    assert ev.returncode == 0, ev.stdout + ev.stderr
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["prompts"] == 24 and set(result["rubric"]) == {best, dpo[-1]["parent"]}
    assert 0 <= result["win_rate_ci95"][0] <= result["win_rate"] <= result["win_rate_ci95"][1] <= 1
    rows = (tmp_path / "eval" / "blinded_for_raters.csv").read_text().splitlines()
    assert rows[0] == "prompt,answer_1,answer_2,hidden_key" and len(rows) >= 25
