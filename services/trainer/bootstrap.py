"""`prefloop bootstrap`: the first model version, with no download.

Offline default: train a byte-level BPE tokenizer on the shipped text, give it a ChatML
template whose assistant turns are marked with {% generation %} (for assistant-only loss),
build a small Llama from config, run full-weight SFT on the shipped conversations, and
register the result as an `sft` version. Deterministic for a given seed.

`--base smollm2|FILE.gguf|DIR_OR_HUB_NAME`: a real model instead (see `base_models`), registered as
it is or after LoRA SFT (seed 003 defaults).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, set_seed

from services.trainer import base_models
from services.trainer.recipes import TINY_BASE
from services.trainer.sft import SFTJobConfig, logging_steps_for, run_sft
from shared.engine import pick_device_and_dtype
from shared.ids import content_id
from shared.prompts import split_for
from shared.registry import ModelRegistry, ModelSource, VersionMeta

log = logging.getLogger(__name__)
DATA = Path(__file__).resolve().parent / "data" / "sft_conversations.jsonl"
HELDOUT_FRACTION = 0.1
SPECIAL = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|im_start|>assistant\n{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}\n"
    "{% else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class TinyModelSpec:
    vocab_size: int = 2048
    hidden_size: int = 192
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_position_embeddings: int = 512
    sft_steps: int = 120
    sft_batch_size: int = 16
    sft_learning_rate: float = 3e-3
    seed: int = 7


def load_conversations(split: str = "train", path: Path = DATA, quality: str | None = None) -> list[dict]:
    """The shipped SFT conversations ({"messages": [...]}): `train` (about 90%) or `heldout`
    (the rest, never trained on). The split is a deterministic content hash. `quality="good"`
    keeps only the exchanges we want the model to keep doing: the trainer's forgetting-guard
    reference set (perplexity on the deliberately poor ones is meant to rise)."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    wanted = "eval" if split == "heldout" else "train"
    return [{"messages": r["messages"]} for r in rows
            if split_for(content_id("sft", r["messages"]), HELDOUT_FRACTION) == wanted
            and (quality is None or r.get("quality") == quality)]


def build_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    raw = Tokenizer(models.BPE(unk_token=None))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                  pad_token="<|pad|>", unk_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    tok.model_max_length = 512
    return tok


def build_tiny_model(tok: PreTrainedTokenizerFast, spec: TinyModelSpec) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_attention_heads, max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def bootstrap_tiny(registry: ModelRegistry, spec: TinyModelSpec | None = None) -> VersionMeta:
    spec = spec or TinyModelSpec()
    set_seed(spec.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    started = time.monotonic()
    conversations = load_conversations("train")
    texts = [m["content"] for c in conversations + load_conversations("heldout") for m in c["messages"]]
    tok = build_tokenizer(texts, spec.vocab_size)
    model = build_tiny_model(tok, spec)
    config = SFTJobConfig(learning_rate=spec.sft_learning_rate, max_steps=spec.sft_steps,
                          per_device_train_batch_size=spec.sft_batch_size, gradient_accumulation_steps=1,
                          warmup_ratio=0.05, weight_decay=0.0, max_length=spec.max_position_embeddings,
                          seed=spec.seed, logging_steps=logging_steps_for(spec.sft_steps), lora=None)
    with tempfile.TemporaryDirectory() as tmp:
        result = run_sft(model, tok, conversations, config, Path(tmp))
    result.model.generation_config.eos_token_id = tok.eos_token_id
    meta = registry.save(result.model, tok, kind="sft", base_model=TINY_BASE,
                         source=ModelSource(kind="tiny", name=TINY_BASE, license="prefloop (built offline)"),
                         training_config={"spec": spec.__dict__, "sft": result.config},
                         snapshot_id=f"shipped:{DATA.name}",
                         metrics={"sft_losses": result.losses, "sft_steps": result.steps,
                                  "params": sum(p.numel() for p in result.model.parameters()),
                                  "seconds": round(time.monotonic() - started, 1)})
    registry.promote(meta.version)
    log.info("bootstrapped %s in %.1fs (loss %.3f -> %.3f)", meta.version, time.monotonic() - started,
             result.losses[0], result.losses[-1])
    return meta


def bootstrap_base(registry: ModelRegistry, spec: str, sft: Literal["auto", "none", "lora"] = "auto",
                   config: SFTJobConfig | None = None) -> VersionMeta:
    """Register a real model: a preset (`smollm2`), a GGUF file, or an HF directory / hub name.

    `sft="none"` registers it as it is (kind `base`): the default for instruction-tuned presets.
    `sft="lora"` runs LoRA SFT (seed 003 defaults) on the shipped conversations first (kind `sft`):
    the default for anything not known to be instruction-tuned."""
    started = time.monotonic()
    source, location = base_models.resolve(spec)
    mode = sft if sft != "auto" else ("none" if source.instruct else "lora")
    device, dtype = pick_device_and_dtype()
    model, tok = base_models.load(location, dtype)
    if not tok.chat_template:
        tok.chat_template = CHAT_TEMPLATE
    metrics: dict = {"params": sum(p.numel() for p in model.parameters())}
    training_config: dict = {}
    if mode == "lora":
        model = model.to(device)
        with tempfile.TemporaryDirectory() as tmp:
            result = run_sft(model, tok, load_conversations("train"), config or SFTJobConfig(), Path(tmp))
        model, training_config = result.model, {"sft": result.config, "loss_mask": result.loss_mask}
        metrics.update(sft_losses=result.losses, sft_steps=result.steps)
    metrics["seconds"] = round(time.monotonic() - started, 1)
    meta = registry.save(model, tok, kind="base" if mode == "none" else "sft", base_model=source.name,
                         source=source, training_config=training_config,
                         snapshot_id=f"shipped:{DATA.name}" if mode == "lora" else None, metrics=metrics)
    registry.promote(meta.version)
    log.info("registered %s (%s) from %s in %.1fs", meta.version, meta.kind, source.describe(), metrics["seconds"])
    return meta
