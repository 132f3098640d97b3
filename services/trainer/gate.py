"""The promotion gate: a new version must be measurably better on prompts it never trained on,
and not worse elsewhere.

- win rate vs the parent on held-out prompts (the judge, both orders, ties excluded): the lower
  bound of its 95% Wilson interval must be above `min_win_ci_lower` (0.5: better than a coin);
- the mean safety score must not fall (beyond `safety_tolerance`);
- forgetting guards: perplexity on held-out medical question/answer pairs (`medical_qa.jsonl`,
  questions the loop never samples) and on general question/answer pairs rises at most
  `max_perplexity_increase`, both vs the parent and vs the base (rounds must not add up);
- length guard: mean answer length drifts at most `max_length_drift`, vs the parent and vs the base;
- reported, not gating: held-out preference accuracy, and a run whose reward accuracy is 1.0 from
  the start (seed 003's reward hacking) is flagged.

Every version is also compared with the original base model on the same prompts, for the report
(win rate vs base with its CI, rubric means of all three). The parent, the new version and the base
are loaded from the registry onto the same device and dtype; each answers a prompt `eval_samples` times
(seeded by the version's weights, the prompt and the sample; cached), so the parent's answers from
the previous gate are reused. Answer k of the new version meets answer k of the other, and the CI treats a prompt's
comparisons as one cluster (`Comparison.design_effect`): more answers per prompt average out the
sampling of single answers, the largest part of one comparison's noise, without claiming more
independent evidence than there is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from services.trainer.settings import TrainerSettings
from shared.alignment_data import general_conversations, health_prompts, medical_conversations
from shared.engine import GenerationEngine, inference_dtype
from shared.evaluation import AnswerCache, Comparison, EvalPrompt, compare, preference_accuracy
from shared.judging.cache import VerdictCache
from shared.judging.pairwise import PairwiseJudge
from shared.judging.stats import JudgeStats
from shared.observability import new_registry
from shared.registry import ModelRegistry
from shared.torch_thread import on_torch_thread
from shared.wire import EvalSummary, PreferenceEvent, SamplingParams

log = logging.getLogger(__name__)


@dataclass
class GateResult:
    passed: bool
    summary: EvalSummary
    comparison: Comparison
    flags: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)


def eval_prompts(count: int) -> list[EvalPrompt]:
    """The shipped held-out health questions: no part of the loop samples or trains on them."""
    return [EvalPrompt(p.messages, p.reference_answer) for p in health_prompts("eval")[:count]]


class CachedVersion:
    """A registry version for the gate, its engine loaded only when the gate's caches miss: a parent's
    answers and perplexities are those its own gate computed as the candidate, and the base's those
    of the lineage's first gate, so a gate after the first loads the new version alone (each load
    reads, verifies and packs the weights: 4 s for SmolLM2 on 2 cores) unless the ledger has held-out
    pairs: their preference accuracy is computed with the parent's weights every time. The cache keys
    need only the version, its weights' id and the dtype it would run in."""

    def __init__(self, registry: ModelRegistry, version: str, *, dtype: str, max_batch_size: int,
                 native_kernels: bool = True) -> None:
        self.version = version
        self.weights_id = registry.weights_id(version)
        self.dtype = inference_dtype(dtype)
        self._load = lambda: GenerationEngine.from_registry(registry, version, dtype=dtype, max_batch_size=max_batch_size,
                                                            native_kernels=native_kernels)
        self.engine: GenerationEngine | None = None

    def __getattr__(self, name: str):
        """Anything else (generate, model, tokenizer) is the engine's: loaded here on first use."""
        if name in ("engine", "_load"):  # not set yet: __init__ failed
            raise AttributeError(name)
        if self.engine is None:
            self.engine = self._load()
            log.info("gate: loaded %s (a cache missed)", self.version)
        return getattr(self.engine, name)

    def __enter__(self) -> "CachedVersion":
        return self

    def __exit__(self, *exc) -> None:
        if self.engine is not None:
            self.engine.close(drain=False)


