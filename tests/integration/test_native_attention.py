"""attention.c, built here by the real compiler: decode attention read in place from a slot KV cache
equals softmax(q K^T * scale) V computed in float64 over each row's own positions, in both dtypes,
at the head sizes it specialises and one it does not; where it cannot be built, the engine keeps
torch's ops and the log says why."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from shared.engine import native_attention, native_build, sampling
from shared.engine.native_layer_ops import TorchLayerOps, layer_ops
from shared.engine.torch_attention import rotated


def rotary_tables(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [rows, 1, head_dim] as a Llama rotary embedding makes them (base 10000)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = positions[:, None].double() * inv_freq[None]
    emb = torch.cat((angles, angles), -1)[:, None]
    return emb.cos(), emb.sin()


def reference(qkv, cos, sin, keys, values, positions, kv_heads, group, scale):
    """float64: rotary, the new key and value into a copy of the cache, then attention per (row, kv head)
    over positions 0..positions[row]. Returns the output and the cache as it should be after."""
    rows, d = len(qkv), keys.shape[-1]
    q, k, v = rotated(qkv.double(), cos.double(), sin.double(), kv_heads * group, kv_heads, d)
    keys, values = keys.double().clone(), values.double().clone()
    out = torch.empty(rows, kv_heads * group, d, dtype=torch.float64)
    for r in range(rows):
        p = int(positions[r])
        for h in range(kv_heads):
            slot = r * kv_heads + h
            keys[slot, p], values[slot, p] = k[r, h], v[r, h]
            scores = q[r, h * group:(h + 1) * group] @ keys[slot, :p + 1].T * scale
            out[r, h * group:(h + 1) * group] = torch.softmax(scores, -1) @ values[slot, :p + 1]
    return out.reshape(rows, -1), keys, values


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("kv_heads", "group", "head_dim"), [(3, 3, 64), (2, 4, 128), (4, 1, 48)],
                         ids=["smollm2-like", "llama3-like", "generic-width"])
def test_kernel_equals_float64_attention_over_each_rows_own_positions(dtype, kv_heads, group, head_dim):
    """Each row's new key (rotated) and value land at its position in its own cache slots, nothing
    else in the cache changes, and the output is attention over that row's positions alone: past
    them the cache holds NaN, which any read would spread."""
    scale = head_dim ** -0.5
    attention = native_attention.decode_attention(dtype, torch.device("cpu"), kv_heads, group, head_dim, scale)
    assert attention is not None  # this machine has a C compiler
    rows, capacity = 5, 96
    g = torch.Generator().manual_seed(head_dim)
    positions = torch.tensor([0, 6, 95, 39, 62], dtype=torch.int64)
    keys = torch.randn(rows * kv_heads, capacity, head_dim, generator=g).to(dtype)
    values = torch.randn(rows * kv_heads, capacity, head_dim, generator=g).to(dtype)
    for slot in range(rows * kv_heads):
        keys[slot, int(positions[slot // kv_heads]):] = float("nan")
        values[slot, int(positions[slot // kv_heads]):] = float("nan")
    qkv = torch.randn(rows, (kv_heads * group + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    cos, sin = (t.to(dtype) for t in rotary_tables(positions, head_dim))
    want, want_keys, want_values = reference(qkv, cos, sin, keys, values, positions, kv_heads, group, scale)
    before_keys, before_values = keys.clone(), values.clone()
    got = attention(qkv, cos, sin, keys, values, positions)
    assert got is not None and got.dtype == dtype and got.shape == (rows, kv_heads * group * head_dim)
    assert torch.isfinite(got).all()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the new key's and the output's rounding
    assert torch.allclose(got.double(), want, atol=tolerance, rtol=tolerance)
    written = torch.zeros(rows * kv_heads, capacity, dtype=torch.bool)
    written[torch.arange(rows * kv_heads), positions.repeat_interleave(kv_heads)] = True
    for cache, before, expected in ((keys, before_keys, want_keys), (values, before_values, want_values)):
        assert torch.allclose(cache[written].double(), expected[written], atol=tolerance, rtol=tolerance)
        assert torch.equal(cache[~written].isnan(), before[~written].isnan())
        assert torch.equal(cache[~written].nan_to_num(), before[~written].nan_to_num())


def test_kernel_threads_are_torchs_own_openmp_runtime():
    """A second OpenMP runtime would start a second thread team beside torch's."""
    assert native_attention.decode_attention(torch.bfloat16, torch.device("cpu"), 3, 3, 64, 0.125) is not None
    maps = Path("/proc/self/maps").read_text().splitlines()
    runtimes = {line.split()[-1] for line in maps if Path(line.split()[-1]).name.startswith(("libgomp", "libiomp5"))}
    assert len(runtimes) == 1, runtimes


