"""DPO with LoRA or QLoRA (TRL DPOTrainer + peft + bitsandbytes), then dequantize-then-merge.

Defaults are seed 001's: beta 0.1, lr 5e-5 cosine, warmup 0.03, max_grad_norm 0.3, batch 2 x
grad-accum 2, 1 epoch, LoRA r 16 / alpha 32 / dropout 0.05 on q_proj+v_proj, paged_adamw_8bit
(on CUDA; adamw_torch on CPU, where paged optimizers do not exist). The reference model is
the parent with the adapter disabled, or precomputed reference log-probs when configured; with
`reference="root"` it is the lineage's first version (TRL: loaded beside the policy; prefloop's
loop: loaded only to score pairs missing from the reference cache, then released).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
from datasets.utils.logging import disable_progress_bar
from transformers.trainer_callback import PrinterCallback
from trl import DPOConfig, DPOTrainer

from services.trainer.dpo_schedule import ScheduleTail
from services.trainer.drift_budget import BudgetCallback, DriftBudget, MonitorReadings
from services.trainer.lean_dpo import train_lora_dpo
from services.trainer.recipes import recipe_learning_rate
from services.trainer.reference_cache import ReferenceCache
from services.trainer.sft import fit_trl_logprob_tiles
from shared.engine import inference_dtype, pick_device_and_dtype
from shared.registry import ModelRegistry

log = logging.getLogger(__name__)
disable_progress_bar()  # services log; they do not draw progress bars


@dataclass(frozen=True)
class Reference:
    """The DPO reference model when it is not the run's parent. `weights` is called only when the
    model is loaded: the CPU loop loads it only when the reference cache lacks some pairs, so the
    DPO step verifies the weights' checksums only then (the gate still loads the root to compare)."""
    version: str
    weights: Callable[[], Path]


def choose_reference(registry: ModelRegistry, parent: str, choice: str) -> Reference | None:
    """`choice` "root": the lineage's first version (None when that is the parent); "parent": None."""
    root = registry.lineage(parent)[-1] if choice == "root" else parent
    return Reference(root, lambda: registry.verified_path(root)) if root != parent else None


@dataclass
class DPOJobConfig:
    beta: float = 0.1
    sft_weight: float = 0.0
    """RPO: add this times the chosen answers' per-token NLL to the DPO loss (0: plain DPO)"""
    reference: Literal["parent", "root"] = "parent"
    """the DPO reference: the run's parent, or the lineage's root (every round anchored to the base)"""
    learning_rate: float | None = None
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.03
    max_grad_norm: float = 0.3
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 2
    num_train_epochs: float = 1.0
    max_steps: int = -1
    max_length: int = 1024
    optim: str | None = None
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    quantization: Literal["none", "nf4"] = "none"
    precompute_ref_log_probs: bool = False
    activation_checkpointing: bool = False
    """recompute activations in the backward pass (TRL's default is on; less memory, one more forward pass per step)"""
    max_drift: float = 0.0
    """stop when the drift monitor's perplexity rose more than this and keep the adapter of the last check within
    it (0: off; drift_budget.py; in TRL's DPOTrainer too, through BudgetCallback)"""
    drift_check_steps: int = 4
    drift_patience: int = 0
    """how many checks in a row past the budget training goes on through before it stops (a check back within the
    budget is kept; 0: stop at the first)"""
    schedule_tail: float = 0.0
    """leave the schedule's last steps unrun once the learning rate they would still give is at most this share
    of the schedule's (0: run every step; dpo_schedule.tail_cut; in TRL's DPOTrainer through ScheduleTail)"""
    seed: int = 42
    logging_steps: int = 1
    dpo_implementation: Literal["auto", "prefloop", "trl"] = "auto"
    """auto: prefloop's loop (lean_dpo.py: cached references, the pair rows, length-grouped batches) on CPU and
    CUDA, TRL's DPOTrainer for QLoRA (nf4), where the loop's frozen weights would be 4-bit; both keep the drift
    budget and the schedule's tail"""
    recipe: str | None = None
    """the base model whose recipe (recipes.py) filled some of these fields, for the run's record"""

    def resolved_implementation(self) -> str:
        if self.dpo_implementation != "auto":
            return self.dpo_implementation
        return "trl" if self.quantization != "none" else "prefloop"

    def resolved_learning_rate(self, recipe: str | None) -> float:
        """The configured rate, else the recipe's (services/trainer/recipes.py; `recipe` is a recipe's name,
        `recipe_name(meta.base_model, meta.source)`), else seed 001's."""
        if self.learning_rate is not None:
            return self.learning_rate
        return recipe_learning_rate(recipe) or 5e-5


