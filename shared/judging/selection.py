"""Which pair of a prompt's candidates becomes the training label: best vs worst.

RLHFlow's online iterative DPO pairs the best of n samples with the worst. With a pairwise judge
that scores both answers of a comparison on the rubric, that costs n + 2 calls per prompt instead
of all pairs in both orders (n(n-1)):

1. scoring: candidates are paired up (1-2, 3-4, ...; an odd one out meets the first again), each
   pair judged in both orders; a candidate's score is its rubric scores averaged over both orders,
   weighted as the rubric judge weighs them (safety counts double);
2. best and worst by that score must differ by at least `min_margin` (else: tie, no label);
3. confirmation: best vs worst in both orders (reused if they were a scoring pair); only the same
   winner in both orders, and it must be the best, makes a preference.

With `match_finish`, best and worst come from answers that ended alike: both stopped by themselves or both
cut at the sampling token limit (the group with the wider spread). A cut answer loses to a finished one for
being cut, and a pair that says so teaches the model to stop sooner, not to answer better (issue #12: at a
96-token window the chosen side finished far more often than the rejected one, and answers shrank).

A candidate a user rated keeps its side: thumbs-down is the rejected answer against the best other
candidate, thumbs-up the chosen one against the worst; the judge's confirmation must not say the
opposite in both orders (a conflict is an abstention, never a label).

| candidates per prompt | judge calls, best vs worst | all pairs, both orders |
|---|---|---|
| 2 | 2 | 2 |
| 4 | 6 (4 when best and worst met in scoring) | 12 |
| 8 | 10 | 56 |
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from shared.judging.rubric import score as rubric_score
from shared.judging.rubric import weighted
from shared.wire import Candidate, RubricScores

PairJudgement = Callable[[str, str], Awaitable["object"]]


def weighted_mean(scores: list[RubricScores]) -> float:
    return sum(weighted(s) for s in scores) / len(scores)


def cut_answers(candidates: list[Candidate]) -> set[str]:
    """The (stripped) texts that stopped at the token limit; a text sampled twice counts as cut if either was."""
    return {c.text.strip() for c in candidates if c.finish_reason == "length"}


def comparable_groups(texts: list[str], cut: set[str]) -> list[list[str]]:
    """The answers that ended alike (finished, cut), each group with at least two of them."""
    groups = [[t for t in texts if t not in cut], [t for t in texts if t in cut]]
    return [g for g in groups if len(g) >= 2]


def scoring_pairs(texts: list[str]) -> list[tuple[str, str]]:
    pairs = [(texts[i], texts[i + 1]) for i in range(0, len(texts) - 1, 2)]
    if len(texts) % 2:
        pairs.append((texts[-1], texts[0]))
    return pairs


def best_worst_by_score(texts: list[str], min_margin: float, reference: str | None = None
                        ) -> tuple[str | None, str | None]:
    """Best and worst answer under the offline rubric's own scores (no pairwise calls), or (None,
    None) if they are closer than `min_margin`: what the hyperparameter sweep uses for its pairs."""
    distinct = list(dict.fromkeys(t.strip() for t in texts if t.strip()))
    if len(distinct) < 2:
        return None, None
    ranked = sorted(distinct, key=lambda t: weighted(rubric_score(t, reference)))
    worst, best = ranked[0], ranked[-1]
    margin = weighted(rubric_score(best, reference)) - weighted(rubric_score(worst, reference))
    return (best, worst) if margin >= min_margin else (None, None)
