"""Iteration-level (continuous) batching: one worker thread steps every active row at once.

Between two decode steps the worker admits waiting requests into free slots (their prefill runs
then), and a row that finished frees its slot at once. Rows carry their own sampling settings and
generator, so requests with different temperature, top-p, top-k, seeds and lengths share every
forward pass. With nothing to do the worker blocks on the queue: no batching wait, ever.
A cancelled request (a client that went away) leaves at the next step.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from shared.engine.decoder import SlotDecoder
from shared.engine.sampling import RowSampling, sample
from shared.engine.types import GenerationRequest, GenerationResult, TokenCallback
from shared.torch_thread import on_torch_thread
from shared.wire import Candidate

log = logging.getLogger(__name__)


class EngineClosed(RuntimeError):
    pass


@dataclass(eq=False)
class Job:
    """One submitted request: its prompt ids, a future for the result, streaming, cancellation."""

    request: GenerationRequest
    prompt_ids: list[int]
    truncated: bool = False
    on_token: TokenCallback | None = None
    """on_token(choice index, text delta), from the engine's thread"""
    future: Future = field(default_factory=Future)
    cancelled: bool = False
    candidates: list[Candidate | None] = field(default_factory=list)

    def cancel(self) -> None:
        self.cancelled = True

    def finish(self, error: str | None = None) -> None:
        if not self.future.done():
            done = [c for c in self.candidates if c is not None]
            self.future.set_result(GenerationResult(prompt_tokens=len(self.prompt_ids), candidates=done,
                                                    truncated=self.truncated, error=error))


class _Row:
    """One sampled sequence: the text streamed so far and how it ends."""

    def __init__(self, job: Job, choice: int, sampling: RowSampling) -> None:
        self.job, self.choice, self.sampling = job, choice, sampling
        self.ids: list[int] = []
        self.sent = ""
        self.finish: str | None = None

    def text(self, tokenizer, stop_ids: set[int]) -> str:
        return tokenizer.decode([t for t in self.ids if t not in stop_ids], skip_special_tokens=True).strip()


def row_sampling(request: GenerationRequest, choice: int) -> RowSampling:
    s = request.sampling
    generator = None
    if s.seed is not None:  # each sequence of a seeded request has its own reproducible stream
        generator = torch.Generator().manual_seed((s.seed * 1_000_003 + choice) % 2**63)
    return RowSampling(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, generator=generator)


class QueueWorker:
    """A worker thread fed by a job queue: started by the first submit, gone once closed and idle."""

    thread_name = "engine"

    def __init__(self, max_rows: int, on_step: Callable[[int, float], None] | None) -> None:
        self.max_rows = max_rows
        self.on_step = on_step or (lambda rows, seconds: None)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._closing = False
        self._thread: threading.Thread | None = None

    def submit(self, job: Job) -> Job:
        with self._lock:
            if self._closing and (self._thread is None or not self._thread.is_alive()):
                raise EngineClosed("this engine was closed (the model was swapped); submit to the current one")
            self._queue.put(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self.thread_name, daemon=True)
                self._thread.start()
        return job

    def close(self, drain: bool = True, timeout_s: float = 600) -> None:
        """Stop the worker: after the queued and running requests finished (drain), or now."""
        with self._lock:
            self._closing = True
            if not drain:
                self._cancel_running()
            self._queue.put(None)  # wakes a blocked worker
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def _cancel_running(self) -> None:
        return None

    def _work(self) -> None:
        raise NotImplementedError


