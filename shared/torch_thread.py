"""One thread per process runs all heavy torch work (forward passes, sampling, DPO, loading).

Why: torch's CPU kernels use OpenMP (libgomp), which gives every OS thread that enters a parallel
region a team of its own. While a second such thread is alive, even idle, parallel regions on the
first one slow down: measured here on SmolLM2 (2 cores), decode at 32 rows fell from 267-313 to
184-201 tokens/s with an idle second engine thread alive, and to 222 after the calling thread had
run a forward/backward pass. A gateway after a hot swap, the trainer's gate (a DPO run thread plus
two engines) and the benchmarks all had such threads. Routing the work through one thread keeps
a single OpenMP team per process; callers block on the result, and a call made on the torch
thread itself runs inline (no deadlock on nesting)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_queue: queue.SimpleQueue[tuple[Callable, tuple, dict, Future]] = queue.SimpleQueue()
_thread: threading.Thread | None = None


def _serve() -> None:
    while True:
        fn, args, kwargs, future = _queue.get()
        if not future.set_running_or_notify_cancel():
            continue
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - the caller re-raises it
            future.set_exception(exc)


def on_torch_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """Run fn(*args, **kwargs) on the process's torch thread and return (or raise) its result."""
    global _thread
    if threading.current_thread() is _thread:
        return fn(*args, **kwargs)
    with _lock:
        if _thread is None:
            _thread = threading.Thread(target=_serve, name="torch", daemon=True)
            _thread.start()
    future: Future = Future()
    _queue.put((fn, args, kwargs, future))
    return future.result()
