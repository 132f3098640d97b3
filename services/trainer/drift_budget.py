"""DPO's drift budget: forgetting measured while training, so a round stops before the gate's guard
would reject it (in prefloop's loop, services/trainer/lean_dpo.py, and in TRL's DPOTrainer through
`BudgetCallback`)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from types import SimpleNamespace
from typing import Callable, Protocol

import torch
from peft.tuners.lora import LoraLayer
from transformers import TrainerCallback


class MonitorStore(Protocol):
    """Perplexities by `shared.evaluation.perplexity_key`: the gate's `AnswerCache` keeps them."""

    def known_perplexity(self, key: str) -> float | None: ...

    def keep_perplexity(self, key: str, value: float) -> None: ...


@dataclass(frozen=True)
class MonitorReadings:
    """What one run's budget may find measured before: the monitor's perplexities in `store`, keyed by
    weights ids; `parent` and `reference` are those of the run's parent and of its reference where that is
    another version (the lineage's root). A round's parent is the version the previous round's last kept
    check measured, and its reference that round's parent: neither is measured again."""

    store: MonitorStore
    parent: str
    reference: str = ""

    def known(self, weights: str, dtype, measure: Callable[[], float]) -> float:
        """The reading of `weights` in `dtype`, from the store, else `measure()`d and kept."""
        key = monitor_key(weights, dtype) if weights else None
        value = self.store.known_perplexity(key) if key else None
        if value is None:
            value = measure()
            if key:
                self.store.keep_perplexity(key, value)
        return value

    def keep(self, weights: str, reading: tuple[str, float]) -> None:
        """Keep a run's last kept check (`DPOResult.drift_monitor`: dtype, perplexity) as the reading of the
        version it saved, whose weights id is `weights`: the next round's parent."""
        self.store.keep_perplexity(monitor_key(weights, reading[0]), reading[1])


@cache
def _monitor_conversations() -> tuple:
    from shared.alignment_data import drift_monitor_conversations

    return tuple(drift_monitor_conversations())


def monitor_key(weights: str, dtype) -> str:
    """The key of the drift monitor's perplexity under the weights with id `weights` in `dtype`."""
    from shared.evaluation import perplexity_key

    return perplexity_key(weights, list(_monitor_conversations()), str(dtype))


class DriftBudget:
    """Forgetting as a training budget: the perplexity of the drift monitor (medical reference answers
    apart from the gate's guard set: `drift_monitor_conversations`) under the version the adapter would make,
    against the lower of the parent's (the adapter at zero) and the reference's when that is another
    version (the lineage's root by default): the gate guards against both, so a second round spends
    what the first left of the budget (an operator can give first rounds a smaller one: `first_round_max_drift`). A
    check within the budget keeps a copy of the adapter; more than `drift_patience` checks past it in a
    row, or one at the last step, stop the run and restore the last kept copy (step 0, the parent itself,
    when no check was within it: the runner then rejects the run without merging or gating it). Why the
    patience: a second round, anchored to the root, can jump at its first check and come back (run 98's,
    retrained without a budget at lr 1e-4: +4.70%, then +4.01% to +4.23% to step 20), where another
    climbed on (+6.6% at step 4, +6.7 to +7.3% to step 28). The gate's
    guard then measures its own set, which no stopping decision saw. Why: with a fixed step count,
    fresh draws of the same recipe either broke the 5% guard (+5.3% to +14% medical at 28 steps) or
    fell short of the safety goal at 20 (docs/alignment-log.md, "Over draws")."""

    def __init__(self, model, tokenizer, max_drift: float, load_reference=None, load_parent=None, *,
                 readings: MonitorReadings | None = None, dtype: torch.dtype | None = None) -> None:
        """`load_parent()` returns the parent as the registry keeps it (fp32 on a CPU): the served version is
        its weights + the adapter's delta, rounded once to the serving dtype. Without it the frozen weights
        stand in (exact where they are the stored ones). `readings`: the parent's and the reference's
        perplexities where they were measured before. `dtype`: the serving dtype, where the frozen weights'
        is not it (QLoRA's are 4-bit)."""
        self.model, self.tokenizer, self.max_drift = model, tokenizer, max_drift
        self.conversations = list(_monitor_conversations())
        self.dtype = dtype or next(model.parameters()).dtype
        self.readings = readings
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        # on the policy's device: the adapter's deltas are added to the stored weights there
        self.scratch = (load_parent() if load_parent else plain_copy(model.get_base_model())).to(
            next(model.parameters()).device)
        stored = self.scratch.state_dict()
        self.parent_weights = [(layer, self.scratch.get_submodule(name), stored[name + ".weight"].float())
                               for name, layer in ((n.removeprefix("base_model.model."), m)
                                                   for n, m in model.named_modules() if isinstance(m, LoraLayer))]
        del stored
        for p in self.scratch.parameters():  # the parent as served (the fp32 weights stay above); buffers as loaded:
            p.data = p.data.to(self.dtype)  # `.to(dtype)` would round the rotary frequencies too, as no engine does
        self.scratch.eval()
        self.start = self.kept_perplexity = self._known("parent", lambda: self.perplexity(self.scratch))
        if load_reference is not None:
            self.start = min(self.start, self._known("reference", lambda: self.perplexity(load_reference().eval())))
        self.kept_step, self.kept = 0, self._copy()

    def _known(self, which: str, measure: Callable[[], float]) -> float:
        if self.readings is None:
            return measure()
        return self.readings.known(getattr(self.readings, which), self.dtype, measure)

    def perplexity(self, model) -> float:
        """The monitor's perplexity under `model` in its weights' own dtype, as the gate's engine computes
        it (no autocast)."""
        from shared.evaluation import perplexity

        return perplexity(SimpleNamespace(model=model, tokenizer=self.tokenizer), self.conversations)

    def check(self, step: int) -> float:
        """The monitor's change against the start, measured on the model as it would be served; within the
        budget, the adapter is kept."""
        value = self.perplexity(self.served())
        change = value / self.start - 1
        if change <= self.max_drift:
            self.kept_step, self.kept, self.kept_perplexity = step, self._copy(), value
        return change

    @torch.no_grad()
    def served(self):
        """The version the adapter would make, as `merge_adapter` makes it and the gate's engine loads it: a
        plain copy of the parent whose adapted weights are the parent's stored ones + the adapter's delta in
        fp32, rounded to the frozen weights' dtype (the engine's). The policy is left as it is, and the copy
        runs without peft's wrappers: a check took 6.2 s where the policy with its adapters off took 8.2-8.7
        (SmolLM2, 2 cores). Why as served: measured over the bf16 base with the adapter under autocast, how
        the loop trains, run 66's round 1 kept step 16 at +3.40% on the monitor, and the version it made read
        +4.10% as served (+4.32% in fp32): a budget of 4% let a round end near the gate's 5% guard. From the
        frozen bf16 weights instead of the stored ones, the sum is rounded twice, and a test's adapter read
        5.60% where its version reads 5.42%."""
        for layer, target, parent in self.parent_weights:
            delta = sum(fp32_delta(layer, name) for name in layer.active_adapters)
            target.weight.data = (parent + delta).to(target.weight.dtype)
        return self.scratch

    def restore(self) -> int:
        with torch.no_grad():
            for p, saved in zip(self.trainable, self.kept):
                p.copy_(saved)
        return self.kept_step

    def _copy(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.trainable]