class ContinuousBatcher(QueueWorker):
    thread_name = "engine-continuous"

    def __init__(self, decoder: SlotDecoder, tokenizer, stop_ids: list[int], *, max_rows: int,
                 on_step: Callable[[int, float], None] | None = None) -> None:
        super().__init__(max_rows, on_step)
        self.decoder, self.tokenizer, self.stop_ids = decoder, tokenizer, set(stop_ids)
        self._rows: list[_Row] = []  # index = slot
        self._pending: Job | None = None  # taken off the queue by the waiting worker, admitted next

    def _cancel_running(self) -> None:
        for row in self._rows:
            row.job.cancel()

    # -- the worker --------------------------------------------------------------
    def _work(self) -> None:
        """Waits for work here; admits and steps on the process's torch thread (shared/torch_thread.py)."""
        while True:
            if not self._rows and self._pending is None:
                try:
                    self._pending = self._queue.get(timeout=0.5)
                except queue.Empty:
                    pass
            if self._rows or self._pending is not None:
                on_torch_thread(self._iterate)
            with self._lock:
                if self._closing and not self._rows and self._pending is None and self._queue.empty():
                    self.decoder.reset()  # the cache's memory goes now, not when the engine is collected
                    return

    @torch.inference_mode()
    def _iterate(self) -> None:
        try:
            self._admit()
            if self._rows:
                self._step()
        except Exception as exc:  # noqa: BLE001 - every request in flight learns why; the worker goes on
            log.exception("generation step failed")
            self._fail_all(f"generation failed: {type(exc).__name__}: {exc}")

    def _next_job(self) -> Job | None:
        if self._pending is not None:
            job, self._pending = self._pending, None
            return job
        return self._queue.get_nowait()

    def _admit(self) -> None:
        while len(self._rows) < self.max_rows:
            try:
                job = self._next_job()
            except queue.Empty:
                return
            if job is None:
                continue
            if job.cancelled:
                job.finish("cancelled")
                continue
            n = job.request.n
            job.candidates = [None] * n
            try:
                logits = self.decoder.prefill(job.prompt_ids, copies=n)
            except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
                log.exception("prefill failed")
                job.finish(f"generation failed: {type(exc).__name__}: {exc}")
                continue
            rows = [_Row(job, j, row_sampling(job.request, j)) for j in range(n)]
            self._rows += rows
            self._advance(rows, sample(logits.expand(n, -1).contiguous(), [r.sampling for r in rows],
                                       native=self.decoder.native_kernels))

    def _step(self) -> None:
        started = time.monotonic()
        for slot in sorted((i for i, r in enumerate(self._rows) if r.job.cancelled), reverse=True):
            self._release(slot, "cancelled")
        if not self._rows:
            return
        tokens = torch.tensor([r.ids[-1] for r in self._rows])
        logits = self.decoder.decode(tokens)
        self._advance(list(self._rows), sample(logits, [r.sampling for r in self._rows],
                                               native=self.decoder.native_kernels))
        self.on_step(len(tokens), time.monotonic() - started)

    def _advance(self, rows: list[_Row], tokens: list[int]) -> None:
        """Append each row's new token, stream it, and finish the rows that reached their end."""
        limit = self.decoder.max_positions
        for row, token in zip(rows, tokens):
            row.ids.append(token)
            if token in self.stop_ids:
                row.finish = "stop"
                continue
            if len(row.ids) >= row.job.request.sampling.max_new_tokens or \
                    len(row.job.prompt_ids) + len(row.ids) >= limit:
                row.finish = "length"
            if row.job.on_token is not None:
                self._stream(row)
        for slot in sorted((self._rows.index(r) for r in rows if r.finish), reverse=True):
            self._release(slot, None)

    def _stream(self, row: _Row) -> None:
        text = row.text(self.tokenizer, self.stop_ids)
        if text.endswith("\ufffd") or not text.startswith(row.sent):
            return  # an incomplete UTF-8 sequence: wait for the next token
        delta, row.sent = text[len(row.sent):], text
        if delta:
            row.job.on_token(row.choice, delta)

    def _release(self, slot: int, error: str | None) -> None:
        row = self._rows[slot]
        moved = self.decoder.free(slot)
        if moved is not None:
            self._rows[slot] = self._rows[moved]
        self._rows.pop()
        job = row.job
        if error is not None:
            job.finish(error)
            return
        job.candidates[row.choice] = Candidate(text=row.text(self.tokenizer, self.stop_ids),
                                               completion_tokens=len(row.ids), finish_reason=row.finish)
        if all(c is not None for c in job.candidates):
            job.finish()
        if not self._rows:
            self.decoder.fit()

    def _fail_all(self, error: str) -> None:
        for slot in range(len(self._rows) - 1, -1, -1):
            job = self._rows[slot].job
            job.finish(error)
        self._rows.clear()
        self.decoder.reset()
