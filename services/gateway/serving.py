"""Dynamic batching over the shared engine, and hot swapping of the served model.

Concurrent requests are queued; a worker thread takes up to `max_batch_sequences` (prompts x n)
or whatever arrived within `max_wait_ms` and runs ONE batched generate. Streaming requests get
their tokens through the engine's batch streamer, so they share batches too. The worker reads
the current engine once per batch: a swap never touches a batch in flight.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shared.engine import GenerationEngine, GenerationRequest, GenerationResult
from shared.registry import ModelRegistry
from shared.wire import ChatMessage, SamplingParams

log = logging.getLogger(__name__)


@dataclass
class Job:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future
    deltas: asyncio.Queue | None = None
    version: str = ""
    enqueued: float = field(default_factory=time.monotonic)


class ModelHolder:
    """The served engine; swaps atomically after a background load and a smoke generation."""

    def __init__(self, registry: ModelRegistry, metrics: CollectorRegistry, **engine_kw) -> None:
        self.registry = registry
        self.engine: GenerationEngine | None = None
        self._engine_kw = engine_kw
        self._load_lock = threading.Lock()
        self.swaps = Counter("prefloop_gateway_model_swaps", "successful model swaps", registry=metrics)
        self.failures = Counter("prefloop_gateway_model_load_failures", "failed model loads", registry=metrics)
        self.version_gauge = Gauge("prefloop_gateway_served_version", "served version number", registry=metrics)

    @property
    def version(self) -> str | None:
        return self.engine.version if self.engine else None

    def load(self, version: str | None = None) -> bool:
        """Load `version` (default: the registry's current), smoke-test it, then swap. False keeps the old one."""
        with self._load_lock:
            try:
                engine = GenerationEngine.from_registry(self.registry, version, **self._engine_kw)
                smoke = engine.generate([GenerationRequest([ChatMessage(role="user", content="Hello")],
                                                           SamplingParams(max_new_tokens=4, seed=0))])
                if smoke[0].error or not smoke[0].candidates:
                    raise RuntimeError(f"smoke generation failed: {smoke[0].error}")
            except Exception as exc:  # noqa: BLE001 - a bad version must never replace a good one
                self.failures.inc()
                log.error("could not load model %s: %s; still serving %s", version, exc, self.version)
                return False
            previous, self.engine = self.version, engine  # one reference assignment: atomic
            self.swaps.inc()
            self.version_gauge.set(int(engine.version[1:]) if engine.version[1:].isdigit() else 0)
            log.info("now serving %s (was %s)", engine.version, previous)
            return True


class Batcher:
    def __init__(self, holder: ModelHolder, metrics: CollectorRegistry, max_sequences: int, max_wait_ms: int) -> None:
        self.holder = holder
        self.max_sequences = max_sequences
        self.max_wait_s = max_wait_ms / 1000
        self._queue: queue.Queue[Job] = queue.Queue()
        self._stop = threading.Event()
        self.batch_size = Histogram("prefloop_gateway_batch_sequences", "sequences per generate call",
                                    registry=metrics, buckets=(1, 2, 4, 8, 16, 32, 64))
        self.tokens = Counter("prefloop_gateway_completion_tokens", "completion tokens generated", registry=metrics)
        self.gen_seconds = Histogram("prefloop_gateway_generate_seconds", "time per batched generate",
                                     registry=metrics)
        self._thread = threading.Thread(target=self._work, name="gateway-batcher", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest, stream: bool) -> Job:
        loop = asyncio.get_running_loop()
        job = Job(request, loop, loop.create_future(), asyncio.Queue() if stream else None)
        self._queue.put(job)
        return job

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            jobs, sequences = [first], first.request.n
            deadline = time.monotonic() + self.max_wait_s
            while sequences < self.max_sequences:
                try:
                    job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                jobs.append(job)
                sequences += job.request.n
            self._run(jobs, sequences)

    def _run(self, jobs: list[Job], sequences: int) -> None:
        engine = self.holder.engine  # read once: a swap during this batch does not affect it
        self.batch_size.observe(sequences)
        started = time.monotonic()

        def on_token(i: int, j: int, delta: str) -> None:
            job = jobs[i]
            if job.deltas is not None:
                job.loop.call_soon_threadsafe(job.deltas.put_nowait, (j, delta))

        for job in jobs:
            job.version = engine.version if engine else ""  # fixed before the first token is streamed
        try:
            if engine is None:
                raise RuntimeError("no model loaded")
            results = engine.generate([j.request for j in jobs], on_token=on_token)
        except Exception as exc:  # noqa: BLE001 - every waiting request gets the error
            log.exception("batched generate failed")
            for job in jobs:
                job.loop.call_soon_threadsafe(_settle, job.done, None, exc)
            return
        self.gen_seconds.observe(time.monotonic() - started)
        for job, result in zip(jobs, results):
            self.tokens.inc(sum(c.completion_tokens for c in result.candidates))
            job.loop.call_soon_threadsafe(_settle, job.done, result, None)


def _settle(future: asyncio.Future, result: GenerationResult | None, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
