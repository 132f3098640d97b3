"""A decoder layer's residual add + RMS norm and its MLP's silu(gate) * up: layer_ops.c on CPU, else torch's ops.

On SmolLM2 (bf16, 32 rows, 2 cores) torch's ops for these took about 3 ms of a decode step (a norm
is seven ops, each a dispatch and a pass over memory); the fused kernels a tenth of that (the
benchmark log, "Fused layer ops"). Both paths round where the model's modules round, so a bf16 result
differs from the module's only where the norm's sum of squares, added in another order, crosses a
rounding. A norm that is not the Llama family's RMSNorm runs its own module.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from shared.engine import native_build

RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"})
"""norm classes that compute weight * to_dtype(x * rsqrt(mean(x^2) + eps)) in fp32, as layer_ops.c does"""
MAX_HIDDEN = 16384
"""layer_ops.c keeps a row in fp32 on its stack"""


class TorchLayerOps:
    """The modules' own ops (any device, any norm)."""

    def norm(self, module: nn.Module, x: torch.Tensor, add: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(module(x + add), x + add); without `add`, (module(x), x)."""
        if add is not None:
            x = x + add
        return module(x), x

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[rows, 2 * inter] (gate, then up) -> silu(gate) * up."""
        gate, up = gate_up.chunk(2, -1)
        return F.silu(gate) * up


class NativeLayerOps(TorchLayerOps):
    """layer_ops.c for the tensors it takes (contiguous 2-D, fp32 or bf16 on CPU); torch's ops for the rest."""

    def __init__(self, norm, silu_mul) -> None:
        self._norm, self._silu_mul = norm, silu_mul

    def norm(self, module, x, add=None):
        weight = getattr(module, "weight", None)
        if not (type(module).__name__ in RMS_NORMS and _takes(x, 2) and x.shape[1] <= MAX_HIDDEN
                and isinstance(getattr(module, "variance_epsilon", None), (int, float))
                and isinstance(weight, torch.Tensor) and _takes(weight, 1) and weight.dtype == x.dtype
                and weight.shape == x.shape[1:]
                and (add is None or (_takes(add, 2) and add.dtype == x.dtype and add.shape == x.shape))):
            return super().norm(module, x, add)
        out = torch.empty_like(x)
        total = x if add is None else torch.empty_like(x)
        self._norm(x.data_ptr(), None if add is None else add.data_ptr(), None if add is None else total.data_ptr(),
                   weight.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], module.variance_epsilon,
                   int(x.dtype == torch.bfloat16), torch.get_num_threads())
        return out, total

    def silu_mul(self, gate_up):
        if not (_takes(gate_up, 2) and gate_up.shape[1] % 2 == 0):
            return super().silu_mul(gate_up)
        rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
        out = gate_up.new_empty(rows, inter)
        self._silu_mul(gate_up.data_ptr(), out.data_ptr(), rows, inter, int(gate_up.dtype == torch.bfloat16),
                       torch.get_num_threads())
        return out


def _takes(t: torch.Tensor, dims: int) -> bool:
    """What the kernels read and write through raw pointers: contiguous, on CPU, fp32 or bf16, `dims`-D."""
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16) and t.is_contiguous() \
        and t.dim() == dims


def layer_ops(dtype: torch.dtype, device: torch.device, native: bool = True) -> TorchLayerOps:
    """layer_ops.c's for a CPU decoder in fp32 or bf16 where it can be built (and `native`), else torch's."""
    if native and device.type == "cpu" and dtype in (torch.float32, torch.bfloat16):
        pointer, integer = ctypes.c_void_p, ctypes.c_int
        norm = native_build.function("prefloop_add_rms_norm", None,
                                     [pointer] * 5 + [integer] * 2 + [ctypes.c_float] + [integer] * 2)
        silu_mul = native_build.function("prefloop_silu_mul", None, [pointer] * 2 + [integer] * 4)
        if norm is not None and silu_mul is not None:
            return NativeLayerOps(norm, silu_mul)
    return TorchLayerOps()
