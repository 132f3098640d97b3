"""top_probs.c, built here by the real compiler: the sampler's first window (each row's most likely
tokens and their softmax probabilities) equals torch's, and sampling through it keeps exactly the
tokens of each row's top-k and nucleus, rows whose nucleus is wider than the window included."""

from __future__ import annotations

import torch

from shared.engine.sampling import WINDOWS, RowSampling, _top_probs, sample


def test_the_window_equals_torchs_softmax_and_topk():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 49152, generator=g) * 3
    logits[5, 7] = logits[5, 9] = 40.0  # a tie at the top: the lower id first
    temperature = torch.linspace(0.3, 1.5, 32)
    got = _top_probs(logits, temperature, WINDOWS[0])
    assert got is not None  # this machine has a C compiler
    values, ids = got
    want = (logits / temperature[:, None]).softmax(-1).topk(WINDOWS[0], -1)
    assert torch.allclose(values, want.values, rtol=1e-5, atol=1e-9)
    assert torch.equal(ids[:5], want.indices[:5]) and torch.equal(ids[6:], want.indices[6:])  # no other ties
    assert ids[5, :2].tolist() == [7, 9] and torch.equal(ids[5, 2:], want.indices[5, 2:])
    assert bool((values[:, :-1] >= values[:, 1:]).all())


def test_masked_logits_get_probability_zero_despite_fast_math():
    """-ffast-math assumes no infinities; a logit of -inf (a masked token) must still weigh 0, as in torch."""
    logits = torch.randn(3, 500) * 3
    logits[0, 100:] = float("-inf")
    logits[1, :] = float("-inf")
    logits[1, 7] = 2.0  # one token left
    temperature = torch.tensor([0.7, 1.0, 1.3])
    values, ids = _top_probs(logits, temperature, 64)
    want = (logits / temperature[:, None]).softmax(-1).topk(64, -1)
    assert torch.allclose(values, want.values, rtol=1e-5, atol=1e-9)
    assert ids[1, 0] == 7 and values[1, 0] == 1.0 and not values[1, 1:].any()
    assert torch.equal(ids[0], want.indices[0]) and torch.equal(ids[2], want.indices[2])


def test_what_it_does_not_take_is_declined():
    logits = torch.randn(4, 500)
    assert _top_probs(logits.double(), torch.ones(4), 64) is None
    assert _top_probs(logits[:, ::2], torch.ones(4), 64) is None  # not contiguous
    assert _top_probs(logits, torch.ones(4), 501) is None  # a window wider than the vocabulary
    assert _top_probs(logits, torch.tensor([1.0, 0.0, 1.0, 1.0]), 64) is None  # a temperature of 0


def test_sampling_through_it_keeps_exactly_each_rows_tokens():
    vocab = 1000
    peaked = torch.full((vocab,), -30.0)
    peaked[[3, 500, 999]] = torch.log(torch.tensor([0.5, 0.3, 0.15]))  # 0.526, 0.316, 0.158; the rest ~1e-13 each
    flat = torch.zeros(vocab)  # its nucleus (top_p 0.9: 900 tokens) is wider than the first window
    logits = torch.stack([peaked, peaked, flat])
    rows = [RowSampling(temperature=1.0, top_k=2), RowSampling(temperature=1.0, top_p=0.85),
            RowSampling(temperature=1.0, top_p=0.9)]
    torch.manual_seed(4)
    seen: list[set[int]] = [set(), set(), set()]
    for _ in range(500):
        for i, token in enumerate(sample(logits, rows, native=True)):
            seen[i].add(token)
    assert seen[0] == {3, 500} and seen[1] == {3, 500, 999}
    assert len(seen[2]) > WINDOWS[0] and max(seen[2]) >= 800  # the flat row went past the window


def test_seeded_draws_are_the_torch_paths_draws():
    """The same probabilities but for their last bits, so the same uniform draws pick the same tokens: the
    demo's sampling, a low temperature, and rows whose nucleus is wider than the window (torch's windows
    after the native one) in the same batch."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 49152, generator=g) * 4
    logits[12:] *= 0.1  # flat: a top-p of 0.95 needs thousands of tokens
    settings = [(0.7, 0.9, 50)] * 8 + [(0.05, 0.9, 0)] * 4 + [(1.0, 0.95, 0)] * 4

    def run(native: bool) -> list[list[int]]:
        rows = [RowSampling(temperature=t, top_p=p, top_k=k, generator=torch.Generator().manual_seed(i))
                for i, (t, p, k) in enumerate(settings)]
        return [sample(logits, rows, native=native) for _ in range(25)]

    draws = run(True)
    assert draws == run(False)
    assert max(max(step[12:]) for step in draws) > 0 and len({step[12] for step in draws}) > 20  # flat rows vary
