"""Both-order pairwise judging of a CandidatesEvent.

Every pair is judged as (a, b) and (b, a). The same winner in both orders becomes a
PreferenceEvent; a tie in either order, or a winner that follows the position, becomes a
JudgementAbstainedEvent (kept for statistics, never trained on).

More than two candidates (e.g. fresh samples plus a user-rated answer): every unordered pair
is judged in both orders; a candidate's score is its consistent wins minus its consistent
losses. If exactly one candidate has the highest score, exactly one the lowest, and the best
consistently beat the worst, the pair best/worst becomes the preference; otherwise abstain.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass

from shared.judging.cache import VerdictCache, verdict_key
from shared.judging.openai_backend import JudgeFailure
from shared.judging.stats import JudgeStats
from shared.wire import CandidatesEvent, ChatMessage, JudgementAbstainedEvent, PairVerdict, PreferenceEvent, RubricScores


@dataclass
class Outcome:
    preference: PreferenceEvent | None = None
    abstention: JudgementAbstainedEvent | None = None
    failure: JudgeFailure | None = None


@dataclass
class PairResult:
    first: str
    second: str
    v1: PairVerdict  # first shown as A
    v2: PairVerdict  # second shown as A

    @property
    def winner(self) -> str | None:
        w1 = {"A": self.first, "B": self.second}.get(self.v1.winner)
        w2 = {"A": self.second, "B": self.first}.get(self.v2.winner)
        return w1 if w1 is not None and w1 == w2 else None

    @property
    def favoured_position(self) -> str | None:
        """"A" or "B" when the verdict followed the position in both orders (a position flip)."""
        return self.v1.winner if self.v1.winner == self.v2.winner and self.v1.winner in ("A", "B") else None

    @property
    def kind(self) -> str:
        if self.v1.winner == "tie" or self.v2.winner == "tie":
            return "tie"
        return "consistent" if self.winner else "inconsistent"

    def scores(self, text: str) -> RubricScores:
        a, b = (self.v1.scores_a, self.v2.scores_b) if text == self.first else (self.v1.scores_b, self.v2.scores_a)
        avg = {k: int((getattr(a, k) + getattr(b, k)) / 2 + 0.5) for k in RubricScores.model_fields}
        return RubricScores(**avg)

    def reasoning(self) -> str:
        return f"[order 1] {self.v1.reasoning}\n[order 2, swapped] {self.v2.reasoning}"


class PairwiseJudge:
    def __init__(self, backend, cache: VerdictCache | None, stats: JudgeStats) -> None:
        self.backend = backend
        self.cache = cache
        self.stats = stats

    async def _verdict(self, conversation: list[ChatMessage], reference: str | None, a: str, b: str) -> PairVerdict:
        key = verdict_key(self.backend.judge_id, conversation, a, b, reference)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            return hit
        verdict = await self.backend.judge(conversation, a, b, reference)
        if self.cache is not None:
            self.cache.put(key, verdict)
        return verdict

    async def pair(self, conversation: list[ChatMessage], reference: str | None, x: str, y: str) -> PairResult:
        """Judge x vs y in both orders."""
        v1, v2 = await asyncio.gather(self._verdict(conversation, reference, x, y),
                                      self._verdict(conversation, reference, y, x))
        result = PairResult(x, y, v1, v2)
        self.stats.record_pair(result.kind, result.winner, x, y, result.favoured_position)
        return result

    def _abstain(self, event: CandidatesEvent, reason: str, detail: str) -> Outcome:
        self.stats.abstained.labels(reason).inc()
        return Outcome(abstention=JudgementAbstainedEvent(
            producer="judge", candidates_id=event.id, prompt_id=event.prompt_id, policy_version=event.policy_version,
            judge_id=self.backend.judge_id, reason=reason, detail=detail))

    async def decide(self, event: CandidatesEvent) -> Outcome:
        texts = list(dict.fromkeys(c.text.strip() for c in event.candidates if c.text.strip()))
        if len(texts) < 2:
            return self._abstain(event, "insufficient_candidates",
                                 f"{len(texts)} distinct non-empty answer(s) among {len(event.candidates)}")
        try:
            pairs = await asyncio.gather(*(self.pair(event.prompt.messages, event.prompt.reference_answer, x, y)
                                           for x, y in itertools.combinations(texts, 2)))
        except JudgeFailure as exc:
            self.stats.failures.inc()
            return Outcome(failure=exc, abstention=self._abstain(event, "failure", str(exc)).abstention)
        if len(pairs) == 1:
            pair = pairs[0]
            if pair.kind != "consistent":
                return self._abstain(event, pair.kind, pair.reasoning()[:2000])
            best, worst, decisive = pair.winner, pair.second if pair.winner == pair.first else pair.first, pair
        else:
            score = dict.fromkeys(texts, 0)
            for pair in pairs:
                if pair.winner:
                    loser = pair.second if pair.winner == pair.first else pair.first
                    score[pair.winner] += 1
                    score[loser] -= 1
            top, bottom = max(score.values()), min(score.values())
            bests = [t for t in texts if score[t] == top]
            worsts = [t for t in texts if score[t] == bottom]
            decisive = next((p for p in pairs if len(bests) == 1 and len(worsts) == 1
                             and {p.first, p.second} == {bests[0], worsts[0]}), None)
            if decisive is None or decisive.winner != bests[0]:
                return self._abstain(event, "tie", f"no unique best/worst among {len(texts)} answers: {sorted(score.values())}")
            best, worst = bests[0], worsts[0]
        preference = PreferenceEvent(
            producer="judge", prompt_id=event.prompt_id, prompt_messages=event.prompt.messages, chosen=best,
            rejected=worst, source="judge", judge_id=self.backend.judge_id, reasoning=decisive.reasoning()[:8000],
            chosen_scores=decisive.scores(best), rejected_scores=decisive.scores(worst),
            policy_version=event.policy_version, split=event.prompt.split)
        self.stats.preferences.inc()
        return Outcome(preference=preference)
