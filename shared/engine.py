"""Generation engine shared by generator, gateway and the trainer's evaluation.

Loads a registry version (or, explicitly, a Hugging Face path) with transformers and
samples N candidates per prompt in batches: prompts are grouped by sampling parameters,
sorted by length (less padding), left-padded, generated with `num_return_sequences=n`,
stopped at the chat template's end token, and stripped of the prompt.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer
from transformers.utils import logging as hf_logging

from shared.registry import ModelRegistry
from shared.wire import Candidate, ChatMessage, SamplingParams

log = logging.getLogger(__name__)
hf_logging.disable_progress_bar()  # services log; they do not draw progress bars


class PromptTooLong(ValueError):
    pass


@dataclass(frozen=True)
class GenerationRequest:
    messages: list[ChatMessage]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    n: int = 1


@dataclass
class GenerationResult:
    prompt_tokens: int
    candidates: list[Candidate]
    truncated: bool = False
    error: str | None = None


TokenCallback = Callable[[int, int, str], None]
"""on_token(request index, choice index, text delta), called from the generating thread."""


class _BatchStreamer(BaseStreamer):
    """Streams every row of a batched generate: decodes each row incrementally and reports
    text deltas per (request, choice). Rows that reached an end token stay silent."""

    def __init__(self, tokenizer, rows: list[tuple[int, int]], eos: set[int], callback: TokenCallback) -> None:
        self.tokenizer, self.rows, self.eos, self.callback = tokenizer, rows, eos, callback
        self.ids: list[list[int]] = [[] for _ in rows]
        self.sent = [""] * len(rows)
        self.done = [False] * len(rows)
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # the first call carries the prompt ids
            self.prompt_seen = True
            return
        for r, token in enumerate(value.reshape(-1).tolist()):
            if self.done[r]:
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
                self.callback(*self.rows[r], delta)

    def end(self) -> None:
        return None


PROBE = "prefloop-end-of-turn-probe"


def end_of_turn_token(tokenizer) -> int | None:
    """The special token the chat template puts right after an assistant message (`<|im_end|>`
    for ChatML, `</s>` for Zephyr, `<|eot_id|>` for Llama 3), found by rendering one."""
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": PROBE}],
                                             tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render this has no usable end marker
        return None
    tail = text[text.rfind(PROBE) + len(PROBE):] if PROBE in text else ""
    ids = tokenizer(tail.lstrip(" "), add_special_tokens=False)["input_ids"] if tail.strip() else []
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return ids[0] if ids and ids[0] in special else None


def stop_token_ids(tokenizer, model) -> list[int]:
    """Every id generation stops at: the generation config's eos (an int or a list), the
    tokenizer's eos, and the template's end-of-turn token."""
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    ids.add(tokenizer.eos_token_id)
    ids.add(end_of_turn_token(tokenizer))
    return sorted(i for i in ids if isinstance(i, int))


def pick_device_and_dtype() -> tuple[torch.device, torch.dtype]:
    """CUDA with bf16 (fp16 where bf16 is unsupported) when present, else CPU fp32."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.device("cpu"), torch.float32


class GenerationEngine:
    def __init__(self, model, tokenizer, version: str, *, max_batch_size: int = 16,
                 overflow: Literal["truncate_left", "reject"] = "truncate_left") -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.version = version
        self.max_batch_size = max_batch_size
        self.overflow = overflow
        self.device = next(model.parameters()).device
        self.context_length = int(getattr(model.config, "max_position_embeddings", 2048))
        self._stop_ids = stop_token_ids(tokenizer, model)
        self._lock = threading.Lock()  # one generate at a time per model

    @classmethod
    def from_registry(cls, registry: ModelRegistry, version: str | None = None, **kw) -> "GenerationEngine":
        version = version or registry.current()
        if version is None:
            raise FileNotFoundError(f"registry {registry.root} has no current version; run `prefloop bootstrap`")
        return cls.from_path(registry.verified_path(version), version=version, **kw)

    @classmethod
    def from_path(cls, path: str | Path, version: str, **kw) -> "GenerationEngine":
        device, dtype = pick_device_and_dtype()
        tok = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True).to(device)
        return cls(model, tok, version, **kw)

    @property
    def eos_ids(self) -> list[int]:
        return self._stop_ids

    def encode_prompt(self, messages: list[ChatMessage], max_new_tokens: int) -> tuple[list[int], bool]:
        ids = self.tokenizer.apply_chat_template([m.model_dump() for m in messages], add_generation_prompt=True,
                                                 tokenize=True, return_dict=False)
        if not isinstance(ids, list) or (ids and isinstance(ids[0], list)):
            ids = list(ids["input_ids"] if isinstance(ids, dict) else ids[0])
        budget = self.context_length - max_new_tokens
        if budget <= 0:
            raise PromptTooLong(f"max_new_tokens {max_new_tokens} leaves no room in a {self.context_length}-token context")
        if len(ids) <= budget:
            return ids, False
        if self.overflow == "reject":
            raise PromptTooLong(f"prompt is {len(ids)} tokens; at most {budget} fit with max_new_tokens={max_new_tokens}")
        return ids[-budget:], True

    def generate(self, requests: list[GenerationRequest], on_token: TokenCallback | None = None
                 ) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(requests)
        groups: dict[tuple, list[tuple[int, list[int], bool]]] = defaultdict(list)
        for i, req in enumerate(requests):
            try:
                ids, truncated = self.encode_prompt(req.messages, req.sampling.max_new_tokens)
            except PromptTooLong as exc:
                results[i] = GenerationResult(prompt_tokens=0, candidates=[], error=str(exc))
                continue
            # A request with a seed runs alone so its seed alone decides its samples.
            key = (req.sampling, req.n, i if req.sampling.seed is not None else -1)
            groups[key].append((i, ids, truncated))
        for (sampling, n, _), items in groups.items():
            items.sort(key=lambda item: len(item[1]))
            per_batch = max(1, self.max_batch_size // n)
            for start in range(0, len(items), per_batch):
                chunk = items[start:start + per_batch]
                rows = [(i, j) for i, _, _ in chunk for j in range(n)]
                streamer = _BatchStreamer(self.tokenizer, rows, set(self.eos_ids), on_token) if on_token else None
                outputs = self._generate_chunk([c[1] for c in chunk], sampling, n, streamer)
                for (i, ids, truncated), cands in zip(chunk, outputs):
                    results[i] = GenerationResult(prompt_tokens=len(ids), candidates=cands, truncated=truncated)
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def _generate_chunk(self, prompts: list[list[int]], sampling: SamplingParams, n: int,
                        streamer: BaseStreamer | None = None) -> list[list[Candidate]]:
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        with self._lock:
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            out = self.model.generate(
                input_ids=input_ids, attention_mask=attention, do_sample=True,
                temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                max_new_tokens=sampling.max_new_tokens, num_return_sequences=n,
                eos_token_id=self.eos_ids, pad_token_id=pad, streamer=streamer,
            )
        new_tokens = out[:, width:].tolist()
        eos = set(self.eos_ids)
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
