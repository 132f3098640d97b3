"""Static batching with `model.generate`, for models the slot decoder does not support.

Same interface as `ContinuousBatcher`: waiting requests are grouped by sampling settings (a seeded
request runs alone, so its seed alone decides its samples), sorted by length, left-padded and
generated with `num_return_sequences=n`; a batch runs to its end before the next one starts.
"""

from __future__ import annotations

import logging
import queue
from collections import defaultdict

import torch
from transformers.generation.streamers import BaseStreamer

from shared.engine.scheduler import Job, QueueWorker
from shared.torch_thread import on_torch_thread
from shared.wire import Candidate, SamplingParams

log = logging.getLogger(__name__)


class _BatchStreamer(BaseStreamer):
    """Streams every row of a batched generate: decodes each row incrementally and reports
    text deltas per (job, choice). Rows that reached an end token stay silent."""

    def __init__(self, tokenizer, rows: list[tuple[Job, int]], eos: set[int]) -> None:
        self.tokenizer, self.rows, self.eos = tokenizer, rows, eos
        self.ids: list[list[int]] = [[] for _ in rows]
        self.sent = [""] * len(rows)
        self.done = [False] * len(rows)
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # the first call carries the prompt ids
            self.prompt_seen = True
            return
        for r, token in enumerate(value.reshape(-1).tolist()):
            job, choice = self.rows[r]
            if self.done[r] or job.on_token is None:
                continue
            if token in self.eos:
                self.done[r] = True
                continue
            self.ids[r].append(token)
            text = self.tokenizer.decode(self.ids[r], skip_special_tokens=True).strip()
            if text.endswith("\ufffd") or not text.startswith(self.sent[r]):
                continue  # an incomplete UTF-8 sequence: wait for the next token
            delta, self.sent[r] = text[len(self.sent[r]):], text
            if delta:
                job.on_token(choice, delta)

    def end(self) -> None:
        return None


class StaticBatcher(QueueWorker):
    thread_name = "engine-static"

    def __init__(self, model, tokenizer, stop_ids: list[int], *, max_rows: int, on_step=None) -> None:
        super().__init__(max_rows, on_step)
        self.model, self.tokenizer, self.stop_ids = model, tokenizer, stop_ids
        self.device = next(model.parameters()).device

    def _work(self) -> None:
        while True:
            jobs = self._take()
            groups: dict[tuple, list[Job]] = defaultdict(list)
            for job in jobs:
                seeded = job.request.sampling.seed is not None
                groups[(job.request.sampling, job.request.n, id(job) if seeded else 0)].append(job)
            for (sampling, n, _), members in groups.items():
                members.sort(key=lambda j: len(j.prompt_ids))
                per_batch = max(1, self.max_rows // n)
                for start in range(0, len(members), per_batch):
                    self._run([j for j in members[start:start + per_batch] if not j.cancelled], sampling, n)
            for job in jobs:
                if job.cancelled:
                    job.finish("cancelled")
            with self._lock:
                if self._closing and self._queue.empty():
                    return

    def _take(self) -> list[Job]:
        jobs: list[Job] = []
        while not jobs:
            first = self._queue.get()
            if first is None:
                if self._closing:
                    return []
                continue
            jobs.append(first)
        while sum(j.request.n for j in jobs) < self.max_rows:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                jobs.append(job)
        return jobs

    def _run(self, jobs: list[Job], sampling: SamplingParams, n: int) -> None:
        if not jobs:
            return
        rows = [(job, j) for job in jobs for j in range(n)]
        streamer = _BatchStreamer(self.tokenizer, rows, set(self.stop_ids)) if any(j.on_token for j in jobs) else None
        try:
            outputs = on_torch_thread(self._generate, [j.prompt_ids for j in jobs], sampling, n, streamer)
        except Exception as exc:  # noqa: BLE001 - every waiting request gets the error
            log.exception("batched generate failed")
            for job in jobs:
                job.finish(f"generation failed: {type(exc).__name__}: {exc}")
            return
        for job, candidates in zip(jobs, outputs):
            job.candidates = list(candidates)
            job.finish()

    @torch.inference_mode()
    def _generate(self, prompts: list[list[int]], sampling: SamplingParams, n: int,
                  streamer: BaseStreamer | None) -> list[list[Candidate]]:
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        out = self.model.generate(
            input_ids=input_ids, attention_mask=attention, do_sample=True,
            temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
            max_new_tokens=sampling.max_new_tokens, num_return_sequences=n,
            eos_token_id=self.stop_ids, pad_token_id=pad, streamer=streamer,
        )
        new_tokens = out[:, width:].tolist()
        eos = set(self.stop_ids)
        per_prompt: list[list[Candidate]] = []
        for p in range(len(prompts)):
            cands = []
            for row in new_tokens[p * n:(p + 1) * n]:
                stop_at = next((k for k, t in enumerate(row) if t in eos), None)
                kept = row if stop_at is None else row[:stop_at]
                kept = [t for t in kept if t != pad]
                text = self.tokenizer.decode(kept, skip_special_tokens=True).strip()
                cands.append(Candidate(text=text, completion_tokens=len(kept) + (stop_at is not None),
                                       finish_reason="stop" if stop_at is not None else "length"))
            per_prompt.append(cands)
        return per_prompt
