"""Supervised fine-tuning on conversational data (`messages`), reusable by bootstrap and
the trainer. Defaults follow seed 003's best TinyLlama run (LoRA r=8, alpha=32, dropout
0.05 on all seven projections; lr 4e-5 cosine, warmup 0.05, weight decay 0.01, batch 4 x
grad-accum 2, 3 epochs). With LoRA the adapter is merged into the base after training.

Loss falls on the assistant's answers only, whatever the chat template: a template with
`{% generation %}` markers trains on whole conversations with TRL's assistant-only loss; any
other template (SmolLM2's, Zephyr's, Llama's) trains on prompt/completion rows, one per
assistant turn, with the loss on the completion only. TRL cannot patch most templates with
markers, and it does not need to: the prompt/completion split gives the same mask."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from datasets.utils.logging import disable_progress_bar
from transformers.trainer_callback import PrinterCallback
from trl import SFTConfig, SFTTrainer
from trl.chat_template_utils import has_generation_markers
from trl.trainer import utils as trl_utils

log = logging.getLogger(__name__)
disable_progress_bar()  # services log; they do not draw progress bars
ALL_PROJECTIONS = ["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_TRL_LOGPROB_TILE = getattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", None)


def fit_trl_logprob_tiles(model) -> None:
    """Make TRL's fused LM head tile no wider than the model's vocabulary.

    TRL 1.16 allocates each fused log-prob tile 32768 columns wide whatever the vocabulary, twice a
    step: for the tiny model's 2048 tokens that is 256 MB of fresh pages a call, and its 120 SFT
    steps took 66 s instead of 42 s (same losses: one tile covers the whole vocabulary either way).
    The width is a private module constant read at call time; without it this does nothing."""
    if _TRL_LOGPROB_TILE is not None:
        vocab = model.get_output_embeddings().weight.shape[0]
        trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = min(_TRL_LOGPROB_TILE, vocab)


def logging_steps_for(steps: int) -> int:
    """Log the loss about five times in a short run, every 10 steps in a long one (never 0)."""
    return max(1, min(10, steps // 5))


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(ALL_PROJECTIONS))

    def to_peft(self) -> LoraConfig:
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.target_modules, bias="none", task_type="CAUSAL_LM")


@dataclass
class SFTJobConfig:
    learning_rate: float = 4e-5
    num_train_epochs: float = 3.0
    max_steps: int = -1
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 2
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    lr_scheduler_type: str = "cosine"
    max_length: int = 512
    seed: int = 42
    logging_steps: int = 10
    lora: LoraSettings | None = field(default_factory=LoraSettings)
    """None trains all weights (the tiny bootstrap model); otherwise LoRA, merged afterwards."""


@dataclass
class SFTResult:
    model: torch.nn.Module
    losses: list[float]
    steps: int
    config: dict
    loss_mask: str
    """`assistant_only` (template markers) or `completion_only` (prompt/completion rows)"""


def sft_rows(tokenizer, conversations: list[dict]) -> tuple[list[dict], str]:
    """Training rows for the tokenizer's chat template, and which loss mask they get."""
    if has_generation_markers(tokenizer.chat_template or ""):
        return [{"messages": c["messages"]} for c in conversations], "assistant_only"
    rows = []
    for conversation in conversations:
        messages = conversation["messages"]
        rows += [{"prompt": messages[:i], "completion": [m]} for i, m in enumerate(messages)
                 if m["role"] == "assistant" and i > 0]
    if not rows:
        raise ValueError("no conversation has an assistant turn after a prompt: nothing to train on")
    return rows, "completion_only"


def make_sft_trainer(model, tokenizer, conversations: list[dict], config: SFTJobConfig,
                     output_dir: Path) -> tuple[SFTTrainer, str]:
    rows, mask = sft_rows(tokenizer, conversations)
    fit_trl_logprob_tiles(model)
    cuda = torch.cuda.is_available()
    args = SFTConfig(
        output_dir=str(output_dir),
        learning_rate=config.learning_rate,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        warmup_steps=config.warmup_ratio,  # a float in [0, 1) is a ratio in transformers 5
        weight_decay=config.weight_decay,
        lr_scheduler_type=config.lr_scheduler_type,
        max_length=config.max_length,
        assistant_only_loss=mask == "assistant_only",
        completion_only_loss=mask == "completion_only",
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=config.logging_steps,
        save_strategy="no",
        report_to="none",
        use_cpu=not cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        activation_checkpointing=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=config.lora.to_peft() if config.lora else None)
    trainer.remove_callback(PrinterCallback)  # metrics go to our log/metrics file, not stdout
    return trainer, mask


def run_sft(model, tokenizer, conversations: list[dict], config: SFTJobConfig, output_dir: Path) -> SFTResult:
    trainer, mask = make_sft_trainer(model, tokenizer, conversations, config, output_dir)
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    trained = trainer.model
    if config.lora:
        trained = trained.merge_and_unload()
    if not losses:
        raise RuntimeError(f"SFT logged no loss in {trainer.state.global_step} steps (logging_steps too large?)")
    log.info("SFT done (%s loss): %d steps, loss %.3f -> %.3f", mask, trainer.state.global_step, losses[0], losses[-1])
    return SFTResult(model=trained, losses=losses, steps=trainer.state.global_step, config=asdict(config),
                     loss_mask=mask)
