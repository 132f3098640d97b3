"""The generation engine shared by generator, gateway and the trainer's evaluation.

Loads a registry version (or, explicitly, a Hugging Face path) for inference, turns chat
messages into prompt ids (stopping rules from the model and its chat template), and runs every
request through one batcher: continuous batching over the slot decoder for Llama-layout models
(`scheduler.py`, `decoder.py`), static batching with `model.generate` for the rest
(`fallback.py`). `submit` returns at once with a job (a future, streaming, cancel); `generate`
runs a list of requests and waits for them.

Inference dtype: bf16 where the hardware computes it natively (CUDA with bf16, CPUs with
AVX512-BF16 or AMX: about 3x the fp32 speed on the 2-core machines here), else fp32. Weights are
stored in the registry at full precision; `PREFLOOP_ENGINE_DTYPE` overrides the choice.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from shared.engine import decoder as slot_decoder
from shared.engine import native_build
from shared.engine.fallback import StaticBatcher
from shared.engine.native_layer_ops import NativeLayerOps
from shared.engine.scheduler import ContinuousBatcher, Job
from shared.engine.types import GenerationRequest, GenerationResult, PromptTooLong, TokenCallback
from shared.registry import ModelRegistry
from shared.torch_thread import on_torch_thread
from shared.wire import ChatMessage

log = logging.getLogger(__name__)
hf_logging.disable_progress_bar()  # services log; they do not draw progress bars

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


def inference_dtype(choice: str = "auto", device: torch.device | None = None) -> torch.dtype:
    """The dtype models run in: `auto` is bf16 where the hardware computes it natively, else fp32."""
    if choice != "auto":
        return getattr(torch, choice)
    device = device or pick_device_and_dtype()[0]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


class GenerationEngine:
    def __init__(self, model, tokenizer, version: str, *, max_batch_size: int = 32,
                 overflow: Literal["truncate_left", "reject"] = "truncate_left", on_step=None,
                 shared_prefix: list[ChatMessage] | None = None, weights_id: str | None = None,
                 native_kernels: bool = True) -> None:
        """`shared_prefix`: None, a prompt reuses the cache of what it shares with the previous prompt
        (one tenant: the generator's prompts come from its own ingest). Messages, only their rendering
        is ever reused (the gateway: its public default system prompt), so no request's time to first
        token tells whether another request began with the same text; [] reuses nothing."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.version = version
        self.weights_id = weights_id
        """a content id of the weights (`from_registry`: of the version's checksums), else None"""
        self.max_batch_size = max_batch_size
        self.overflow = overflow
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.context_length = int(getattr(model.config, "max_position_embeddings", 2048))
        self._stop_ids = stop_token_ids(tokenizer, model)
        self.native_kernels = native_kernels
        """asked for: the C kernels (attention.c, layer_ops.c, top_probs.c) where they can be built (`kernels` says
        what runs)"""
        if slot_decoder.supports(model):
            self.batching = "continuous"
            # built on the torch thread: packing weights elsewhere started a second OpenMP team, and
            # decode steps ran 46% longer (74 vs 51 ms at 32 rows, SmolLM2; shared/torch_thread.py)
            pinned = None if shared_prefix is None else self._pinned_ids(shared_prefix)
            decoder = on_torch_thread(slot_decoder.SlotDecoder, model, max_batch_size, pinned, native_kernels)
            sampler = decoder.native_kernels and self.device.type == "cpu" and native_build.library() is not None
            native = [name for name, used in (("attention.c", decoder.native_attention is not None),
                                              ("layer_ops.c", isinstance(decoder.layer_ops, NativeLayerOps)),
                                              ("top_probs.c", sampler)) if used]
            self.kernels = ", ".join(native) or "torch ops"
            self._batcher = ContinuousBatcher(decoder, tokenizer, self._stop_ids,
                                              max_rows=max_batch_size, on_step=on_step)
        else:
            self.batching = "static"
            self.kernels = "the model's own"
            self._batcher = StaticBatcher(model, tokenizer, self._stop_ids, max_rows=max_batch_size, on_step=on_step)

    @classmethod
    def from_registry(cls, registry: ModelRegistry, version: str | None = None, **kw) -> "GenerationEngine":
        version = version or registry.current()
        if version is None:
            raise FileNotFoundError(f"registry {registry.root} has no current version; run `prefloop bootstrap`")
        return cls.from_path(registry.verified_path(version), version=version,
                             weights_id=registry.weights_id(version), **kw)

    @classmethod
    def from_path(cls, path: str | Path, version: str, dtype: str = "auto", **kw) -> "GenerationEngine":
        device = pick_device_and_dtype()[0]
        tok = AutoTokenizer.from_pretrained(str(path))
        model = on_torch_thread(lambda: AutoModelForCausalLM.from_pretrained(
            str(path), dtype=inference_dtype(dtype, device), use_safetensors=True).to(device))
        return cls(model, tok, version, **kw)

    @property
    def eos_ids(self) -> list[int]:
        return self._stop_ids

    def _render(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
        if not messages:
            return []
        ids = self.tokenizer.apply_chat_template([m.model_dump() for m in messages], tokenize=True,
                                                 add_generation_prompt=add_generation_prompt, return_dict=False)
        if not isinstance(ids, list) or (ids and isinstance(ids[0], list)):
            ids = list(ids["input_ids"] if isinstance(ids, dict) else ids[0])
        return ids

    def _pinned_ids(self, messages: list[ChatMessage]) -> list[int]:
        """The rendering of `messages` where it begins every prompt that starts with them (checked on a
        probe conversation), else [] (reuse nothing) with a warning: a template may refuse a lone
        system message, close it differently or merge tokens across the boundary."""
        probe = [*messages, ChatMessage(role="user", content="probe")]
        try:
            ids, full = self._render(messages, add_generation_prompt=False), self._render(probe)
        except Exception as exc:  # noqa: BLE001 - no reuse is safe; the reason is logged
            log.warning("no shared prefix: the chat template does not render %d message(s) alone: %s", len(messages), exc)
            return []
        if not ids or full[:len(ids)] != ids:
            log.warning("no shared prefix: the template's rendering of %d message(s) alone (%d tokens) does not "
                        "begin a conversation that starts with them", len(messages), len(ids))
            return []
        log.info("prefix reuse pinned to %d tokens (%d message(s))", len(ids), len(messages))
        return ids

    def encode_prompt(self, messages: list[ChatMessage], max_new_tokens: int) -> tuple[list[int], bool]:
        ids = self._render(messages)
        budget = self.context_length - max_new_tokens
        if budget <= 0:
            raise PromptTooLong(f"max_new_tokens {max_new_tokens} leaves no room in a {self.context_length}-token context")
        if len(ids) <= budget:
            return ids, False
        if self.overflow == "reject":
            raise PromptTooLong(f"prompt is {len(ids)} tokens; at most {budget} fit with max_new_tokens={max_new_tokens}")
        return ids[-budget:], True

    def submit(self, request: GenerationRequest, on_token: TokenCallback | None = None) -> Job:
        """Queue one request; the job's future resolves to its GenerationResult. Raises PromptTooLong."""
        ids, truncated = self.encode_prompt(request.messages, request.sampling.max_new_tokens)
        return self._batcher.submit(Job(request, ids, truncated, on_token))

    def generate(self, requests: list[GenerationRequest], on_token=None) -> list[GenerationResult]:
        """Run `requests` together and wait for all. on_token(request index, choice index, delta)."""
        jobs: list[Job | GenerationResult] = []
        for i, request in enumerate(requests):
            callback = (lambda j, delta, i=i: on_token(i, j, delta)) if on_token else None
            try:
                jobs.append(self.submit(request, callback))
            except PromptTooLong as exc:
                jobs.append(GenerationResult(prompt_tokens=0, candidates=[], error=str(exc)))
        return [job if isinstance(job, GenerationResult) else job.future.result() for job in jobs]

    def close(self, drain: bool = True) -> None:
        """Stop the batcher: after what is queued and running finished (drain), or at once."""
        self._batcher.close(drain)

    def __enter__(self) -> "GenerationEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close(drain=False)
