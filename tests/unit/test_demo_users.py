"""The demo's simulated users (a pick needs a clear rubric margin, never a coin flip) and its report."""

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

    # What the demo trained on before the recipes (its plans' PREFLOOP_TRAINER_* at 1d0386e^, the
    # settings of runs 1-9 in docs/alignment-log.md): the demo's plan plus the model's recipe must give
    # exactly that, but for the changes made on purpose since (SmolLM2: 3 epochs, runs 10-11; the gate on 64
    # questions with two answers each and guard sets of 64 + 40 instead of 80 x 1 and 100 + 60, run 20 on;
    # lr 3e-4 instead of 2e-4, run 24 on; the tiny model's length guard 100% instead of 20%, 2026-12-02;
    # SmolLM2's drift budget, 4% from run 58 on, 4.5% measured as served from run 72 on; the schedule's last
    # 5% of learning rate unrun, run 98 on).
    smollm2_before = {
        "PREFLOOP_TRAINER_NUM_TRAIN_EPOCHS": "3", "PREFLOOP_TRAINER_BETA": "0.3", "PREFLOOP_TRAINER_MAX_STEPS": "28",
        "PREFLOOP_TRAINER_REFERENCE": "root", "PREFLOOP_TRAINER_EVAL_PROMPTS": "64", "PREFLOOP_TRAINER_EVAL_SAMPLES": "2",
        "PREFLOOP_TRAINER_MEDICAL_REFERENCE_SIZE": "64", "PREFLOOP_TRAINER_GENERAL_REFERENCE_SIZE": "40",
        "PREFLOOP_TRAINER_LORA_TARGET_MODULES":
            '["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]',
        "PREFLOOP_TRAINER_PER_DEVICE_TRAIN_BATCH_SIZE": "4", "PREFLOOP_TRAINER_GRADIENT_ACCUMULATION_STEPS": "1",
        "PREFLOOP_TRAINER_MAX_LENGTH": "384", "PREFLOOP_TRAINER_EVAL_MAX_NEW_TOKENS": "96",
        "PREFLOOP_TRAINER_LEARNING_RATE": "3e-4",
        "PREFLOOP_TRAINER_MAX_DRIFT": "0.045", "PREFLOOP_TRAINER_SCHEDULE_TAIL": "0.05"}  # now from recipes.RECIPES
    tiny_before = {"PREFLOOP_TRAINER_MAX_PERPLEXITY_INCREASE": "0.15", "PREFLOOP_TRAINER_EVAL_MAX_NEW_TOKENS": "64",
                   "PREFLOOP_TRAINER_LEARNING_RATE": "2e-3", "PREFLOOP_TRAINER_MAX_LENGTH_DRIFT": "1.0"}
    for plan, base, before in (("smollm2", "smollm2", smollm2_before), ("tiny", TINY_BASE, tiny_before)):
        with monkeypatch.context() as env:
            for key, value in before.items():
                env.setenv(key, value)
            expected = TrainerSettings()
        tuned, job = run_settings(settings_of(plan), base)
        assert tuned.model_dump() == expected.model_dump(), plan
        assert job.recipe == base and job.resolved_learning_rate(base) == expected.learning_rate


