"""The promotion decision without models: the CI rule, safety, both forgetting guards, both length guards."""

import pytest

from services.trainer.gate import Gate
from services.trainer.settings import TrainerSettings
from shared.evaluation import Comparison
from shared.registry import ModelRegistry


def comparison(new: str, old: str, wins: int, losses: int, ties: int = 0, safety=(7.0, 7.0), tokens=(60.0, 60.0)):
    return Comparison(candidate=new, baseline=old, prompts=wins + losses + ties, wins=wins, losses=losses,
                      abstentions=ties, rubric={new: {"safety": safety[0]}, old: {"safety": safety[1]}},
                      mean_tokens={new: tokens[0], old: tokens[1]})


@pytest.fixture
def gate(tmp_path):
    return Gate(TrainerSettings(runs_dir=str(tmp_path / "runs"), general_reference_size=0, medical_reference_size=0),
                ModelRegistry(tmp_path / "registry"), tmp_path / "runs")


def decide(gate, vs_parent, ppl=None, vs_base=None):
    return gate._decide(gate.settings, vs_parent, vs_base or comparison("v2", "v0", 1, 0), ppl or {}, None, [], 10)


def test_promotes_only_when_the_ci_lower_bound_is_above_one_half(gate):
    # 36 of 60 decided is a 0.6 win rate, but its 95% CI starts below 0.5: not enough evidence
    marginal = decide(gate, comparison("v2", "v1", 36, 24))
    assert not marginal.passed and "not above 0.5" in marginal.summary.gate_reasons[0]
    clear = decide(gate, comparison("v2", "v1", 45, 15, ties=4))
    assert clear.passed, clear.summary.gate_reasons
    assert clear.summary.win_rate_vs_parent == 0.75 and clear.summary.win_rate_ci95[0] > 0.5
    assert clear.summary.abstain_rate == round(4 / 64, 4)


def test_a_safety_drop_or_forgetting_or_length_drift_blocks_a_clear_winner(gate):
    winner = dict(wins=45, losses=15)
    less_safe = decide(gate, comparison("v2", "v1", **winner, safety=(6.9, 7.0)))
    assert [r for r in less_safe.summary.gate_reasons if "safety dropped" in r]
    forgot = decide(gate, comparison("v2", "v1", **winner), ppl={"medical": (10.4, 10.0, 10.0), "general": (21.2, 20.0, 20.0)})
    assert not forgot.passed
    assert [r.split(":")[0] for r in forgot.summary.gate_reasons] == ["forgetting guard (general, vs parent)"]
    assert forgot.summary.perplexity_change == 0.04 and forgot.summary.general_perplexity_change == 0.06
    # each round +4% vs its parent, +8% vs the base: the lineage has forgotten more than the guard allows
    drifted = decide(gate, comparison("v3", "v2", **winner), ppl={"medical": (10.8, 10.4, 10.0)})
    assert [r.split(":")[0] for r in drifted.summary.gate_reasons] == ["forgetting guard (medical, vs base)"]
    assert drifted.details["perplexity_vs_base"] == {"medical": 0.08}
    longer = decide(gate, comparison("v2", "v1", **winner, tokens=(80.0, 60.0)))
    assert [r.split(":")[0] for r in longer.summary.gate_reasons] == ["length guard (vs parent)"]
    # each round -12% vs its parent, -23% vs the base: answers have shrunk more than the guard allows
    shorter = decide(gate, comparison("v3", "v2", **winner, tokens=(52.8, 60.0)),
                     vs_base=comparison("v3", "v1", 50, 10, tokens=(52.8, 68.2)))
    assert [r.split(":")[0] for r in shorter.summary.gate_reasons] == ["length guard (vs base)"]
    assert shorter.summary.length_change == -0.12 and "-22.6%" in shorter.summary.gate_reasons[0]
    within = decide(gate, comparison("v3", "v2", **winner, tokens=(52.8, 60.0)),
                    vs_base=comparison("v3", "v1", 50, 10, tokens=(52.8, 62.0)))
    assert within.passed, within.summary.gate_reasons
    silent = decide(gate, comparison("v2", "v1", **winner, tokens=(0.0, 60.0)))
    assert [r.split(":")[0] for r in silent.summary.gate_reasons] == ["length guard (vs parent)"]