@dataclass
class DPOResult:
    adapter_dir: Path
    history: list[dict]
    steps: int
    seconds: float
    config: dict
    reward_accuracy_hit_1_at_step: int | None = None
    drift_monitor: tuple[str, float] | None = None
    """(dtype, perplexity): the drift monitor's reading of the version the adapter makes, where a drift budget
    measured it (`drift_budget.monitor_key` with the saved version's weights id keys it)"""


class _MetricsFile(TrainerCallback):
    """Append every TRL log line to run_dir/metrics.jsonl as it happens."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def load_policy(path: Path, quantization: str):
    cuda = torch.cuda.is_available()
    if quantization == "nf4":
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(str(path), quantization_config=bnb,
                                                     device_map={"": 0} if cuda else {"": "cpu"})
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to("cuda" if cuda else "cpu")


def run_dpo(parent_path: Path, rows: list[dict], config: DPOJobConfig, run_dir: Path,
            recipe: str | None = None, *, parent: str = "", reference_cache: ReferenceCache | None = None,
            reference: Reference | None = None, readings: MonitorReadings | None = None) -> DPOResult:
    """Train a LoRA adapter on conversational preference rows (prompt/chosen/rejected).
    `reference`: the reference model when it is not the parent (`choose_reference`); this argument,
    not `config.reference` (recorded with the run), decides which model is the reference. `readings`:
    where the drift budget finds the parent's and the reference's perplexities measured before."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.resolved_implementation() == "prefloop":
        return _run_lean(parent_path, rows, config, run_dir, recipe, parent, reference_cache, reference, readings)
    cuda = torch.cuda.is_available()
    tok = AutoTokenizer.from_pretrained(str(parent_path))
    tok.padding_side = "left"
    model = load_policy(parent_path, config.quantization)
    fit_trl_logprob_tiles(model)
    ref_model = load_policy(reference.weights(), config.quantization) if reference else None
    lr = config.resolved_learning_rate(recipe)
    args = DPOConfig(
        output_dir=str(run_dir / "trainer"), beta=config.beta, learning_rate=lr,
        **({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, config.sft_weight]} if config.sft_weight else {}),
        lr_scheduler_type=config.lr_scheduler_type, warmup_steps=config.warmup_ratio,
        max_grad_norm=config.max_grad_norm, per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps, num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps, max_length=config.max_length,
        optim=config.optim or ("paged_adamw_8bit" if cuda else "adamw_torch"),
        precompute_ref_log_probs=config.precompute_ref_log_probs, seed=config.seed, data_seed=config.seed,
        logging_steps=config.logging_steps, save_strategy="no", report_to="none", use_cpu=not cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(), activation_checkpointing=config.activation_checkpointing,
        disable_tqdm=True, dataloader_num_workers=0,
    )
    peft_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                             target_modules=config.lora_target_modules, bias="none", task_type="CAUSAL_LM")
    train = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    started = time.monotonic()
    tail = ScheduleTail(config.schedule_tail) if config.schedule_tail else None  # before the budget
    budget = _trl_budget(config, tok, parent_path, reference, readings) if config.max_drift else None
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=train, processing_class=tok,
                         peft_config=peft_config,
                         callbacks=[c for c in (tail, budget, _MetricsFile(run_dir / "metrics.jsonl")) if c])
    trainer.remove_callback(PrinterCallback)  # metrics go to our log/metrics file, not stdout
    trainer.train()
    adapter_dir = run_dir / "adapter"
    trainer.save_model(str(adapter_dir))  # the adapter only: the kept one where the budget stopped training
    history = [h for h in trainer.state.log_history if "loss" in h]
    steps = trainer.state.global_step
    if budget:
        budget.annotate(history)
        if budget.kept_step is not None:
            log.warning("DPO stopped at step %d of %d: the drift monitor's perplexity rose %+.1f%% (budget %.1f%%); "
                        "kept the adapter of step %d", steps, trainer.state.max_steps,
                        100 * budget.readings[steps], 100 * config.max_drift, budget.kept_step)
            steps = budget.kept_step
    result = _result(adapter_dir, history, steps, started, config, lr, run_dir)
    if budget:
        result.drift_monitor = (str(budget.budget.dtype), budget.budget.kept_perplexity)
    return result