def test_the_judge_plan_parses_and_an_exported_setting_wins_over_any_plan(monkeypatch, tmp_path):
    """The judge ignores unknown PREFLOOP_JUDGE_* variables too; and a variable the operator exported
    (PREFLOOP_TRAINER_EVAL_SAMPLES=4 prefloop demo) reaches the service instead of the plan's value."""
    from types import SimpleNamespace

    from prefloop.demo import PLANS
    from prefloop.stack import SERVICES, Stack
    from services.judge.settings import JudgeSettings

    fields = {f"PREFLOOP_JUDGE_{name.upper()}" for name in JudgeSettings.model_fields}
    smollm2 = PLANS["smollm2"]
    assert set(smollm2.judge) <= fields and PLANS["tiny"].judge == {}
    monkeypatch.delenv("PREFLOOP_JUDGE_MIN_MARGIN", raising=False)
    monkeypatch.delenv("PREFLOOP_JUDGE_MATCH_FINISH", raising=False)
    monkeypatch.delenv("PREFLOOP_TRAINER_EVAL_SAMPLES", raising=False)
    with monkeypatch.context() as env:
        for key, value in smollm2.env("judge").items():
            env.setenv(key, value)
        assert JudgeSettings().min_margin == 4.0 != JudgeSettings.model_fields["min_margin"].default
        assert JudgeSettings().match_finish and not JudgeSettings.model_fields["match_finish"].default
    # the local stack hands the plan's judge settings to the judge process alone
    stack = Stack(tmp_path, judge_env=smollm2.env("judge"), broker=SimpleNamespace(bootstrap="127.0.0.1:9"),
                  ports=dict.fromkeys(SERVICES, 9))
    assert {name: stack._env(name).get("PREFLOOP_JUDGE_MIN_MARGIN") for name in SERVICES} == {
        "generator": None, "judge": "4", "trainer": None, "gateway": None}
    assert smollm2.env("trainer")["PREFLOOP_TRAINER_EVAL_SAMPLES"] == "2"
    monkeypatch.setenv("PREFLOOP_TRAINER_EVAL_SAMPLES", "4")
    monkeypatch.setenv("PREFLOOP_JUDGE_MIN_MARGIN", "2")
    assert "PREFLOOP_TRAINER_EVAL_SAMPLES" not in smollm2.env("trainer")
    assert smollm2.env("judge") == {"PREFLOOP_JUDGE_MATCH_FINISH": "true"}
    assert smollm2.env("trainer")["PREFLOOP_TRAINER_EVAL_PROMPTS"] == "64"  # the rest of the plan stays


def test_a_demo_seed_draws_every_seeded_sample_afresh_and_seed_0_keeps_the_defaults(monkeypatch):
    """`prefloop demo --seed N`: the candidates' seeds, DPO's seed and the gate's answer seeds all move;
    seed 0 sets nothing, so it repeats the draws of every earlier demo."""
    import hashlib

    from prefloop.demo import draw_env
    from services.generator.sampler import delivery_seed
    from services.generator.settings import GeneratorSettings
    from services.trainer.settings import TrainerSettings

    assert draw_env("GENERATOR", 0) == {} and draw_env("TRAINER", 0) == {}
    with monkeypatch.context() as env:
        for key, value in {**draw_env("GENERATOR", 3), **draw_env("TRAINER", 3)}.items():
            env.setenv(key, value)
        generator, trainer = GeneratorSettings(), TrainerSettings()
    defaults = TrainerSettings()
    assert generator.sampling_seed == 3 and GeneratorSettings().sampling_seed == 0
    assert (trainer.seed, trainer.eval_seed) == (defaults.seed + 3, 3) and defaults.eval_seed == 0
    # salt 0 is the seed every deployment drew before the salt existed (redelivered prompts keep theirs)
    assert delivery_seed("p1", "v0001") == int(hashlib.sha256(b"p1:v0001").hexdigest()[:15], 16)
    salted = {delivery_seed("p1", "v0001", salt) for salt in (0, 1, 2)}
    assert len(salted) == 3 and delivery_seed("p1", "v0001", 2) == delivery_seed("p1", "v0001", 2)


def test_report_says_where_the_drift_budget_stopped_a_run():
    from prefloop.report import _dpo_steps

    # ran its plan: the last logged step is the one kept
    ran = {"dpo_steps": 28, "dpo_history": [{"step": 27}, {"step": 28, "drift/perplexity_change": 0.01}]}
    assert _dpo_steps(ran) == "28"
    # stopped: it logged the check past the budget, then restored the adapter of step 20
    stopped = {"dpo_steps": 20, "dpo_history": [{"step": 20, "drift/perplexity_change": 0.031},
                                                {"step": 24, "drift/perplexity_change": 0.0432}]}
    assert _dpo_steps(stopped) == "20 (stopped at 24: drift +4.3%)"
    assert _dpo_steps({}) is None  # the base and SFT versions trained no DPO
