"""Per-row sampling: each row's own temperature, top-k, top-p and generator, exactly; and the
request that asks for rows."""

import pytest
import torch

from shared.engine import GenerationRequest
from shared.engine.sampling import CANDIDATES, WINDOWS, RowSampling, sample
from shared.wire import ChatMessage


def draws(logits: torch.Tensor, row: RowSampling, times: int = 400) -> set[int]:
    return {sample(logits[None], [row])[0] for _ in range(times)}


def test_top_k_and_top_p_keep_exactly_their_tokens():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.1, 0.05, 0.05]))
    torch.manual_seed(0)
    assert draws(logits, RowSampling(temperature=1.0, top_k=2)) == {0, 1}
    assert draws(logits, RowSampling(temperature=1.0, top_p=0.75)) == {0, 1}  # 0.5 + 0.3 reaches 0.75
    assert draws(logits, RowSampling(temperature=1.0, top_p=0.85)) == {0, 1, 2}
    assert draws(logits, RowSampling(temperature=1.0, top_p=1e-300)) == {0}  # underflows to 0 in float32
    assert draws(logits, RowSampling(temperature=1.0)) == {0, 1, 2, 3, 4}


def test_rows_of_one_batch_keep_their_own_settings():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.1]] * 3))
    rows = [RowSampling(temperature=1.0, top_k=1), RowSampling(temperature=1.0, top_p=0.75),
            RowSampling(temperature=50.0)]
    torch.manual_seed(1)
    seen = [set(), set(), set()]
    for _ in range(300):
        for i, token in enumerate(sample(logits, rows)):
            seen[i].add(token)
    assert seen == [{0}, {0, 1}, {0, 1, 2, 3}]


def test_a_nucleus_wider_than_the_candidates_is_sorted_in_full():
    vocab = CANDIDATES * 4
    logits = torch.zeros(vocab)  # flat: the top-CANDIDATES hold a quarter of the mass
    torch.manual_seed(2)
    picks = draws(logits, RowSampling(temperature=1.0, top_p=0.9), 2000)
    assert max(picks) >= CANDIDATES  # tokens beyond the candidate window are reachable
    assert len(picks) > CANDIDATES


def test_a_rows_generator_makes_it_reproducible_whatever_else_is_sampled():
    logits = torch.randn(2, 500)

    def run(other_temperature: float) -> list[int]:
        mine = RowSampling(temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(42))
        other = RowSampling(temperature=other_temperature)
        return [sample(logits, [mine, other])[0] for _ in range(20)]

    assert run(0.5) == run(1.5)


def test_a_top_k_wider_than_the_first_window_keeps_all_its_tokens():
    logits = -torch.arange(5000, dtype=torch.float32) * 1e-3  # nearly flat, strictly descending
    torch.manual_seed(3)
    picks = draws(logits, RowSampling(temperature=1.0, top_k=100), 2000)
    assert max(picks) < 100 and max(picks) >= WINDOWS[0]  # the 100, not the first window's 64


def test_seeded_and_unseeded_rows_drawn_together_follow_their_distributions():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]] * 2))
    rows = [RowSampling(temperature=1.0, generator=torch.Generator().manual_seed(5)), RowSampling(temperature=1.0)]
    torch.manual_seed(4)
    counts = torch.zeros(2, 3)
    for _ in range(3000):
        for i, token in enumerate(sample(logits, rows)):
            counts[i, token] += 1
    assert torch.allclose(counts / 3000, torch.tensor([[0.6, 0.3, 0.1]] * 2), atol=0.04)


def test_a_request_for_no_candidates_is_refused_where_it_is_made():
    """n=0 would prefill, then no row would ever finish the request: its caller would wait forever."""
    with pytest.raises(ValueError, match="n must be at least 1"):
        GenerationRequest([ChatMessage(role="user", content="hi")], n=0)
    assert GenerationRequest([ChatMessage(role="user", content="hi")]).n == 1
