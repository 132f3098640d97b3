"""Both-order pairwise judging of a CandidatesEvent.

Every pair is judged as (a, b) and (b, a). The same winner in both orders becomes a
PreferenceEvent; a tie in either order, or a winner that follows the position, becomes a
JudgementAbstainedEvent (kept for statistics, never trained on).

Which two of a prompt's candidates become the pair (best vs worst by rubric score, a minimum
margin, both-order confirmation; a user's rating fixes a side) is in `selection.py`.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass

from shared.judging.cache import VerdictCache, verdict_key
from shared.judging.openai_backend import EndpointUnavailable, JudgeFailure
from shared.judging.selection import comparable_groups, cut_answers, scoring_pairs, weighted_mean
from shared.judging.stats import JudgeStats
from shared.wire import CandidatesEvent, ChatMessage, JudgementAbstainedEvent, PairVerdict, PreferenceEvent, RubricScores


@dataclass
class Outcome:
    preference: PreferenceEvent | None = None
    abstention: JudgementAbstainedEvent | None = None
    failure: JudgeFailure | None = None
    outage: EndpointUnavailable | None = None
    """the endpoint was down: no outcome yet, the event must be judged again later"""


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
    def __init__(self, backend, cache: VerdictCache | None, stats: JudgeStats, min_margin: float = 2.0,
                 match_finish: bool = False) -> None:
        self.backend = backend
        self.cache = cache
        self.stats = stats
        self.min_margin = min_margin
        self.match_finish = match_finish
        """pair only answers that ended alike (see selection.py's `comparable_groups`)"""

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

    def _abstain(self, event: CandidatesEvent, reason: str, detail: str, pair: tuple[str, str] | None = None,
                 favoured: bool = False) -> Outcome:
        """`pair`: the two answers in question (a reviewer can settle them); `favoured`: the judge's scores
        favoured the first."""
        self.stats.abstained.labels(reason).inc()
        return Outcome(abstention=JudgementAbstainedEvent(
            producer="judge", candidates_id=event.id, prompt_id=event.prompt_id, policy_version=event.policy_version,
            judge_id=self.backend.judge_id, reason=reason, detail=detail, split=event.prompt.split,
            prompt_messages=event.prompt.messages if pair else [], answers=list(pair or ()),
            judge_favours=0 if pair and favoured else None))

    async def decide(self, event: CandidatesEvent) -> Outcome:
        """Best vs worst of the candidates (see selection.py), or an abstention saying why not."""
        texts = list(dict.fromkeys(c.text.strip() for c in event.candidates if c.text.strip()))
        if len(texts) < 2:
            return self._abstain(event, "insufficient_candidates",
                                 f"{len(texts)} distinct non-empty answer(s) among {len(event.candidates)}")
        rated = next(((c.text.strip(), c.user_rating) for c in event.candidates
                      if c.user_rating is not None and c.text.strip()), None)
        cut = cut_answers(event.candidates)
        groups = comparable_groups(texts, cut) if self.match_finish and rated is None else [texts]
        if not groups:
            return self._abstain(event, "insufficient_candidates",
                                 f"no two of {len(texts)} distinct answers ended alike ({len(cut)} cut at the token "
                                 f"limit, {len(texts) - len(cut)} finished): a cut answer is not paired with a "
                                 f"finished one")
        conversation, reference = event.prompt.messages, event.prompt.reference_answer
        try:
            scoring = await asyncio.gather(*(self.pair(conversation, reference, x, y) for x, y in scoring_pairs(texts)))
            scores: dict[str, list[RubricScores]] = defaultdict(list)
            for p in scoring:
                scores[p.first].append(p.scores(p.first))
                scores[p.second].append(p.scores(p.second))
            value = {t: weighted_mean(scores[t]) for t in texts}
            if rated is None:
                ranked = max((sorted(g, key=value.get) for g in groups), key=lambda r: value[r[-1]] - value[r[0]])
                chosen, rejected = ranked[-1], ranked[0]
            else:
                others = [t for t in texts if t != rated[0]]
                chosen, rejected = ((max(others, key=value.get), rated[0]) if rated[1] < 0
                                    else (rated[0], min(others, key=value.get)))
            confirm = next((p for p in scoring if {p.first, p.second} == {chosen, rejected}), None) \
                or await self.pair(conversation, reference, chosen, rejected)
        except EndpointUnavailable as exc:
            return Outcome(outage=exc)
        except JudgeFailure as exc:
            self.stats.failures.inc()
            return Outcome(failure=exc, abstention=self._abstain(event, "failure", str(exc), (texts[0], texts[1])
                                                                 ).abstention)
        leads = value[chosen] > value[rejected]
        if rated is None:
            if confirm.winner != chosen:
                return self._abstain(event, confirm.kind if confirm.kind != "consistent" else "inconsistent",
                                     confirm.reasoning()[:2000], (chosen, rejected), leads)
            if value[chosen] - value[rejected] < self.min_margin:
                return self._abstain(event, "tie", f"best and worst of {len(texts)} answers differ by "
                                                   f"{value[chosen] - value[rejected]:.2f} < {self.min_margin}",
                                     (chosen, rejected), leads)
        if rated is not None and confirm.winner == rejected:
            return self._abstain(event, "conflict", f"the user rated {rated[1]:+d} but the judge prefers the other "
                                                    f"answer in both orders: {confirm.reasoning()[:1800]}",
                                 (rejected, chosen), True)
        preference = PreferenceEvent(
            producer="judge", prompt_id=event.prompt_id, prompt_messages=conversation, chosen=chosen,
            rejected=rejected, source="judge" if rated is None else "user", judge_id=self.backend.judge_id,
            reasoning=confirm.reasoning()[:8000], chosen_scores=confirm.scores(chosen),
            rejected_scores=confirm.scores(rejected), policy_version=event.policy_version, split=event.prompt.split,
            chosen_cut=chosen in cut, rejected_cut=rejected in cut)
        self.stats.preferences.inc()
        return Outcome(preference=preference)
