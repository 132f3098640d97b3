"""Per-row sampling for a batch whose rows have different settings: temperature, top-k, top-p
and an optional seed each, applied together to the logits of one decode step.

Top-p needs the probabilities in descending order. Sorting the whole vocabulary (49k for
SmolLM2) for every row and step is the expensive part, so rows look at their most likely tokens
in growing windows (`WINDOWS`); a row whose nucleus fits in none (a flat distribution) is sorted
in full. Rows with neither top-k nor top-p sample from the whole softmax. All of it is exact.
On CPU the first window comes from top_probs.c: one pass over the logits for the window and one for
the softmax's sum, where torch's way is four passes over [rows, vocab] (divide, softmax, topk).

Top-p is taken over the whole vocabulary's probabilities, also for a row with a top-k. transformers and
vLLM renormalize over the top-k first, which keeps fewer tokens where the top-k hold less than all
the mass. That order was tried on 2026-12-01 (sampling 2.5 instead of 8 ms per 32-row step, decode
rate unchanged within noise); the two `prefloop demo` runs with it missed quality goals that the
four runs before it had all met (docs/alignment-log.md, runs 14-15). Two runs do not show it is worse, but it bought
no measurable speed, so the behaviour the demo was validated with stays.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shared.engine import native_build

WINDOWS = (64, 1024)
"""how many of a row's most likely tokens are looked at first, then next: a partial top-k is
cheap (64 of 49k: 1 ms for 32 rows, 1024: 7.5 ms, a full sort more), and a chat model's nucleus
is usually inside the first window"""
CANDIDATES = WINDOWS[-1]


@dataclass(frozen=True)
class RowSampling:
    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    generator: torch.Generator | None = None
    """a seeded request's own generator (one per sampled sequence); None: the engine's"""


TOP_PROBS_SIGNATURE = [ctypes.c_void_p] * 2 + [ctypes.c_int, ctypes.c_int64, ctypes.c_int] + [ctypes.c_void_p] * 2 + \
    [ctypes.c_int]
"""prefloop_top_probs's arguments (top_probs.c)"""


def _top_probs(logits: torch.Tensor, temperature: torch.Tensor,
               window: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Each row's `window` most likely tokens under softmax(logits / temperature), descending: top_probs.c's,
    or None where it does not run (not fp32 contiguous on CPU, no library)."""
    rows, vocab = logits.shape
    if not (logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.is_contiguous()
            and 0 < window <= vocab):
        return None
    function = native_build.function("prefloop_top_probs", ctypes.c_int, TOP_PROBS_SIGNATURE)
    if function is None:
        return None
    temperature = temperature.to(torch.float32).contiguous()
    values = logits.new_empty(rows, window)
    ids = torch.empty(rows, window, dtype=torch.long)
    failed = function(logits.data_ptr(), temperature.data_ptr(), rows, vocab, window, values.data_ptr(),
                      ids.data_ptr(), torch.get_num_threads())
    return None if failed else (values, ids)


def _candidates(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                native: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's most likely tokens and their probabilities, descending, enough of them to hold its top-k
    and its nucleus: the smallest window that does, else the whole vocabulary sorted. Narrower rows are
    padded with probability 0."""
    first = _top_probs(logits, temperature, WINDOWS[0]) if native and WINDOWS[0] < logits.shape[-1] else None
    if first is None:
        return _windows((logits / temperature[:, None]).softmax(-1), top_k, top_p, WINDOWS)
    values, ids = first
    fits = (values.sum(-1) >= top_p) | (top_k.gt(0) & top_k.le(WINDOWS[0]))
    if bool(fits.all()):
        return values, ids
    rest = (~fits).nonzero()[:, 0]
    probs = (logits.index_select(0, rest) / temperature[rest, None]).softmax(-1)
    wider, wider_ids = _windows(probs, top_k[rest], top_p[rest], WINDOWS[1:])
    values = F.pad(values, (0, wider.shape[-1] - values.shape[-1]))
    ids = F.pad(ids, (0, wider.shape[-1] - ids.shape[-1]))
    values[rest], ids[rest] = wider, wider_ids
    return values, ids


def _windows(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
             windows: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """_candidates from the probabilities: `windows` in turn, then the whole vocabulary sorted."""
    vocab = probs.shape[-1]
    rows = probs.shape[0]
    values = ids = None
    todo = torch.arange(rows, device=probs.device)
    for window in (*(w for w in windows if w < vocab), vocab):
        part = probs if len(todo) == rows else probs.index_select(0, todo)
        if window < vocab:
            v, i = part.topk(window, dim=-1)
            k = top_k[todo]
            fits = (v.sum(-1) >= top_p[todo]) | (k.gt(0) & k.le(window))
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


def _truncate(values: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Sorted probabilities (`_candidates`) with everything outside top-k / the nucleus zeroed."""
    rank = torch.arange(values.shape[-1], device=values.device)[None]
    keep = torch.ones_like(values, dtype=torch.bool)
    keep &= (top_k[:, None] <= 0) | (rank < top_k[:, None])
    before = values.cumsum(-1) - values  # mass of the more likely tokens
    keep &= before < top_p[:, None]
    keep[:, 0] = True  # the most likely token always stays (top_p may underflow to 0 in float32)
    return values * keep


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


def sample(logits: torch.Tensor, rows: list[RowSampling], default: torch.Generator | None = None,
           native: bool = False) -> list[int]:
    """One token id per row of `logits` [rows, vocab] (float32). `native`: top_probs.c where it runs (the
    engine's decoder says whether it uses the C kernels)."""
    temperature = torch.tensor([r.temperature for r in rows], device=logits.device)
    top_k = torch.tensor([r.top_k for r in rows], device=logits.device)
    top_p = torch.tensor([r.top_p for r in rows], device=logits.device)
    truncating = (top_k > 0) | (top_p < 1.0)
    out: list[int] = [0] * len(rows)
    if bool(truncating.all()):
        groups = [(list(range(len(rows))), True)]
    else:
        groups = [(truncating.nonzero()[:, 0].tolist(), True), ((~truncating).nonzero()[:, 0].tolist(), False)]
    for index, truncate in groups:
        if not index:
            continue
        picked = torch.tensor(index, device=logits.device)
        part = logits if len(index) == len(rows) else logits.index_select(0, picked)
        if truncate:
            values, ids = _candidates(part, temperature[picked], top_k[picked], top_p[picked], native)
            columns = _draw(_truncate(values, top_k[picked], top_p[picked]), [rows[i] for i in index], default)
            tokens = ids[torch.arange(len(index), device=ids.device), torch.tensor(columns, device=ids.device)].tolist()
        else:
            tokens = _draw((part / temperature[picked, None]).softmax(-1), [rows[i] for i in index], default)
        for i, token in zip(index, tokens):
            out[i] = int(token)
    return out
