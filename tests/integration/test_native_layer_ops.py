"""layer_ops.c, built here by the real compiler: the fused residual add + RMS norm and silu(gate) * up
compute what the model's own modules compute, rounding where they round, in both dtypes; what it
does not take runs the modules' own ops."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from shared.engine.native_layer_ops import NativeLayerOps, TorchLayerOps, layer_ops

CPU = torch.device("cpu")


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many bf16 steps apart a and b are, elementwise (both bf16, finite)."""
    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)
    return (ordered(a) - ordered(b)).abs()


@pytest.fixture(scope="module")
def native() -> NativeLayerOps:
    ops = layer_ops(torch.bfloat16, CPU)
    assert isinstance(ops, NativeLayerOps)  # this machine has a C compiler
    return ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("rows", "hidden"), [(1, 576), (32, 576), (5, 72)])
@pytest.mark.parametrize("with_residual", [True, False], ids=["add+norm", "norm"])
def test_norm_equals_the_modules_own(native, dtype, rows, hidden, with_residual):
    g = torch.Generator().manual_seed(rows * hidden)
    norm = LlamaRMSNorm(hidden, eps=1e-5).to(dtype)
    norm.weight.data = (torch.randn(hidden, generator=g) * 0.5 + 1).to(dtype)
    x = (torch.randn(rows, hidden, generator=g) * 3).to(dtype)
    add = (torch.randn(rows, hidden, generator=g) * 3).to(dtype) if with_residual else None
    with torch.inference_mode():
        want, want_sum = TorchLayerOps().norm(norm, x, add)
        got, got_sum = native.norm(norm, x, add)
    assert got.dtype == dtype and got.shape == (rows, hidden)
    assert torch.equal(got_sum, want_sum)  # the residual add rounds as torch's
    if dtype == torch.float32:
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    else:  # only the sum of squares' order differs: at most one rounding step, rarely
        apart = ulps_apart(got, want)
        assert int(apart.max()) <= 1 and float((apart > 0).float().mean()) < 0.02


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("rows", "inter"), [(1, 1536), (32, 1536), (3, 40)])
def test_silu_mul_equals_the_modules_own(native, dtype, rows, inter):
    g = torch.Generator().manual_seed(rows + inter)
    gate_up = (torch.randn(rows, 2 * inter, generator=g) * 4).to(dtype)
    with torch.inference_mode():
        want, got = TorchLayerOps().silu_mul(gate_up), native.silu_mul(gate_up)
    assert got.dtype == dtype and got.shape == (rows, inter)
    if dtype == torch.float32:
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    else:  # expf's last bit may differ from torch's exp, which can flip silu's rounding (one step), and the
        apart = ulps_apart(got, want)  # product's after it: at most two steps, rarely
        assert int(apart.max()) <= 2 and float((apart > 0).float().mean()) < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_silu_of_a_very_negative_gate_is_zero_not_nan(native, dtype):
    """exp(-gate) overflows below -88.7; -ffast-math's reciprocal of an infinite divisor would give NaN, and one
    NaN in the MLP spreads through the row's hidden state and its cache."""
    gate = torch.tensor([-1000.0, -120.0, -89.0, -88.0, -50.0, 0.0, 50.0, 120.0])
    gate_up = torch.cat([gate, torch.ones(8)])[None].to(dtype)
    with torch.inference_mode():
        got, want = native.silu_mul(gate_up), TorchLayerOps().silu_mul(gate_up)
    assert torch.isfinite(got).all()
    assert torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-30)


class ScaledNorm(nn.Module):
    """Not the Llama family's RMSNorm (another formula): the kernel must not stand in for it."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.variance_epsilon = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (1 + self.weight) * x / x.abs().mean(-1, keepdim=True)


def test_what_it_does_not_take_runs_the_modules_own_ops(native):
    x, add = torch.randn(4, 16), torch.randn(4, 16)
    with torch.inference_mode():
        other = ScaledNorm(16)
        got, total = native.norm(other, x, add)
        assert torch.equal(got, other(x + add)) and torch.equal(total, x + add)
        llama = LlamaRMSNorm(16)
        for args in ((x.t().contiguous().t(), add),  # not contiguous
                     (x.half(), add.half()),  # a dtype it does not compute
                     (x, add.bfloat16()),  # mixed dtypes
                     (x, add[:1]),  # shapes unlike (torch broadcasts it)
                     (x[0], add[0])):  # not [rows, hidden]
            want = TorchLayerOps().norm(llama.to(args[0].dtype), *args)
            got = native.norm(llama, *args)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        llama.to(torch.bfloat16)
        assert torch.equal(native.norm(llama, x)[0], llama(x))  # weight and input in different dtypes
        odd = torch.randn(3, 7)
        assert torch.equal(native.silu_mul(odd[:, :6].contiguous()), TorchLayerOps().silu_mul(odd[:, :6]))
        with pytest.raises(RuntimeError):  # an odd width is torch's error, not a read past the row
            native.silu_mul(odd)


def test_other_devices_and_dtypes_and_switched_off_keep_torchs_ops():
    assert type(layer_ops(torch.float16, CPU)) is TorchLayerOps
    assert type(layer_ops(torch.bfloat16, torch.device("meta"))) is TorchLayerOps
    assert type(layer_ops(torch.bfloat16, CPU, native=False)) is TorchLayerOps
