"""glibc malloc settings for the processes that run torch on CPU (generator, gateway, trainer).

glibc serves a large allocation (above a threshold that grows to at most 32 MiB) with its own mmap and
unmaps it on free, and it trims the top of its heap back to the system; a torch step allocates and frees
the same large buffers (logits, activations, KV blocks) every time, so each step faults in fresh zeroed
pages: 25 million minor page faults and 138 s of system time in one SmolLM2 demo on 2 cores. With mmap
off for allocations and the heap kept (`MALLOC_TUNABLES`), measured on SmolLM2 (README, "Memory
allocator"): the gate's 64x2 answers 25.5-26.4 s against 28.2-31.8 s (page faults 3-5x fewer), DPO 10
steps 51.7-58.4 s against 54.8-65.6 s (4x fewer); a process then keeps its high-water memory instead
of returning it (DPO's peak RSS 3.64 GB against 3.41 GB).

glibc reads GLIBC_TUNABLES once, when a process starts, so a launcher sets it for its children
(`prefloop up` / `demo`, the three Dockerfiles), and `prefloop serve` restarts itself with it when it was
started without (`reexec_with_malloc_tunables`). An operator's own GLIBC_TUNABLES, even empty, is kept.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

MALLOC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296:glibc.malloc.top_pad=268435456"
"""no mmap per allocation, never trim the heap below 4 GiB, grow it 256 MiB at a time"""

TUNABLES_VARIABLE = "GLIBC_TUNABLES"
TORCH_SERVICES = ("generator", "gateway", "trainer")
"""the services that run torch (the judge calls an API or scores text)"""


def with_malloc_tunables(env: Mapping[str, str]) -> dict[str, str]:
    """`env` for a child process that runs torch: `MALLOC_TUNABLES` unless `env` sets its own."""
    return {TUNABLES_VARIABLE: MALLOC_TUNABLES, **env}


def reexec_with_malloc_tunables() -> None:
    """Replace this process by itself started with `MALLOC_TUNABLES` (same pid, argv and environment
    otherwise), unless GLIBC_TUNABLES is already set or the C library is not glibc. Call it before any
    work: nothing done so far survives."""
    if TUNABLES_VARIABLE in os.environ or platform.libc_ver()[0] != "glibc":
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], with_malloc_tunables(os.environ))