def test_shapes_it_does_not_take_and_other_devices_keep_torchs_ops():
    cpu = torch.device("cpu")
    assert native_attention.decode_attention(torch.float16, cpu, 3, 3, 64, 0.125) is None
    assert native_attention.decode_attention(torch.bfloat16, torch.device("meta"), 3, 3, 64, 0.125) is None
    assert native_attention.decode_attention(torch.bfloat16, cpu, 1, 32, 64, 0.125) is None  # group > 16
    assert native_attention.decode_attention(torch.bfloat16, cpu, 1, 1, 512, 0.125) is None
    assert native_attention.decode_attention(torch.float32, cpu, 1, 1, 7, 0.5) is None  # an odd head size
    attention = native_attention.decode_attention(torch.float32, cpu, 1, 1, 8, 0.5)
    qkv, cos, cache = torch.randn(2, 24), torch.randn(2, 1, 8), torch.randn(2, 16, 8)
    untouched = cache.clone()
    assert attention(qkv, cos, cos, cache, cache.clone(), torch.tensor([3, 16])) is None  # a position past the cache
    assert attention(qkv, cos, cos, cache, cache.clone(), torch.tensor([3, 4], dtype=torch.int32)) is None
    assert attention(qkv.bfloat16(), cos, cos, cache, cache.clone(), torch.tensor([3, 4])) is None  # mixed dtypes
    half = (qkv.half(), cos.half(), cos.half(), cache.half(), cache.half(), torch.tensor([3, 4]))
    assert attention(*half) is None  # a dtype it does not compute
    assert attention(qkv, cos, cos, cache[:1], cache[:1].clone(), torch.tensor([3, 4])) is None  # fewer slots than rows
    assert attention(qkv, cos, cos, cache, cache[:, :8].clone(), torch.tensor([3, 4])) is None  # values unlike keys
    assert attention(qkv, cos, cos, cache[..., :4].contiguous(), cache[..., :4].contiguous(),
                     torch.tensor([3, 4])) is None  # another head size
    assert attention(qkv.reshape(-1), cos, cos, cache, cache.clone(), torch.arange(48)) is None  # not [rows, width]
    assert attention(qkv, cos, cos, cache[:, ::2], cache[:, ::2], torch.tensor([3, 4])) is None  # not contiguous
    assert torch.equal(cache, untouched)  # nothing written when it declines


@pytest.fixture
def fresh_build(monkeypatch):
    native_build.library.cache_clear()
    yield
    native_build.library.cache_clear()


def test_no_compiler_means_torchs_ops_and_a_warning(fresh_build, monkeypatch, caplog):
    monkeypatch.setattr(native_build.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger=native_build.__name__):
        assert native_attention.decode_attention(torch.bfloat16, torch.device("cpu"), 3, 3, 64, 0.125) is None
        assert type(layer_ops(torch.bfloat16, torch.device("cpu"))) is TorchLayerOps
        assert sampling._top_probs(torch.randn(2, 100), torch.ones(2), 64) is None
    assert "no C compiler" in caplog.text


def test_a_compile_error_means_torchs_ops_and_the_compilers_message(fresh_build, monkeypatch, tmp_path, caplog):
    broken = tmp_path / "layer_ops.c"
    broken.write_text("void prefloop_silu_mul(void) { undeclared_name; }\n")
    monkeypatch.setattr(native_build, "SOURCES", (native_build.SOURCES[0], broken))
    with caplog.at_level(logging.WARNING, logger=native_build.__name__):
        assert native_attention.decode_attention(torch.bfloat16, torch.device("cpu"), 3, 3, 64, 0.125) is None
        assert type(layer_ops(torch.bfloat16, torch.device("cpu"))) is TorchLayerOps
        assert sampling._top_probs(torch.randn(2, 100), torch.ones(2), 64) is None
    assert "building or loading attention.c, layer_ops.c failed" in caplog.text and "undeclared_name" in caplog.text
