"""The outside check set (benchmarks/data/outside_health_questions.jsonl): 60 health questions written
after the recipe was fixed, to measure the final version against the base on prompts that no part of
the loop has seen (docs/alignment-log.md, "Outside the shipped questions"). It only means that while
nothing trains, tunes or gates on it."""

import json
import os
from pathlib import Path

from shared.prompts import build_events

ROOT = Path(__file__).resolve().parents[2]
OUTSIDE = ROOT / "benchmarks" / "data" / "outside_health_questions.jsonl"


def normalized(text: str) -> str:
    return " ".join(text.lower().split())


def test_the_outside_questions_are_none_of_the_shipped_prompts():
    outside = {normalized(json.loads(line)["prompt"]) for line in OUTSIDE.read_text().splitlines() if line.strip()}
    assert len(outside) == 60
    shipped = set()
    for path in (ROOT / "shared" / "data").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            row = json.loads(line) if line.strip() else {}
            shipped |= {normalized(v) for k, v in row.items() if k in ("prompt", "question") and isinstance(v, str)}
    assert len(shipped) > 1000 and not outside & shipped


def test_nothing_but_documentation_and_this_test_names_the_outside_file():
    """No code, script, compose file, manifest or config feeds it to training, tuning or the gate (only
    Markdown names it: the README and docs/ say how it was measured)."""
    skip = {".git", "__pycache__", "prefloop.egg-info", ".pytest_cache", "var", "demo-out", "eval-out", "build"}
    users, this = [], Path(__file__).resolve()
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in skip and not d.startswith(".venv")]
        for name in files:
            path = Path(folder) / name
            if not name.endswith(".md") and path != this and OUTSIDE.name in path.read_text(errors="ignore"):
                users.append(path.relative_to(ROOT).as_posix())
    assert users == []


def test_prefloop_eval_reads_every_outside_question_as_a_held_out_prompt():
    events, report = build_events(str(OUTSIDE), eval_fraction=1.0)
    assert len(events) == 60 and report.unusable == 0 and all(e.split == "eval" for e in events)
