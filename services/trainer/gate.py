"""The promotion gate: a new version must be measurably better and not worse elsewhere.

- preference accuracy on held-out ledger pairs must not fall below the parent's;
- win rate vs the parent on held-out prompts (judge, both orders) >= threshold, and the
  mean safety score must not drop;
- forgetting guard: perplexity on a held-out SFT reference set rises at most X%;
- length guard: mean answer length drifts at most Y%;
- a run whose reward accuracy is 1.0 from the start is flagged (seed 003's reward hacking).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from services.trainer.settings import TrainerSettings
from shared.engine import GenerationEngine
from shared.evaluation import Comparison, EvalPrompt, compare, perplexity, preference_accuracy
from shared.judging.pairwise import PairwiseJudge
from shared.wire import EvalSummary, PreferenceEvent, SamplingParams

log = logging.getLogger(__name__)


@dataclass
class GateResult:
    passed: bool
    summary: EvalSummary
    comparison: Comparison
    flags: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)


def evaluate_gate(new: GenerationEngine, parent: GenerationEngine, *, settings: TrainerSettings,
                  judge: PairwiseJudge, prompts: list[EvalPrompt], heldout: list[PreferenceEvent],
                  reference_set: list[list[dict]], history: list[dict], pairs_trained: int) -> GateResult:
    reasons: list[str] = []
    flags: list[str] = []

    acc_new = preference_accuracy(new, heldout) if heldout else None
    acc_parent = preference_accuracy(parent, heldout) if heldout else None
    if heldout and acc_new < acc_parent - settings.preference_accuracy_tolerance:
        reasons.append(f"held-out preference accuracy fell: {acc_new:.3f} < parent {acc_parent:.3f}"
                       f" - {settings.preference_accuracy_tolerance}")

    sampling = SamplingParams(max_new_tokens=settings.eval_max_new_tokens)
    comparison = compare(new, parent, prompts, judge, sampling, seed=settings.seed)
    win_rate = comparison.win_rate
    if win_rate < settings.win_rate_threshold:
        reasons.append(f"win rate vs parent {win_rate:.3f} < threshold {settings.win_rate_threshold} "
                       f"({comparison.wins} wins, {comparison.losses} losses, {comparison.abstentions} abstentions)")
    safety_new = comparison.rubric.get(new.version, {}).get("safety")
    safety_parent = comparison.rubric.get(parent.version, {}).get("safety")
    if safety_new is not None and safety_parent is not None and safety_new < safety_parent - settings.safety_tolerance:
        reasons.append(f"mean safety dropped: {safety_new:.2f} < parent {safety_parent:.2f}")

    ppl_change = None
    if reference_set:
        ppl_parent, ppl_new = perplexity(parent, reference_set), perplexity(new, reference_set)
        ppl_change = ppl_new / ppl_parent - 1
        if ppl_change > settings.max_perplexity_increase:
            reasons.append(f"forgetting guard: reference perplexity +{ppl_change:.1%} "
                           f"> {settings.max_perplexity_increase:.0%} ({ppl_parent:.3f} -> {ppl_new:.3f})")

    len_new, len_parent = comparison.mean_tokens.get(new.version, 0), comparison.mean_tokens.get(parent.version, 0)
    length_change = (len_new / len_parent - 1) if len_parent else None
    if length_change is not None and abs(length_change) > settings.max_length_drift:
        reasons.append(f"length guard: mean answer length changed {length_change:+.1%} "
                       f"(> {settings.max_length_drift:.0%})")

    early = [h.get("rewards/accuracies") for h in history[: settings.reward_hack_window]]
    if len(early) == settings.reward_hack_window and all(a is not None and a >= 1.0 for a in early):
        flags.append(f"reward accuracy was 1.0 for the first {settings.reward_hack_window} logged steps "
                     "(possible reward hacking; check answers, not just rewards)")

    summary = EvalSummary(
        win_rate_vs_parent=round(win_rate, 4), win_rate_ci95=comparison.win_rate_ci95(),
        abstain_rate=round(comparison.abstain_rate, 4), safety_mean=safety_new, parent_safety_mean=safety_parent,
        preference_accuracy=acc_new, parent_preference_accuracy=acc_parent,
        perplexity_change=round(ppl_change, 4) if ppl_change is not None else None,
        length_change=round(length_change, 4) if length_change is not None else None,
        pairs_trained=pairs_trained, promoted=not reasons, gate_reasons=reasons + [f"flag: {f}" for f in flags],
    )
    return GateResult(passed=not reasons, summary=summary, comparison=comparison, flags=flags,
                      details={"rubric": comparison.rubric, "mean_tokens": comparison.mean_tokens,
                               "bleu": comparison.bleu, "wins": comparison.wins, "losses": comparison.losses,
                               "abstentions": comparison.abstentions})

