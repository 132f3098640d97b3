"""Decode attention read in place from the slot KV cache: attention.c, built when first needed.

Torch's decode attention is a dozen ops a layer: the rotary embedding, two indexed cache writes,
a copy of every layer's keys and values out of the cache before its bmm (oneDNN's bf16 bmm copies
a strided operand), and every row computed over the longest row's positions, masked. SmolLM2 in
bf16, 32 rows at about 190 positions, 2 cores: the 30 layers' attention took 43-45 ms a step that
way and 10-12 ms with this kernel (benchmarks/generation.py measures the engine's decode rate with it).

The kernel is compiled for this CPU (`-march=native`) into a temporary directory when a decoder
first asks for it (about 0.3 s, once per process) and linked against the OpenMP runtime torch
has loaded, so its threads are torch's own (a second runtime's team spinning beside torch's
slowed decode steps by 46% before: decoder.py). Where it cannot be built (no C compiler, a
compiler error), the decoder keeps torch's ops and says why in its log, once.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("attention.c")
MAX_GROUP, MAX_HEAD_DIM = 16, 256
"""attention.c's limits (its per-item buffers)"""
COMPILE_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fPIC"]
"""-ffast-math lets the reductions vectorize and expf use glibc's vector math; the object is
linked without it, so gcc's crtfastmath (which would flush denormals for the whole process) is
never linked in. Its finite-math assumption means a NaN or inf in a broken model's q, k or v gives
meaningless numbers here where torch's ops would give NaN"""


def _openmp_runtime() -> Path | None:
    """The OpenMP runtime this process has loaded (torch's, after `import torch`), if any."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for fields in map(str.split, maps.splitlines()):
        if len(fields) >= 6 and Path(fields[-1]).name.startswith(("libgomp", "libiomp5")):
            return Path(fields[-1])
    return None


@functools.cache
def _library() -> ctypes.CDLL | None:
    compiler = shutil.which("gcc") or shutil.which("cc")  # gcc first: clang's OpenMP calls need its own runtime
    if compiler is None:
        log.warning("decode attention: no C compiler (gcc or cc) on PATH; using torch's ops")
        return None
    runtime = _openmp_runtime()
    try:
        library = _build(compiler, runtime)
    except (OSError, subprocess.SubprocessError) as exc:  # OSError: no writable temporary directory, noexec
        detail = getattr(exc, "stderr", "") or exc
        log.warning("decode attention: building or loading %s failed (%s); using torch's ops", SOURCE.name,
                    str(detail).strip()[:500])
        return None
    function = library.prefloop_decode_attention
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p] + \
        [ctypes.c_int] * 4 + [ctypes.c_float, ctypes.c_int, ctypes.c_int]
    log.info("decode attention: built %s for this CPU%s", SOURCE.name,
             f", threads from {runtime.name}" if runtime else ", one thread (no OpenMP runtime loaded)")
    return library


def _build(compiler: str, runtime: Path | None) -> ctypes.CDLL:
    """Compile and load; `-z defs` makes a symbol the runtime lacks an error here, not at load."""
    with tempfile.TemporaryDirectory(prefix="prefloop-attention-") as build:
        obj, lib = Path(build, "attention.o"), Path(build, "attention.so")
        openmp = ["-fopenmp"] if runtime else []
        link = [str(runtime), f"-Wl,-rpath,{runtime.parent}"] if runtime else []
        for command in ([compiler, *COMPILE_FLAGS, *openmp, "-c", str(SOURCE), "-o", str(obj)],
                        [compiler, "-shared", "-Wl,-z,defs", str(obj), "-o", str(lib), *link, "-lm"]):
            subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)
        return ctypes.CDLL(str(lib))  # stays mapped after the directory is removed


class DecodeAttention:
    """One layer's decode attention for every active row: rotary embedding, the new key and value
    into the cache, softmax(q K^T * scale) V over the row's own positions."""

    def __init__(self, library: ctypes.CDLL, kv_heads: int, group: int, head_dim: int, scale: float) -> None:
        self._run = library.prefloop_decode_attention
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
        log.info("decode attention: %d queries per kv head of %d dims is beyond %s; using torch's ops",
                 group, head_dim, SOURCE.name)
        return None
    library = _library()
    return None if library is None else DecodeAttention(library, kv_heads, group, head_dim, scale)