def _trl_budget(config: DPOJobConfig, tok, parent_path: Path, reference: Reference | None,
                readings: MonitorReadings | None) -> BudgetCallback:
    """The drift budget for TRL's DPOTrainer: the version as the engine will serve it (the parent's stored
    weights + the adapter's delta, in the engine's dtype on this device), as in prefloop's loop."""
    load_reference, load_parent = budget_loaders(parent_path, reference)

    def make(model) -> DriftBudget:
        return DriftBudget(model, tok, config.max_drift, load_reference, load_parent, readings=readings,
                           dtype=frozen_dtype())

    return BudgetCallback(make, config.max_drift, config.drift_check_steps, config.drift_patience)


def _result(adapter_dir: Path, history: list[dict], steps: int, started: float, config: DPOJobConfig, lr: float,
            run_dir: Path) -> DPOResult:
    hit = next((h.get("step") or i + 1 for i, h in enumerate(history) if h.get("rewards/accuracies", 0) >= 1.0), None)
    result = DPOResult(adapter_dir=adapter_dir, history=history, steps=steps,
                       seconds=round(time.monotonic() - started, 1),
                       config={**asdict(config), "learning_rate": lr, "implementation": config.resolved_implementation()},
                       reward_accuracy_hit_1_at_step=hit)
    plot_metrics(history, run_dir / "metrics.png")
    return result


def training_device() -> torch.device:
    """Where prefloop's loop trains: the GPU where there is one (the engine's rule)."""
    return pick_device_and_dtype()[0]


def budget_loaders(parent_path: Path, reference: Reference | None):
    """What a drift budget loads (`DriftBudget`'s `load_reference`, `load_parent`): the reference in the frozen
    dtype on the training device (None where the parent is the reference), and the parent as stored (fp32)."""
    dtype, device = frozen_dtype(), training_device()
    load_reference = ((lambda: AutoModelForCausalLM.from_pretrained(str(reference.weights()), dtype=dtype).to(device))
                      if reference else None)
    return load_reference, lambda: AutoModelForCausalLM.from_pretrained(str(parent_path), dtype=torch.float32)


def frozen_dtype() -> torch.dtype:
    """What prefloop's loop loads the frozen base and the reference in: bf16 where the device computes it
    natively, else fp32 (the LoRA adapter trains in fp32 either way): the engine's rule for that device."""
    return inference_dtype("auto", training_device())


def _run_lean(parent_path: Path, rows: list[dict], config: DPOJobConfig, run_dir: Path, recipe: str | None,
              parent: str, cache: ReferenceCache | None, reference: Reference | None,
              readings: MonitorReadings | None) -> DPOResult:
    """prefloop's loop: frozen base in bf16 where the device computes it natively, cached references. The
    parent as stored (fp32) is loaded once more for the drift budget, which measures the version as served."""
    tok = AutoTokenizer.from_pretrained(str(parent_path))
    model = AutoModelForCausalLM.from_pretrained(str(parent_path), dtype=frozen_dtype()).to(training_device())
    # the reference's log-probs are cached, so the root is loaded only when some are missing
    load_reference, load_parent = budget_loaders(parent_path, reference)
    lr = config.resolved_learning_rate(recipe)
    metrics = run_dir / "metrics.jsonl"
    started = time.monotonic()

    def on_log(row: dict) -> None:
        with open(metrics, "a") as f:
            f.write(json.dumps(row) + "\n")

    peft_model, history, steps, monitor = train_lora_dpo(
        model, tok, rows, config, learning_rate=lr, cache=cache, on_log=on_log, load_reference=load_reference,
        parent=reference.version if reference else parent or str(parent_path), readings=readings,
        load_parent=load_parent)
    adapter_dir = run_dir / "adapter"
    peft_model.save_pretrained(str(adapter_dir))  # the adapter only
    result = _result(adapter_dir, history, steps, started, config, lr, run_dir)
    result.drift_monitor = monitor
    return result


def merge_adapter(parent_path: Path, adapter_dir: Path):
    """Dequantize-then-merge: the parent in full precision + the adapter, merged and unloaded
    (merging into 4-bit weights loses quality; peft #2321). The registry saves the result in the
    parent's dtype."""
    base = AutoModelForCausalLM.from_pretrained(str(parent_path), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    tok = AutoTokenizer.from_pretrained(str(parent_path))
    return merged, tok


def plot_metrics(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    steps = [h.get("step", i + 1) for i, h in enumerate(history)]
    for ax, group in zip(axes, (keys[:1], keys[1:5], keys[5:])):
        for k in group:
            ax.plot(steps, [h.get(k) for h in history], label=k, marker=".")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.suptitle("DPO training")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
