"""glibc malloc settings for the processes that run torch on CPU (generator, gateway, trainer).

glibc serves a large allocation (above a threshold that grows to at most 32 MiB) with its own mmap and
unmaps it on free, and it trims the top of its heap back to the system; a torch step allocates and frees
the same large buffers (logits, activations, KV blocks) every time, so each step faults in fresh zeroed
pages: 25 million minor page faults and 138 s of system time in one SmolLM2 demo on 2 cores. With mmap
off for allocations and the heap kept (`MALLOC_TUNABLES`), measured on SmolLM2 (docs/alignment-log.md, "Memory
allocator"; `scripts/allocator_probe.py`): page faults 3-5x fewer and system time a third, every run;
on the means the gate's 64x2 answers 27.3 s against 29.0 s, DPO 10 steps 54.7 s against 59.6 s, within
the spread of single runs. A process then keeps its high-water memory instead of returning it (DPO's
peak RSS 3.48-3.64 GB against 3.25-3.41 GB). A thread's own arena (the torch thread's) still maps a
request above its 64 MiB heap size, whatever mmap_max says.

glibc reads GLIBC_TUNABLES once, when a process starts, so a launcher sets it for its children
(`prefloop up` / `demo`, the three Dockerfiles), and `prefloop serve` restarts itself with it when it was
started without (`reexec_with_malloc_tunables`). An operator's own GLIBC_TUNABLES, even empty, is kept.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
from collections.abc import Mapping

log = logging.getLogger(__name__)

MALLOC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296:glibc.malloc.top_pad=268435456"
"""no mmap per allocation (main arena), trim the heap only when more than 4 GiB at its top is free, grow
it 256 MiB at a time"""

TUNABLES_VARIABLE = "GLIBC_TUNABLES"
RESTARTED_VARIABLE = "PREFLOOP_MALLOC_RESTARTED"
"""set on the restart, so a process whose GLIBC_TUNABLES the C library dropped (a privileged binary
under a newer glibc) runs on instead of restarting again"""
TORCH_SERVICES = ("generator", "gateway", "trainer")
"""the services that run torch (the judge calls an API or scores text)"""


def with_malloc_tunables(env: Mapping[str, str]) -> dict[str, str]:
    """`env` for a child process that runs torch: `MALLOC_TUNABLES` unless `env` sets its own."""
    return {TUNABLES_VARIABLE: MALLOC_TUNABLES, **env}


def reexec_with_malloc_tunables() -> None:
    """Replace this process by itself started with `MALLOC_TUNABLES` (same pid, argv and environment
    otherwise), unless GLIBC_TUNABLES is already set, this process is that restart, or the C library is
    not glibc. Call it before any work: nothing done so far survives. If the exec fails, it runs on."""
    if TUNABLES_VARIABLE in os.environ or RESTARTED_VARIABLE in os.environ or platform.libc_ver()[0] != "glibc":
        return
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]],
                  {**with_malloc_tunables(os.environ), RESTARTED_VARIABLE: "1"})
    except OSError as exc:
        log.warning("running without the malloc settings: restarting with %s failed: %s", TUNABLES_VARIABLE, exc)


def describe() -> str:
    """What this process runs with, for its start-up log line."""
    return f"{TUNABLES_VARIABLE}={os.environ.get(TUNABLES_VARIABLE, '(unset: glibc defaults)')}"
