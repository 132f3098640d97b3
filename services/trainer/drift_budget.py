"""DPO's drift budget: forgetting measured while training, so a round stops before the gate's guard
would reject it (used by prefloop's loop, services/trainer/lean_dpo.py)."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch
from peft.tuners.lora import LoraLayer


class DriftBudget:
    """Forgetting as a training budget: the perplexity of the drift monitor (medical reference answers
    apart from the gate's guard set: `drift_monitor_conversations`) under the version the adapter would make,
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

    def __init__(self, model, tokenizer, max_drift: float, load_reference=None, load_parent=None) -> None:
        """`load_parent()` returns the parent as the registry keeps it (fp32 on a CPU): the served version is
        its weights + the adapter's delta, rounded once to the serving dtype. Without it the frozen weights
        stand in (exact where they are the stored ones)."""
        from shared.alignment_data import drift_monitor_conversations

        self.model, self.tokenizer, self.max_drift = model, tokenizer, max_drift
        self.conversations = drift_monitor_conversations()
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        layers = {name.removeprefix("base_model.model.") + ".weight": m for name, m in model.named_modules()
                  if isinstance(m, LoraLayer)}
        stored = load_parent().state_dict() if load_parent else {}
        self.parent_weights = [(layer, (stored[key] if load_parent else layer.get_base_layer().weight.data).float())
                               for key, layer in layers.items()]
        del stored
        self.start = self.perplexity(model.get_base_model())  # the adapters are at zero: the parent
        if load_reference is not None:
            self.start = min(self.start, self.perplexity(load_reference().eval()))
        self.kept_step, self.kept = 0, self._copy()

    def perplexity(self, model) -> float:
        """The monitor's perplexity under `model` in its weights' own dtype, as the gate's engine computes
        it (no autocast)."""
        from shared.evaluation import perplexity

        training = self.model.training
        self.model.eval()
        try:
            return perplexity(SimpleNamespace(model=model, tokenizer=self.tokenizer), self.conversations)
        finally:
            self.model.train(training)

    def check(self, step: int) -> float:
        """The monitor's change against the start, measured on the model as it would be served; within the
        budget, the adapter is kept."""
        with self.served():
            change = self.perplexity(self.model.get_base_model()) / self.start - 1
        if change <= self.max_drift:
            self.kept_step, self.kept = step, self._copy()
        return change

    @contextlib.contextmanager
    def served(self):
        """The version the adapter would make, as `merge_adapter` makes it and the gate's engine loads it (the
        parent's stored weights + the adapter's delta in fp32, rounded to the frozen weights' dtype: the
        engine's), with the adapter path off; the frozen weights come back unchanged. Why: measured over the
        bf16 base with the adapter under autocast, how the loop trains, run 66's round 1 kept step 16 at
        +3.40% on the monitor, and the version it made read +4.10% as served (+4.32% in fp32): a budget of
        4% let a round end near the gate's 5% guard. From the frozen bf16 weights instead of the stored ones,
        the sum is rounded twice, and a test's adapter read 5.60% where its version reads 5.42%."""
        frozen = [layer.get_base_layer().weight for layer, _ in self.parent_weights]
        saved = [w.data for w in frozen]
        try:
            with torch.no_grad():
                for (layer, parent), w in zip(self.parent_weights, frozen):
                    delta = sum(layer.get_delta_weight(name).float() for name in layer.active_adapters)
                    w.data = (parent + delta).to(w.dtype)
            with self.model.disable_adapter():
                yield
        finally:
            for w, data in zip(frozen, saved):
                w.data = data

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
