"""attention.c, built here by the real compiler: decode attention read in place from a slot KV cache
equals softmax(q K^T * scale) V computed in float64 over each row's own positions, in both dtypes,
at the head sizes it specialises and one it does not; where it cannot be built, the engine keeps
torch's ops and the log says why."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from shared.engine import native_attention


def reference(q, keys, values, lengths, kv_heads, scale):
    """float64 attention per (row, kv head) over that row's first `lengths[row]` positions."""
    rows, heads, d = q.shape
    group = heads // kv_heads
    out = torch.empty(rows, heads, d, dtype=torch.float64)
    for r in range(rows):
        for h in range(kv_heads):
            slot, n = r * kv_heads + h, int(lengths[r])
            k, v = keys[slot, :n].double(), values[slot, :n].double()
            qs = q[r, h * group:(h + 1) * group].double()
            out[r, h * group:(h + 1) * group] = torch.softmax(qs @ k.T * scale, -1) @ v
    return out.reshape(rows, heads * d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("kv_heads", "group", "head_dim"), [(3, 3, 64), (2, 4, 128), (4, 1, 48)],
                         ids=["smollm2-like", "llama3-like", "generic-width"])
def test_kernel_equals_float64_attention_over_each_rows_own_positions(dtype, kv_heads, group, head_dim):
    attention = native_attention.decode_attention(dtype, torch.device("cpu"), kv_heads, group, head_dim,
                                                  head_dim ** -0.5)
    assert attention is not None  # this machine has a C compiler
    rows, capacity = 5, 96
    g = torch.Generator().manual_seed(head_dim)
    lengths = torch.tensor([1, 7, 96, 40, 63], dtype=torch.int64)
    keys = torch.randn(rows * kv_heads, capacity, head_dim, generator=g).to(dtype)
    values = torch.randn(rows * kv_heads, capacity, head_dim, generator=g).to(dtype)
    for slot in range(rows * kv_heads):  # past a row's length: never read (NaN would spread)
        keys[slot, int(lengths[slot // kv_heads]):] = float("nan")
        values[slot, int(lengths[slot // kv_heads]):] = float("nan")
    # q as the decoder has it: the rotated q/k block's first heads, so rows are strided
    qk = torch.randn(rows, kv_heads * group + kv_heads, head_dim, generator=g).to(dtype)
    q = qk[:, :kv_heads * group]
    got = attention(q, keys, values, lengths)
    assert got is not None and got.dtype == dtype and got.shape == (rows, kv_heads * group * head_dim)
    want = reference(q, keys, values, lengths, kv_heads, head_dim ** -0.5)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output's own rounding (8 bits)
    assert torch.allclose(got.double(), want, atol=tolerance, rtol=tolerance)
    assert torch.isfinite(got).all()


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
    attention = native_attention.decode_attention(torch.float32, cpu, 1, 1, 8, 0.5)
    q, cache = torch.randn(2, 1, 8), torch.randn(2, 16, 8)
    assert attention(q, cache, cache, torch.tensor([3, 17])) is None  # a length past the cache
    assert attention(q, cache, cache, torch.tensor([3, 4], dtype=torch.int32)) is None


@pytest.fixture
def fresh_build(monkeypatch):
    native_attention._library.cache_clear()
    yield
    native_attention._library.cache_clear()


def test_no_compiler_means_torchs_ops_and_a_warning(fresh_build, monkeypatch, caplog):
    monkeypatch.setattr(native_attention.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger=native_attention.__name__):
        assert native_attention.decode_attention(torch.bfloat16, torch.device("cpu"), 3, 3, 64, 0.125) is None
    assert "no C compiler" in caplog.text


def test_a_compile_error_means_torchs_ops_and_the_compilers_message(fresh_build, monkeypatch, tmp_path, caplog):
    broken = tmp_path / "attention.c"
    broken.write_text("int prefloop_decode_attention(void) { return undeclared_name; }\n")
    monkeypatch.setattr(native_attention, "SOURCE", broken)
    with caplog.at_level(logging.WARNING, logger=native_attention.__name__):
        assert native_attention.decode_attention(torch.bfloat16, torch.device("cpu"), 3, 3, 64, 0.125) is None
    assert "building attention.c failed" in caplog.text and "undeclared_name" in caplog.text
