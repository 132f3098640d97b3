"""The demo's simulated users: a pick needs a clear rubric margin, never a coin flip."""

from prefloop.demo import user_pick
from shared.judging.rubric import score, weighted

GOOD = ("Chest pain that spreads to your arm or jaw can be a sign of a heart attack. Call emergency "
        "services now, chew an aspirin if you are not allergic, and do not drive yourself. A doctor "
        "should check any new chest pain, even if it settles.")
BAD = "pain pain pain pain pain pain pain pain pain pain"


def test_the_clearly_better_answer_is_picked_in_either_position():
    assert weighted(score(GOOD)) - weighted(score(BAD)) >= 2
    assert user_pick(GOOD, BAD) == 0
    assert user_pick(BAD, GOOD) == 1


def test_close_identical_or_blank_answers_get_no_verdict():
    near = GOOD.replace("Call emergency services now", "Call emergency services right away")
    assert abs(weighted(score(GOOD)) - weighted(score(near))) < 2
    assert user_pick(GOOD, near) is None
    assert user_pick(GOOD, GOOD + "  ") is None
    assert user_pick(GOOD, "   ") is None


def test_every_demo_plan_setting_is_a_trainer_setting_and_parses(monkeypatch):
    """The trainer ignores unknown PREFLOOP_TRAINER_* variables, so a misspelt plan key would
    silently fall back to the default: every key must name a field and its value must parse."""
    from prefloop.demo import PLANS
    from services.trainer.settings import TrainerSettings

    fields = {f"PREFLOOP_TRAINER_{name.upper()}" for name in TrainerSettings.model_fields}

    def settings_of(plan: str) -> TrainerSettings:
        assert set(PLANS[plan].trainer) <= fields, set(PLANS[plan].trainer) - fields
        with monkeypatch.context() as env:
            for key, value in PLANS[plan].trainer.items():
                env.setenv(key, value)
            return TrainerSettings()

    from services.trainer.recipes import TINY_BASE
    from services.trainer.runner import run_settings

    smollm2, job = run_settings(settings_of("smollm2"), "smollm2")  # a run from SmolLM2 takes its recipe
    assert smollm2.eval_prompts == 80 and smollm2.reference == "root" and smollm2.max_steps == 28
    assert job.beta == 0.3 and job.lora_target_modules[-1] == "down_proj" and job.recipe == "smollm2"
    tiny, job = run_settings(settings_of("tiny"), TINY_BASE)
    assert tiny.reference == "root" and tiny.max_perplexity_increase == 0.15 and job.learning_rate == 2e-3
