"""Per-row sampling for a batch whose rows have different settings: temperature, top-k, top-p
and an optional seed each, applied together to the logits of one decode step.

The order and the semantics are transformers' (and vLLM's): temperature, then top-k, then top-p
on the probabilities renormalized over the top-k tokens. A row with a top-k needs only its k most
likely tokens: a partial top-k of the logits (the smallest of `WINDOWS` that holds k; ranks past
the row's k are masked) and a softmax over those, never the whole vocabulary (49k for SmolLM2).
A row without a top-k needs the full softmax; for its nucleus it looks at its most likely tokens
in the same growing windows, and is sorted in full only when its nucleus fits in none (a flat
distribution). Rows with neither sample from the whole softmax. All of it is exact, with one
difference in ties: transformers keeps every token tied with the k-th logit, here a row keeps exactly k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

WINDOWS = (64, 1024)
"""how many of a row's most likely tokens are looked at first, then next: a partial top-k is
cheap (64 of 49k: about 1.3 ms for 32 rows, 1024: 7.5 ms, a full sort more), and a chat model's
nucleus and a usual top-k are inside the first window"""
CANDIDATES = WINDOWS[-1]


@dataclass(frozen=True)
class RowSampling:
    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    generator: torch.Generator | None = None
    """a seeded request's own generator (one per sampled sequence); None: the engine's"""


def _window(k: int, vocab: int) -> int:
    """The smallest window that holds a row's `k` most likely tokens (0: no top-k, or one as wide as
    the vocabulary, which keeps everything)."""
    if k <= 0 or k >= vocab:
        return 0
    return min(next((w for w in WINDOWS if k <= w), vocab), vocab)


def _nucleus(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Probabilities sorted in descending order with everything outside each row's nucleus zeroed:
    a token stays while the mass of the more likely tokens is below top_p."""
    before = probs.cumsum(-1) - probs
    keep = (before < top_p[:, None]) | (top_p[:, None] >= 1.0)  # float32 sums may pass 1.0: top_p 1 keeps all
    keep[:, 0] = True  # the most likely token always stays (top_p may underflow to 0 in float32)
    return probs * keep


def _candidates(probs: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's most likely tokens, descending, enough of them to hold its nucleus: the smallest
    window that does, else the whole vocabulary sorted. Narrower rows are padded with probability 0."""
    vocab, rows = probs.shape[-1], probs.shape[0]
    values = ids = None
    todo = torch.arange(rows, device=probs.device)
    for window in (*(w for w in WINDOWS if w < vocab), vocab):
        part = probs if len(todo) == rows else probs.index_select(0, todo)
        if window < vocab:
            v, i = part.topk(window, dim=-1)
            fits = v.sum(-1) >= top_p[todo]
        else:
            v, i = part.sort(dim=-1, descending=True)
            fits = torch.ones(len(todo), dtype=torch.bool, device=probs.device)
        if values is None:
            values = probs.new_zeros(rows, window)
            ids = torch.zeros(rows, window, dtype=torch.long, device=probs.device)
        elif window > values.shape[-1]:
            values = torch.nn.functional.pad(values, (0, window - values.shape[-1]))
            ids = torch.nn.functional.pad(ids, (0, window - ids.shape[-1]))
        done = todo[fits]
        values[done, :window], ids[done, :window] = v[fits], i[fits]
        todo = todo[~fits]
        if not len(todo):
            break
    return values, ids


def _draw(weights: torch.Tensor, rows: list[RowSampling], default: torch.Generator | None) -> list[int]:
    """One column per row of `weights` [rows, width] (unnormalized, >= 0), by inverse CDF: a uniform
    draw per row from the row's own generator (rows without one share one batched draw), then one
    batched search. Same distribution as torch.multinomial, without a call per row."""
    u = torch.empty(len(rows))
    shared = [j for j, r in enumerate(rows) if r.generator is None]
    if shared:
        u[shared] = torch.rand(len(shared), generator=default)
    for j, r in enumerate(rows):
        if r.generator is not None:
            u[j] = torch.rand(1, generator=r.generator)[0]
    cdf = weights.cumsum(-1)
    target = u.to(weights.device, weights.dtype) * cdf[:, -1]
    picks = torch.searchsorted(cdf, target[:, None], right=True)[:, 0]  # first column whose cdf > target
    return picks.clamp(max=weights.shape[-1] - 1).tolist()


def _pick(ids: torch.Tensor, columns: list[int]) -> list[int]:
    return ids[torch.arange(len(columns), device=ids.device), torch.tensor(columns, device=ids.device)].tolist()


def _sample_group(logits: torch.Tensor, rows: list[RowSampling], window: int,
                  default: torch.Generator | None) -> list[int]:
    """Rows that share a window (0: no top-k), their logits [rows, vocab]."""
    temperature = torch.tensor([r.temperature for r in rows], device=logits.device)[:, None]
    top_p = torch.tensor([r.top_p for r in rows], device=logits.device)
    if window:  # the top-k tokens by logit are the top-k by probability at any temperature
        values, ids = logits.topk(window, dim=-1)
        top_k = torch.tensor([r.top_k for r in rows], device=logits.device)
        beyond = torch.arange(window, device=logits.device)[None] >= top_k[:, None]
        probs = (values / temperature).masked_fill_(beyond, float("-inf")).softmax(-1)  # renormalized over top-k
        return _pick(ids, _draw(_nucleus(probs, top_p), rows, default))
    probs = (logits / temperature).softmax(-1)
    if bool((top_p >= 1.0).all()):
        return _draw(probs, rows, default)
    values, ids = _candidates(probs, top_p)
    return _pick(ids, _draw(_nucleus(values, top_p), rows, default))


def sample(logits: torch.Tensor, rows: list[RowSampling], default: torch.Generator | None = None) -> list[int]:
    """One token id per row of `logits` [rows, vocab] (float32)."""
    vocab = logits.shape[-1]
    groups: dict[tuple[int, bool], list[int]] = {}
    for i, r in enumerate(rows):
        window = _window(r.top_k, vocab)
        groups.setdefault((window, window == 0 and r.top_p < 1.0), []).append(i)
    out: list[int] = [0] * len(rows)
    for (window, _), index in groups.items():
        part = logits if len(index) == len(rows) else logits.index_select(0, torch.tensor(index, device=logits.device))
        for i, token in zip(index, _sample_group(part, [rows[i] for i in index], window, default)):
            out[i] = int(token)
    return out
