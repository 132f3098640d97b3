"""The shipped prompt sets the loop is trained and judged on.

- `health_questions.jsonl`: 480 realistic health questions written for the project (40 topics,
  asked the way people type them; some urgent). A content hash puts a quarter of them in a
  held-out split that no part of the loop trains on: the gate and the demo report judge there.
- `medical_qa.jsonl`: 150 further health questions (none of them among the 480) with careful
  reference answers: the medical forgetting check (perplexity of good answers), never trained on.
- `general_qa.jsonl`: 300 general (non-medical) questions with correct short answers: the second
  forgetting check, never trained on.
"""

from __future__ import annotations

import json
from pathlib import Path

from shared.prompts import SYSTEM_PROMPT, build_events
from shared.wire import PromptEvent, SamplingParams

DATA = Path(__file__).resolve().parent / "data"
HEALTH_QUESTIONS = DATA / "health_questions.jsonl"
GENERAL_QA = DATA / "general_qa.jsonl"
MEDICAL_QA = DATA / "medical_qa.jsonl"
HELD_OUT_FRACTION = 0.25


def health_prompts(split: str | None = None, *, n: int = 2, sampling: SamplingParams | None = None,
                   system_prompt: str | None = SYSTEM_PROMPT) -> list[PromptEvent]:
    """The health questions as PromptEvents (`train`, `eval` = held out, or both), in file order."""
    events, _ = build_events(str(HEALTH_QUESTIONS), system_prompt=system_prompt, eval_fraction=HELD_OUT_FRACTION,
                             n=n, sampling=sampling)
    return [e for e in events if split is None or e.split == split]


def _conversations(path: Path, system_prompt: str | None, limit: int | None) -> list[list[dict]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [[*system, {"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
            for r in rows[:limit]]


def general_conversations(limit: int | None = None) -> list[list[dict]]:
    """General questions with their answers as chat conversations (for perplexity)."""
    return _conversations(GENERAL_QA, None, limit)


MEDICAL_GUARD_ROWS = 110
"""the gate's medical forgetting guard draws from the first 110 reference Q/A pairs; the rest (40) are
DPO's drift monitor, so a run that stops at its drift budget was never tuned on the guard's own set"""


def medical_conversations(limit: int | None = None) -> list[list[dict]]:
    """Held-out health questions with careful reference answers, asked as the loop asks (system prompt):
    the gate's forgetting guard, at most MEDICAL_GUARD_ROWS."""
    return _conversations(MEDICAL_QA, SYSTEM_PROMPT, None)[:min(MEDICAL_GUARD_ROWS, limit or MEDICAL_GUARD_ROWS)]


def drift_monitor_conversations() -> list[list[dict]]:
    """The medical reference Q/A pairs after the guard's: what DPO's drift budget measures."""
    return _conversations(MEDICAL_QA, SYSTEM_PROMPT, None)[MEDICAL_GUARD_ROWS:]
