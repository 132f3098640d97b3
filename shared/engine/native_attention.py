"""Decode attention read in place from the slot KV cache: attention.c (built by native_build.py).

Torch's decode attention is a dozen ops a layer: the rotary embedding, two indexed cache writes,
a copy of every layer's keys and values out of the cache before its bmm (oneDNN's bf16 bmm copies
a strided operand), and every row computed over the longest row's positions, masked. SmolLM2 in
bf16, 32 rows at about 190 positions, 2 cores: the 30 layers' attention took 43-45 ms a step that
way and 10-12 ms with this kernel (benchmarks/generation.py measures the engine's decode rate with it).
"""

from __future__ import annotations

import ctypes
import logging

import torch

from shared.engine import native_build

log = logging.getLogger(__name__)

MAX_GROUP, MAX_HEAD_DIM = 16, 256
"""attention.c's limits (its per-item buffers)"""


SIGNATURE = [ctypes.c_void_p] * 5 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int] * 4 + \
    [ctypes.c_float, ctypes.c_int, ctypes.c_int]
"""prefloop_decode_attention's arguments (attention.c)"""


class DecodeAttention:
    """One layer's decode attention for every active row: rotary embedding, the new key and value
    into the cache, softmax(q K^T * scale) V over the row's own positions."""

    def __init__(self, kernel, kv_heads: int, group: int, head_dim: int, scale: float) -> None:
        self._run = kernel
        self.kv_heads, self.group, self.head_dim, self.scale = kv_heads, group, head_dim, scale

    def __call__(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        """qkv [rows, (heads + 2 kv_heads) * head_dim] (the projections' outputs, not yet rotated), cos and
        sin [rows, ..., head_dim] at each row's position, keys/values one layer's cache [slots * kv_heads,
        capacity, head_dim], positions [rows] (int64: where each row's new key and value go). Returns
        [rows, heads * head_dim], or None, having written nothing, where the kernel does not take these."""
        rows, heads, d = len(qkv), self.kv_heads * self.group, self.head_dim
        if not self._takes(qkv, cos, sin, keys, values, positions):
            return None
        out = torch.empty(rows, heads * d, dtype=qkv.dtype)
        failed = self._run(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), keys.data_ptr(), values.data_ptr(),
                           keys.shape[1], positions.data_ptr(), out.data_ptr(), rows, self.kv_heads, self.group, d,
                           self.scale, int(qkv.dtype == torch.bfloat16), torch.get_num_threads())
        return None if failed else out

    def _takes(self, qkv, cos, sin, keys, values, positions) -> bool:
        """Whether these tensors have the layouts the kernel reads and writes through raw pointers (it
        checks positions against the capacity itself)."""
        rows, d = len(qkv), self.head_dim
        tensors = (qkv, cos, sin, keys, values, positions)
        return (all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)
                and qkv.dtype in (torch.float32, torch.bfloat16)
                and all(t.dtype == qkv.dtype for t in (cos, sin, keys, values)) and positions.dtype == torch.int64
                and qkv.dim() == 2 and qkv.shape[1] == (self.kv_heads * self.group + 2 * self.kv_heads) * d
                and cos.numel() == sin.numel() == rows * d and positions.shape == (rows,)
                and keys.dim() == 3 and keys.shape == values.shape and keys.shape[0] >= rows * self.kv_heads
                and keys.shape[2] == d)


def decode_attention(dtype: torch.dtype, device: torch.device, kv_heads: int, group: int, head_dim: int,
                     scale: float) -> DecodeAttention | None:
    """The kernel for a CPU decoder in fp32 or bf16, or None (elsewhere, or where it cannot be built)."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return None
    if not (1 <= group <= MAX_GROUP and 2 <= head_dim <= MAX_HEAD_DIM and head_dim % 2 == 0):
        log.info("decode attention: %d queries per kv head of %d dims is beyond attention.c; using torch's ops",
                 group, head_dim)
        return None
    kernel = native_build.function("prefloop_decode_attention", ctypes.c_int, SIGNATURE)
    return None if kernel is None else DecodeAttention(kernel, kv_heads, group, head_dim, scale)
