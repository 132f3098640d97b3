"""Per-row sampling for a batch whose rows have different settings: temperature, top-k, top-p
and an optional seed each, applied together to the logits of one decode step.

Top-p needs the probabilities in descending order. Sorting the whole vocabulary (49k for
SmolLM2) for every row and step is the expensive part, so rows look at their `CANDIDATES` most
likely tokens first; a row whose nucleus does not fit in them (a flat distribution) is sorted in
full. Rows with neither top-k nor top-p sample from the whole softmax. All of it is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CANDIDATES = 1024


@dataclass(frozen=True)
class RowSampling:
    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    generator: torch.Generator | None = None
    """a seeded request's own generator (one per sampled sequence); None: the engine's"""


def _truncate(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted probabilities with everything outside top-k / the nucleus zeroed, and their token ids."""
    k = min(probs.shape[-1], CANDIDATES)
    values, ids = probs.topk(k, dim=-1)
    fits = (values.sum(-1) >= top_p) | (top_k.clamp(min=0).le(k) & top_k.gt(0))
    if not bool(fits.all()):
        full_values, full_ids = probs.sort(dim=-1, descending=True)
        values = torch.where(fits[:, None], torch.nn.functional.pad(values, (0, probs.shape[-1] - k)), full_values)
        ids = torch.where(fits[:, None], torch.nn.functional.pad(ids, (0, probs.shape[-1] - k)), full_ids)
    rank = torch.arange(values.shape[-1], device=probs.device)[None]
    keep = torch.ones_like(values, dtype=torch.bool)
    keep &= (top_k[:, None] <= 0) | (rank < top_k[:, None])
    before = values.cumsum(-1) - values  # mass of the more likely tokens
    keep &= before < top_p[:, None]
    keep[:, 0] = True  # the most likely token always stays (top_p may underflow to 0 in float32)
    return values * keep, ids


def sample(logits: torch.Tensor, rows: list[RowSampling], default: torch.Generator | None = None) -> list[int]:
    """One token id per row of `logits` [rows, vocab] (float32)."""
    temperature = torch.tensor([r.temperature for r in rows], device=logits.device)[:, None]
    probs = (logits / temperature).softmax(-1)
    top_k = torch.tensor([r.top_k for r in rows], device=logits.device)
    top_p = torch.tensor([r.top_p for r in rows], device=logits.device)
    truncating = (top_k > 0) | (top_p < 1.0)
    out: list[int] = [0] * len(rows)
    if bool(truncating.any()):
        index = truncating.nonzero()[:, 0]
        values, ids = _truncate(probs[index], top_k[index], top_p[index])
        for j, i in enumerate(index.tolist()):
            pick = torch.multinomial(values[j], 1, generator=rows[i].generator or default)
            out[i] = int(ids[j, pick])
    for i in (~truncating).nonzero()[:, 0].tolist():
        out[i] = int(torch.multinomial(probs[i], 1, generator=rows[i].generator or default))
    return out
