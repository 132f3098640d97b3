"""Realistic preference pairs for trainer tests: the tiny model's own candidates judged by the
offline rubric judge in both orders (what the generator + judge services would produce)."""

from __future__ import annotations

import asyncio

from shared.engine import GenerationEngine, GenerationRequest
from shared.judging.pairwise import PairwiseJudge
from shared.judging.rubric import RubricJudge
from shared.judging.stats import JudgeStats
from shared.observability import new_registry
from shared.prompts import DEMO_PROMPTS, build_events
from shared.wire import CandidatesEvent, PreferenceEvent, SamplingParams


def judged_preferences(engine: GenerationEngine, prompts: int = 96, eval_fraction: float = 0.25,
                       max_new_tokens: int = 64) -> list[PreferenceEvent]:
    events, _ = build_events(str(DEMO_PROMPTS), eval_fraction=eval_fraction, limit=prompts)
    results = engine.generate([GenerationRequest(e.messages, SamplingParams(max_new_tokens=max_new_tokens, seed=None), 2)
                               for e in events])
    judge = PairwiseJudge(RubricJudge(), None, JudgeStats(new_registry()))

    async def decide_all():
        return await asyncio.gather(*(judge.decide(CandidatesEvent(
            producer="generator", prompt=e, policy_version=engine.version, prompt_tokens=r.prompt_tokens,
            candidates=r.candidates)) for e, r in zip(events, results)))

    return [o.preference for o in asyncio.run(decide_all()) if o.preference]