GATE_MAX_ROWS = 128
"""a version gives up to this many answers (questions x `eval_samples`) in one decode batch (the
generator's default sequences per pass): SmolLM2 bf16, 80 questions x 96 tokens, 17.5-19.2 s at 80
rows against 20.3-21.1 s at the engine's default 32; the demo's 64 x 2 fill it"""


class Gate:
    def __init__(self, settings: TrainerSettings, registry: ModelRegistry, work_dir: Path) -> None:
        self.settings, self.registry = settings, registry
        self.answers = AnswerCache(work_dir / "gate-answers.sqlite")
        self.verdicts = VerdictCache(work_dir / "gate-verdicts.sqlite")
        self.general = general_conversations(settings.general_reference_size)
        self.medical = medical_conversations(settings.medical_reference_size)

    def evaluate(self, new_version: str, parent: str, *, heldout: list[PreferenceEvent],
                 history: list[dict], pairs_trained: int, settings: TrainerSettings | None = None) -> GateResult:
        """`settings`: the run's own (its base model's recipe applied), else the service's. The reference
        sets' sizes are the service's (loaded once)."""
        s = settings or self.settings
        base = self.registry.lineage(parent)[-1]  # every child is also compared with the root
        judge = PairwiseJudge(s.judge.make_backend(), self.verdicts, JudgeStats(new_registry()))
        prompts = eval_prompts(s.eval_prompts)
        sampling = SamplingParams(max_new_tokens=s.eval_max_new_tokens)
        rows = min(len(prompts) * s.eval_samples, GATE_MAX_ROWS)

        def load(version: str) -> CachedVersion:
            return CachedVersion(self.registry, version, dtype=s.engine.dtype, max_batch_size=rows,
                                 native_kernels=s.engine.native_kernels)

        with load(new_version) as new, load(parent) as old:
            vs_parent = compare(new, old, prompts, judge, sampling, self.answers, s.eval_samples, s.eval_seed)
            sets = [(name, c) for name, c in (("medical", self.medical), ("general", self.general)) if c]
            ppl = {name: [self.answers.perplexity(new, c), self.answers.perplexity(old, c)] for name, c in sets}
            accuracy = (on_torch_thread(preference_accuracy, new, heldout),
                        on_torch_thread(preference_accuracy, old, heldout)) if heldout else None
            if base == parent:
                vs_base = vs_parent
                for values in ppl.values():
                    values.append(values[1])
            else:
                with load(base) as root:
                    vs_base = compare(new, root, prompts, judge, sampling, self.answers, s.eval_samples, s.eval_seed)
                    for name, c in sets:
                        ppl[name].append(self.answers.perplexity(root, c))
        return self._decide(s, vs_parent, vs_base, ppl, accuracy, history, pairs_trained)

    @staticmethod
    def _decide(s: TrainerSettings, vs_parent: Comparison, vs_base: Comparison, ppl: dict, accuracy,
                history: list[dict], pairs_trained: int) -> GateResult:
        new, parent, base = vs_parent.candidate, vs_parent.baseline, vs_base.baseline
        reasons, flags = [], []
        low, high = vs_parent.win_rate_ci95()
        if low <= s.min_win_ci_lower:
            reasons.append(f"win rate vs parent {vs_parent.win_rate:.3f} (95% CI {low:.3f}-{high:.3f}) is not above "
                           f"{s.min_win_ci_lower} ({vs_parent.wins} wins, {vs_parent.losses} losses, "
                           f"{vs_parent.abstentions} ties; {vs_parent.prompts} questions x {vs_parent.samples} "
                           f"answers)")
        safety_new = vs_parent.rubric.get(new, {}).get("safety")
        safety_parent = vs_parent.rubric.get(parent, {}).get("safety")
        if safety_new is not None and safety_parent is not None and safety_new < safety_parent - s.safety_tolerance:
            reasons.append(f"mean safety dropped: {safety_new:.2f} < parent {safety_parent:.2f}")
        # vs the parent (this run) and vs the base (the lineage): small steps must not add up to forgetting
        change = {name: values[0] / values[1] - 1 for name, values in ppl.items()}
        drift = {name: values[0] / values[-1] - 1 for name, values in ppl.items()}
        for name in ppl:
            for what, delta, old in (("parent", change[name], ppl[name][1]), ("base", drift[name], ppl[name][-1])):
                if delta > s.max_perplexity_increase:
                    reasons.append(f"forgetting guard ({name}, vs {what}): held-out perplexity {delta:+.1%} "
                                   f"> {s.max_perplexity_increase:.0%} ({old:.3f} -> {ppl[name][0]:.3f})")
                    break
        # length, like perplexity, vs the parent and vs the base: two rounds at -12% each are -23% in all
        len_new = vs_parent.mean_tokens.get(new)
        length = {what: len_new / old - 1 for what, old in (("parent", vs_parent.mean_tokens.get(parent, 0)),
                                                             ("base", vs_base.mean_tokens.get(base, 0))) if old and len_new is not None}
        length_change = length.get("parent")
        for what, delta in length.items():
            if abs(delta) > s.max_length_drift:
                reasons.append(f"length guard (vs {what}): mean answer length changed {delta:+.1%} "
                               f"(> {s.max_length_drift:.0%})")
                break
        if accuracy and accuracy[0] < accuracy[1] - s.preference_accuracy_tolerance:
            flags.append(f"held-out preference accuracy fell: {accuracy[0]:.3f} < parent {accuracy[1]:.3f}")
        early = [h.get("rewards/accuracies") for h in history[: s.reward_hack_window]]
        if len(early) == s.reward_hack_window and all(a is not None and a >= 1.0 for a in early):
            flags.append(f"reward accuracy was 1.0 for the first {s.reward_hack_window} logged steps "
                         "(possible reward hacking; check answers, not just rewards)")
        base_low, base_high = vs_base.win_rate_ci95()
        summary = EvalSummary(
            win_rate_vs_parent=round(vs_parent.win_rate, 4), win_rate_ci95=(low, high),
            abstain_rate=round(vs_parent.abstain_rate, 4), safety_mean=safety_new, parent_safety_mean=safety_parent,
            preference_accuracy=accuracy[0] if accuracy else None,
            parent_preference_accuracy=accuracy[1] if accuracy else None,
            perplexity_change=round(change["medical"], 4) if "medical" in change else None,
            general_perplexity_change=round(change["general"], 4) if "general" in change else None,
            length_change=round(length_change, 4) if length_change is not None else None,
            base_version=base, win_rate_vs_base=round(vs_base.win_rate, 4), win_rate_vs_base_ci95=(base_low, base_high),
            base_safety_mean=vs_base.rubric.get(base, {}).get("safety"),
            pairs_trained=pairs_trained, promoted=not reasons, gate_reasons=reasons + [f"flag: {f}" for f in flags])
        rubric = {**vs_base.rubric, **vs_parent.rubric}
        details = {"rubric": rubric, "perplexity_vs_base": {k: round(v, 4) for k, v in drift.items()}, "mean_tokens": {**vs_base.mean_tokens, **vs_parent.mean_tokens},
                   "bleu": vs_parent.bleu, "wins": vs_parent.wins, "losses": vs_parent.losses,
                   "abstentions": vs_parent.abstentions, "prompts": vs_parent.prompts,
                   "answers_per_prompt": vs_parent.samples,
                   "vs_base": {"wins": vs_base.wins, "losses": vs_base.losses, "abstentions": vs_base.abstentions},
                   "samples": [{"prompt": b["prompt"], "base": b["baseline"], "new": b["candidate"]}
                               for b in vs_base.rows[:3]]}
        return GateResult(passed=not reasons, summary=summary, comparison=vs_parent, flags=flags, details=details)
