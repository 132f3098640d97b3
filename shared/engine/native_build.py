"""The engine's C kernels (attention.c, layer_ops.c, top_probs.c), compiled for this CPU when first needed.

The sources are compiled (`-march=native`) into one shared library in a temporary directory the
first time a CPU decoder asks for a kernel (about 1.4 s on 2 cores, once per process) and linked against the
OpenMP runtime torch has loaded, so their threads are torch's own (a second runtime's team
spinning beside torch's slowed decode steps by 46% before: decoder.py). Where the library cannot
be built (no C compiler, a compiler error), `library()` returns None, the log says why once, and
the decoder keeps torch's ops.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(name) for name in ("attention.c", "layer_ops.c", "top_probs.c"))
COMPILE_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fPIC"]
"""-ffast-math lets the reductions vectorize and expf use glibc's vector math; the objects are
linked without it, so gcc's crtfastmath (which would flush denormals for the whole process) is
never linked in. Its finite-math assumption means a NaN or inf in a broken model's activations gives
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
def library() -> ctypes.CDLL | None:
    """The kernels' library, built once per process; None where it cannot be built."""
    names = ", ".join(source.name for source in SOURCES)
    compiler = shutil.which("gcc") or shutil.which("cc")  # gcc first: clang's OpenMP calls need its own runtime
    if compiler is None:
        log.warning("native kernels: no C compiler (gcc or cc) on PATH; using torch's ops")
        return None
    runtime = _openmp_runtime()
    try:
        built = _build(compiler, runtime)
    except (OSError, subprocess.SubprocessError) as exc:  # OSError: no writable temporary directory, noexec
        detail = getattr(exc, "stderr", "") or exc
        log.warning("native kernels: building or loading %s failed (%s); using torch's ops", names,
                    str(detail).strip()[:500])
        return None
    log.info("native kernels: built %s for this CPU%s", names,
             f", threads from {runtime.name}" if runtime else ", one thread (no OpenMP runtime loaded)")
    return built


def function(name: str, restype, argtypes: list):
    """The kernel `name` with its C signature set, or None where the library cannot be built. Not cached
    beyond `library()`: ctypes keeps one function object per name, and setting its signature again is cheap."""
    built = library()
    if built is None:
        return None
    kernel = getattr(built, name)
    kernel.restype, kernel.argtypes = restype, argtypes
    return kernel


def _build(compiler: str, runtime: Path | None) -> ctypes.CDLL:
    """Compile and load; `-z defs` makes a symbol the runtime lacks an error here, not at load."""
    with tempfile.TemporaryDirectory(prefix="prefloop-kernels-") as build:
        lib = Path(build, "kernels.so")
        openmp = ["-fopenmp"] if runtime else []
        link = [str(runtime), f"-Wl,-rpath,{runtime.parent}"] if runtime else []
        objects = [Path(build, source.with_suffix(".o").name) for source in SOURCES]
        commands = [[compiler, *COMPILE_FLAGS, *openmp, "-c", str(source), "-o", str(obj)]
                    for source, obj in zip(SOURCES, objects)]
        commands.append([compiler, "-shared", "-Wl,-z,defs", *map(str, objects), "-o", str(lib), *link, "-lm"])
        for command in commands:
            subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)
        return ctypes.CDLL(str(lib))  # stays mapped after the directory is removed
