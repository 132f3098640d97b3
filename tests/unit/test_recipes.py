"""Trainer settings by base model (services/trainer/recipes.py): a recipe fills what the operator
left unset, never what they set, and a model without one trains on the settings as they are."""

import pytest

from services.trainer.dpo import DPOJobConfig
from services.trainer.recipes import RECIPES, TINY_BASE, for_base_model
from services.trainer.runner import run_settings
from services.trainer.settings import TrainerSettings


@pytest.mark.parametrize("base", sorted(RECIPES))
def test_every_recipe_field_is_a_trainer_setting_and_validates(base):
    assert set(RECIPES[base]) <= set(TrainerSettings.model_fields), set(RECIPES[base]) - set(TrainerSettings.model_fields)
    parsed = TrainerSettings(**RECIPES[base])  # the recipe's values pass the fields' own validation
    assert {k: getattr(parsed, k) for k in RECIPES[base]} == RECIPES[base]


def test_smollm2_trains_on_its_recipe_not_on_seed_001s_llama_settings():
    default = TrainerSettings()
    assert (default.beta, default.learning_rate, default.lora_target_modules) == (0.1, None, ["q_proj", "v_proj"])
    tuned, job = run_settings(default, "smollm2")
    assert (job.beta, job.learning_rate, job.num_train_epochs, job.max_steps) == (0.3, 2e-4, 2.0, 28)
    assert (job.per_device_train_batch_size, job.gradient_accumulation_steps, job.max_length) == (4, 1, 384)
    assert len(job.lora_target_modules) == 7 and job.recipe == "smollm2"
    assert tuned.max_perplexity_increase == 0.05  # the 5% forgetting guard stays for a real model
    assert default.beta == 0.1  # the service's own settings are not changed by a run


def test_a_setting_the_operator_made_wins_over_the_recipe(monkeypatch):
    monkeypatch.setenv("PREFLOOP_TRAINER_BETA", "0.1")  # equal to the field's default: still the operator's choice
    monkeypatch.setenv("PREFLOOP_TRAINER_LORA_TARGET_MODULES", '["q_proj"]')
    tuned, filled = for_base_model(TrainerSettings(max_steps=5), "smollm2")
    assert (tuned.beta, tuned.lora_target_modules, tuned.max_steps) == (0.1, ["q_proj"], 5)
    assert tuned.learning_rate == 2e-4 and {"beta", "lora_target_modules", "max_steps"}.isdisjoint(filled)


@pytest.mark.parametrize("base", [None, "", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "/models/llama3.gguf"])
def test_a_model_without_a_recipe_keeps_the_settings_as_they_are(base):
    settings = TrainerSettings()
    tuned, job = run_settings(settings, base)
    assert tuned is settings and job.recipe is None and job.beta == 0.1 and job.learning_rate is None
    assert job.resolved_learning_rate(base) == 5e-5  # seed 001's


def test_the_tiny_model_moves_at_its_learning_rate_and_gets_its_wider_forgetting_guard():
    tuned, job = run_settings(TrainerSettings(), TINY_BASE)
    assert job.resolved_learning_rate(TINY_BASE) == 2e-3 and tuned.max_perplexity_increase == 0.15
    assert DPOJobConfig().resolved_learning_rate(TINY_BASE) == 2e-3  # a job made directly (benchmarks) too