def test_a_run_is_gated_by_its_own_settings_its_base_models_recipe_applied(gate):
    """The tiny toy's recipe widens its forgetting guard to 15%: a run from it passes a +10% perplexity
    that the service's 5% (a real model's) blocks."""
    from services.trainer.recipes import TINY_BASE, for_base_model

    winner, ppl = comparison("v2", "v1", wins=45, losses=15), {"medical": (11.0, 10.0, 10.0)}
    assert not gate._decide(gate.settings, winner, comparison("v2", "v0", 1, 0), ppl, None, [], 10).passed
    toy, _ = for_base_model(gate.settings, TINY_BASE)
    assert gate._decide(toy, winner, comparison("v2", "v0", 1, 0), ppl, None, [], 10).passed


def test_the_report_carries_the_comparison_with_the_base(gate):
    result = decide(gate, comparison("v3", "v2", 45, 15), vs_base=comparison("v3", "v1", 50, 10, safety=(7.5, 6.5)))
    s = result.summary
    assert s.base_version == "v1" and s.win_rate_vs_base == round(50 / 60, 4) and s.base_safety_mean == 6.5
    assert s.win_rate_vs_base_ci95[0] > 0.7
    assert result.details["vs_base"] == {"wins": 50, "losses": 10, "abstentions": 0}


def clustered(per_prompt: list[tuple[int, int]], samples: int = 2) -> Comparison:
    wins, losses = sum(w for w, _ in per_prompt), sum(lost for _, lost in per_prompt)
    return Comparison(candidate="v2", baseline="v1", prompts=len(per_prompt), wins=wins, losses=losses,
                      abstentions=samples * len(per_prompt) - wins - losses, samples=samples, per_prompt=per_prompt)


def test_two_answers_per_prompt_count_as_independent_only_as_far_as_they_disagree():
    """Answer k of one version meets answer k of the other. Where a prompt's two comparisons always
    agree, the second answer adds no evidence and the CI is the one-answer CI; where they vary like
    independent draws, the CI narrows as for twice the comparisons."""
    one = Comparison(candidate="v2", baseline="v1", prompts=40, wins=26, losses=14)
    echoed = clustered([(2, 0)] * 26 + [(0, 2)] * 14)
    assert echoed.win_rate == one.win_rate == 0.65 and echoed.design_effect() == pytest.approx(2.0, rel=0.03)
    assert echoed.win_rate_ci95() == pytest.approx(one.win_rate_ci95(), abs=0.005)
    # the same 52 wins to 28 spread over prompts as independent draws would
    mixed = clustered([(2, 0)] * 17 + [(1, 1)] * 18 + [(0, 2)] * 5)
    assert mixed.win_rate == 0.65 and 1.0 <= mixed.design_effect() < 1.1
    assert mixed.win_rate_ci95()[0] > 0.53 and echoed.win_rate_ci95()[0] < 0.5
    # within-prompt disagreement beyond independence never widens the effective count past the comparisons
    assert clustered([(1, 1)] * 40).design_effect() == 1.0
    assert mixed.abstain_rate == 0.0 and clustered([(1, 0), (0, 0)]).abstain_rate == 0.75
    # no spread to estimate (two questions decided, all one way; one question decided): each counts once
    two_questions = clustered([(2, 0), (2, 0)] + [(0, 0)] * 38)
    assert two_questions.design_effect() == 2.0 and two_questions.win_rate_ci95()[0] < 0.35
    one_question = clustered([(14, 2)] + [(0, 0)] * 39, samples=16)
    assert one_question.design_effect() == 16.0 and one_question.win_rate_ci95()[0] < 0.25


def test_the_gate_decides_on_the_clustered_interval(gate):
    """52 wins to 28: promoted when the answers vary within prompts, not when each prompt repeats itself."""
    assert decide(gate, clustered([(2, 0)] * 17 + [(1, 1)] * 18 + [(0, 2)] * 5)).passed
    echoed = decide(gate, clustered([(2, 0)] * 26 + [(0, 2)] * 14))
    assert not echoed.passed and "40 questions x 2 answers" in echoed.summary.gate_reasons[0]
