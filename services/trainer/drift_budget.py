"""DPO's drift budget: forgetting measured while training, so a round stops before the gate's guard
would reject it (used by prefloop's loop, services/trainer/lean_dpo.py)."""

from __future__ import annotations

from types import SimpleNamespace

import torch


class DriftBudget:
    """Forgetting as a training budget: the perplexity of the drift monitor (medical reference answers
    apart from the gate's guard set: `drift_monitor_conversations`) under the model as it trains,
    against the lower of the parent's (the adapter at zero) and the reference's when that is another
    version (the lineage's root by default): the gate guards against both, so a second round spends
    what the first left of the budget. A check within the budget keeps a copy of the adapter; the first
    check past it stops the run and restores the last kept copy (step 0, the parent itself, when no
    check was within it: the runner then rejects the run without merging or gating it). Training on
    past the budget in case the monitor fell back was measured once and not kept: a second round that
    began near the budget read +6.6% at step 4 and +6.7 to +7.3% at every check to step 28. The gate's
    guard then measures its own set, which no stopping decision saw. Why: with a fixed step count,
    fresh draws of the same recipe either broke the 5% guard (+5.3% to +14% medical at 28 steps) or
    fell short of the safety goal at 20 (README, "Over draws")."""

    def __init__(self, model, tokenizer, max_drift: float, autocast: bool, load_reference=None) -> None:
        from shared.alignment_data import drift_monitor_conversations

        self.model, self.tokenizer, self.max_drift, self.autocast = model, tokenizer, max_drift, autocast
        self.conversations = drift_monitor_conversations()
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.start = self.perplexity(model.get_base_model())  # the adapters are injected into it
        if load_reference is not None:
            self.start = min(self.start, self.perplexity(load_reference().eval()))
        self.kept_step, self.kept = 0, self._copy()

    def perplexity(self, model) -> float:
        from shared.evaluation import perplexity

        training = self.model.training
        self.model.eval()
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
                return perplexity(SimpleNamespace(model=model, tokenizer=self.tokenizer), self.conversations)
        finally:
            self.model.train(training)

    def check(self, step: int) -> float:
        """The monitor's change against the start; within the budget, the adapter is kept."""
        change = self.perplexity(self.model.get_base_model()) / self.start - 1
        if change <= self.max_drift:
            self.kept_step, self.kept = step, self._copy()
        return change

    def restore(self) -> int:
        with torch.no_grad():
            for p, saved in zip(self.trainable, self.kept):
                p.copy_(saved)
        return self.kept_step

    def _copy(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.trainable]


def no_room(history: list[dict], max_drift: float) -> str:
    """Why a run whose drift budget kept no step ends before the gate: its readings."""
    readings = ", ".join(f"step {h['step']} {h['drift/perplexity_change']:+.1%}" for h in history
                         if "drift/perplexity_change" in h)
    return (f"drift budget: no check within {max_drift:.1%} of the monitor's perplexity ({readings}): the parent "
            f"leaves this round no room, so nothing was merged or gated")