class BudgetCallback(TrainerCallback):
    """The drift budget in TRL's DPOTrainer (QLoRA), by the loop's rule (lean_dpo.train_lora_dpo): a check every
    `check_steps` steps and at the last; more than `patience` checks past the budget in a row, or one at the
    last step, stop training and restore the adapter of the last check within it. `make_budget(model)`
    builds the DriftBudget when training begins (TRL wraps the policy in peft first)."""

    def __init__(self, make_budget: Callable[[object], DriftBudget], max_drift: float, check_steps: int,
                 patience: int) -> None:
        self.make_budget, self.max_drift, self.check_steps, self.patience = make_budget, max_drift, check_steps, patience
        self.budget: DriftBudget | None = None
        self.readings: dict[int, float] = {}
        self.kept_step: int | None = None
        """the step whose adapter training ended with, where the budget stopped it"""
        self._over = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.budget = self.make_budget(model)

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step % self.check_steps and step != state.max_steps:
            return
        drift = self.readings[step] = self.budget.check(step)
        if drift <= self.max_drift:
            self._over = 0
            return
        self._over += 1
        if self._over > self.patience or step == state.max_steps:
            self.kept_step = self.budget.restore()
            control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        # a step's row (not the closing summary, logged at the last step too); callbacks after this one see it
        if logs is not None and "loss" in logs and state.global_step in self.readings:
            logs["drift/perplexity_change"] = round(self.readings[state.global_step], 5)

    def annotate(self, history: list[dict]) -> None:
        """Put each reading on its step's row of TRL's log history (TRL copies a row before callbacks see it)."""
        for row in history:
            if row.get("step") in self.readings:
                row["drift/perplexity_change"] = round(self.readings[row["step"]], 5)


def fp32_delta(layer: LoraLayer, name: str) -> torch.Tensor:
    """Adapter `name`'s change to `layer`'s weight, computed in fp32 as `merge_adapter` computes it (the adapter
    loaded onto the fp32 parent): QLoRA trains its adapters in bf16, where peft's own `get_delta_weight`
    multiplies them in bf16 and a reading missed the merged version's by 2.5e-4."""
    delta = (layer.lora_B[name].weight.float() @ layer.lora_A[name].weight.float()) * layer.scaling[name]
    return delta.T if layer.fan_in_fan_out else delta


def plain_copy(model):
    """`model` (a peft-wrapped transformers model) without its LoRA layers, in its own dtype."""
    from transformers import AutoModelForCausalLM

    copy = AutoModelForCausalLM.from_config(model.config, dtype=next(model.parameters()).dtype)
    copy.load_state_dict({k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if "lora_" not in k})
    return copy


def no_room(history: list[dict], max_drift: float) -> str:
    """Why a run whose drift budget kept no step ends before the gate: its readings."""
    readings = ", ".join(f"step {h['step']} {h['drift/perplexity_change']:+.1%}" for h in history
                         if "drift/perplexity_change" in h)
    return (f"drift budget: no check within {max_drift:.1%} of the monitor's perplexity ({readings}): the parent "
            f"leaves this round no room, so nothing was merged or gated")
