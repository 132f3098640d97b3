"""One decode step's attention with torch's ops: where attention.c is not built or does not take a
shape (native_attention.py), and on accelerators. Same contract as `native_attention.DecodeAttention`."""

from __future__ import annotations

import torch


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The Llama rotary embedding (`apply_rotary_pos_emb`'s arithmetic) on [..., heads, head_dim]."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def rotated(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int, head_dim: int):
    """q [..., heads, d], k and v [..., kv_heads, d] from the projections' outputs side by side, rotary
    applied (q and k in one pass)."""
    split = (heads + kv_heads) * head_dim
    qk = rotate(qkv[..., :split].unflatten(-1, (heads + kv_heads, head_dim)), cos, sin)
    v = qkv[..., split:].unflatten(-1, (kv_heads, head_dim))
    return qk[..., :heads, :], qk[..., heads:, :], v


class TorchDecodeAttention:
    """Rotary, the new keys and values written into the cache by index, then every row's scores over
    the longest row's positions (masked past its own), softmax, values: two bmm."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int, scale: float, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.heads, self.kv_heads, self.head_dim, self.scale = heads, kv_heads, head_dim, scale
        self.contiguous_keys = device.type == "cpu" and dtype != torch.float32
        """copy a layer's keys out of the cache before the scores' matmul: on CPU a reduced-precision bmm
        turns a strided, transposed operand into a transposed copy itself, which is slower than copying
        the keys as they lie (bitwise the same scores). SmolLM2 in bf16, 32 rows, 2 cores: 62.5 and 67.7
        ms per decode step against 70.2 and 72.7 without (two runs each). In fp32 the strided bmm
        copies nothing and the copy would only add."""
        self._step: tuple[torch.Tensor, int, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _for_step(self, positions: torch.Tensor):
        """(length, mask, cache rows, cache positions) for these positions: the decoder passes one
        tensor to every layer of a step, so they are computed once a step."""
        if self._step is None or self._step[0] is not positions:
            h, device = self.kv_heads, positions.device
            length = int(positions.max()) + 1
            beyond = torch.arange(length, device=device)[None] > positions[:, None]  # [n, length]
            mask = torch.zeros(len(positions), length, dtype=torch.float32, device=device)
            mask = mask.masked_fill_(beyond, float("-inf")).repeat_interleave(h, 0)[:, None]  # added to the scores
            rows = torch.arange(len(positions), device=device)
            kv_rows = (rows[:, None] * h + torch.arange(h, device=device)[None]).reshape(-1)
            self._step = (positions, length, mask, kv_rows, positions.repeat_interleave(h))
        return self._step[1:]

    def __call__(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        n, h, d = len(qkv), self.kv_heads, self.head_dim
        length, mask, kv_rows, kv_pos = self._for_step(positions)
        q, k, v = rotated(qkv, cos, sin, self.heads, h, d)
        keys[kv_rows, kv_pos], values[kv_rows, kv_pos] = k.reshape(n * h, d), v.reshape(n * h, d)
        keys, values = keys[:n * h, :length], values[:n * h, :length]  # strided views: no copy
        if self.contiguous_keys:
            keys = keys.contiguous()
        scores = torch.bmm(q.reshape(n * h, self.heads // h, d), keys.transpose(1, 2))  # [n * h, group, length]
        weights = scores.float().mul_(self.scale).add_(mask).softmax(-1).to(qkv.dtype)
        return torch.bmm(weights, values).reshape(n, self.heads * d)
