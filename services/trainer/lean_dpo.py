"""prefloop's DPO loop for CPUs: the same objective and hyperparameters as TRL's DPOTrainer
(sigmoid loss, LoRA via peft, AdamW, cosine schedule with warmup, gradient clipping), shaped for
a machine without a GPU. Measured on 2 cores (benchmarks/dpo.py), what costs the time there:

- TRL scores every position of every sequence with a chunked log-softmax kernel made for
  Triton; on a CPU it runs as torch ops over prompt and padding positions too. Here only the
  completion tokens go through the LM head.
- The frozen base runs in bf16 where the CPU computes it natively (2.0-2.6x the fp32 matmul speed
  on the AMD EPYC type with AVX512-BF16, on the step's shapes); the LoRA weights, optimizer state
  and loss stay in fp32.
- Reference log-probs come from the parent (adapters disabled), or from another model given as the
  reference (the lineage's root, `PREFLOOP_TRAINER_REFERENCE=root`), once per (reference, pair): they are
  cached on disk, so replayed pairs never pay for their reference pass again.
- Chosen and rejected share their prompt: one row per pair computes it once (`pair_logps`; 17-24%
  less time per step in two SmolLM2 demo runs). Batches are grouped by length (less padding). The
  tokens every row of a batch begins with (the system prompt: 49 of a SmolLM2 demo row's ~272) run once
  per batch, their keys and values repeated into each row: 8 steps of run 90's round 2 took 28.8 s
  against 32.2 s.
- Reference log-probs only for the pairs the plan reaches (`max_steps` may end it inside an epoch).
- `schedule_tail` leaves the cosine schedule's last steps unrun (`tail_cut`): they carry a few percent
  of its learning rate at full price per step.
- No activation checkpointing by default (`activation_checkpointing` turns it on): a 135M model's
  activations fit in memory many times over, and recomputing them costs one more forward pass per step.
LoRA dropout follows TRL's default `disable_dropout=True`: off.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from functools import partial

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from services.trainer.drift_budget import DriftBudget, MonitorReadings
from services.trainer.dpo_pairs import Encoded, by_length, encode, length_grouped
from services.trainer.dpo_schedule import cosine_with_warmup, steps_to_run
from services.trainer.reference_cache import ReferenceCache
from shared.evaluation import SHARED_PREFIX_MIN

log = logging.getLogger(__name__)


def sequence_logps(model, sequences: list[tuple[list[int], int]], pad_id: int, autocast: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each sequence's tokens after its prompt (only those reach the LM head),
    and how many tokens each sum has. The loop scores pairs with `pair_logps`; this is the plain form."""
    width = max(len(s) for s, _ in sequences)
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s, _ in sequences])
    attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s, _ in sequences])
    scored = torch.zeros(len(sequences), width - 1, dtype=torch.bool)
    for i, (s, prompt_len) in enumerate(sequences):
        scored[i, prompt_len - 1:len(s) - 1] = True  # position t predicts token t + 1
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = inner.device
    ids, attention, scored = ids.to(device), attention.to(device), scored.to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        hidden = inner.model(input_ids=ids, attention_mask=attention).last_hidden_state[:, :-1]
        logits = inner.lm_head(hidden[scored]).float()
    targets = ids[:, 1:][scored]
    token_logps = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
    counts = scored.sum(1)
    owner = torch.repeat_interleave(torch.arange(len(sequences), device=device), counts)
    return torch.zeros(len(sequences), dtype=token_logps.dtype, device=device).index_add(0, owner, token_logps), counts


def shared_prefix_length(items: list[Encoded]) -> int:
    """How many tokens every pair of a batch begins with (a system prompt: 49 of a SmolLM2 demo row's ~270),
    up to the shortest prompt less one (each row keeps the position that predicts its first answer token);
    0 where that is under `SHARED_PREFIX_MIN`."""
    shared = min(len(os.path.commonprefix([e.chosen for e in items])), *(e.prompt_len - 1 for e in items))
    return shared if shared >= SHARED_PREFIX_MIN else 0


def pair_logps(model, items: list[Encoded], pad_id: int, autocast: bool, share_prefix: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logps` of both sides of each pair ([pairs, 2] sums and counts), with the shared prompt
    computed once: one row per pair, prompt + chosen + rejected, where the rejected answer attends to
    the prompt and itself, never to the chosen answer, and its positions restart after the prompt.
    The same numbers as two rows per pair (rounding aside), for the prompt's tokens once instead of twice.
    With `share_prefix`, the tokens every row of the batch begins with run once, and their keys and values
    are repeated into each row (gradients flow back through the repeat): the same numbers again, for a
    system prompt once per batch instead of once per pair. Off under activation checkpointing, where
    transformers returns no cache in training."""
    rows, spans = [], []
    for e in items:
        p = e.prompt_len
        if e.chosen[:p] != e.rejected[:p]:
            raise ValueError(f"pair {e.pair_id}: chosen and rejected do not share their first {p} (prompt) tokens")
        rows.append(e.chosen + e.rejected[p:])
        spans.append((p, len(e.chosen) - p, len(e.rejected) - p))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    segment = torch.full((len(rows), width), -1)  # -1 padding, 0 prompt, 1 chosen, 2 rejected
    source, owner = [], []  # (row, position) whose logits predict each scored token, and its side
    for i, (row, (p, c, r)) in enumerate(zip(rows, spans)):
        ids[i, :len(row)] = torch.tensor(row)
        positions[i, :p + c] = torch.arange(p + c)
        positions[i, p + c:p + c + r] = torch.arange(p, p + r)
        segment[i, :p], segment[i, p:p + c], segment[i, p + c:p + c + r] = 0, 1, 2
        for side, start, n in ((0, p, c), (1, p + c, r)):  # the side's first token is predicted by the prompt's last
            source += [(i, t) for t in [p - 1, *range(start, start + n - 1)][:n]]
            owner += [2 * i + side] * n
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    query, key = segment[:, :, None], segment[:, None, :]
    allowed = causal & (key >= 0) & ~((query == 2) & (key == 1)) | torch.eye(width, dtype=torch.bool)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    attention = inner.config._attn_implementation
    if attention == "sdpa":
        mask = allowed[:, None]
    elif attention == "eager":  # adds the mask to the scores
        mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill_(~allowed, torch.finfo(torch.float32).min)
        mask = mask[:, None]
    else:  # flash and flex attention take no custom 4D mask
        raise ValueError(f"pair_logps needs sdpa or eager attention, not {attention!r}")
    device = inner.device  # built on the CPU, computed where the model is
    ids, positions, mask, at = ids.to(device), positions.to(device), mask.to(device), torch.tensor(source, device=device)
    shared = shared_prefix_length(items) if share_prefix else 0
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        cache = None
        if shared:
            cache = inner.model(input_ids=ids[:1, :shared], position_ids=positions[:1, :shared],
                                use_cache=True).past_key_values
            cache.batch_repeat_interleave(len(rows))
        hidden = inner.model(input_ids=ids[:, shared:], attention_mask=mask[..., shared:, :],
                             position_ids=positions[:, shared:], past_key_values=cache,
                             use_cache=cache is not None).last_hidden_state
        logits = inner.lm_head(hidden[at[:, 0], at[:, 1] - shared]).float()
    owners = torch.tensor(owner, device=device)
    targets = torch.tensor([tok for (p, _, _), row in zip(spans, rows) for tok in row[p:]],  # chosen, then rejected
                           device=device)
    token_logps = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
    sums = torch.zeros(2 * len(rows), dtype=token_logps.dtype, device=device).index_add(0, owners, token_logps)
    counts = torch.bincount(owners, minlength=2 * len(rows))
    return sums.view(-1, 2), counts.view(-1, 2)


def train_lora_dpo(model, tokenizer, rows: list[dict], config, *, learning_rate: float, parent: str,
                   cache: ReferenceCache | None, on_log, load_reference=None, load_parent=None,
                   readings: MonitorReadings | None = None) -> tuple[object, list[dict], int, tuple[str, float] | None]:
    """Train a LoRA adapter on `model` (its base frozen) with the DPO loss; returns (peft model,
    history, steps, the drift monitor's (`monitor_key` dtype, perplexity) of the version the kept adapter
    makes, or None without a drift budget). `config` is a DPOJobConfig; `on_log(row)` gets every logged
    row. The reference is `model` itself (adapters off) unless `load_reference` is given (it returns the
    reference model; called only when the cache lacks some log-probs); `parent` names the reference in
    the cache either way. `readings`: the monitor's perplexities of the parent and the reference, where
    they were measured before."""
    torch.manual_seed(config.seed)
    autocast = next(model.parameters()).dtype == torch.bfloat16
    if config.activation_checkpointing:  # applies in train mode only: the reference pass keeps nothing anyway
        model.activation_checkpointing_enable({"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                                             target_modules=config.lora_target_modules, bias="none",
                                             task_type="CAUSAL_LM"))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    data = [encode(tokenizer, r, config.max_length) for r in rows]
    batch = config.per_device_train_batch_size * config.gradient_accumulation_steps
    epochs = max(1, math.ceil(config.num_train_epochs))
    plan = [b for epoch in range(epochs) for b in length_grouped(data, batch, config.seed + epoch)]
    if config.num_train_epochs < epochs:
        plan = plan[:max(1, round(len(plan) * config.num_train_epochs / epochs))]
    if config.max_steps > 0:
        plan = plan[:config.max_steps]
    horizon = len(plan)  # the schedule's length; `schedule_tail` may leave its last steps unrun
    factor = partial(cosine_with_warmup, warmup=math.ceil(config.warmup_ratio * horizon), steps=horizon)
    if config.schedule_tail:
        plan = plan[:steps_to_run([factor(i) for i in range(horizon)], config.schedule_tail)]
    planned = list({e.pair_id: e for items in plan for e in items}.values())
    if len(planned) < len(data):  # the plan ends inside an epoch: those pairs never meet the reference
        log.info("%d of %d pairs are past the plan's %d steps: their reference log-probs are not computed",
                 len(data) - len(planned), len(data), len(plan))
    references = reference_logps(model, planned, pad, autocast, parent, cache, load_reference)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    started = time.monotonic()
    budget = (DriftBudget(model, tokenizer, config.max_drift, load_reference, load_parent, readings=readings)
              if config.max_drift else None)
    model.train()
    history: list[dict] = []
    kept, step, over = len(plan), 0, 0
    checking, checks = time.monotonic() - started, 0  # the budget's start is the first reading
    for step, items in enumerate(plan, 1):
        logps, counts = pair_logps(model, items, pad, autocast, share_prefix=not config.activation_checkpointing)
        ref = torch.tensor([references[e.pair_id] for e in items], device=logps.device)
        chosen_rewards = config.beta * (logps[:, 0] - ref[:, 0])
        rejected_rewards = config.beta * (logps[:, 1] - ref[:, 1])
        loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
        if config.sft_weight:  # RPO: keep the chosen answers likely (limits drift from the parent)
            loss = loss + config.sft_weight * (-logps[:, 0] / counts[:, 0].clamp(min=1)).mean()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        drift = None
        if budget and (step % config.drift_check_steps == 0 or step == len(plan)):
            check_started = time.monotonic()
            drift = budget.check(step)
            checking, checks = checking + time.monotonic() - check_started, checks + 1
        if step % config.logging_steps == 0 or step == len(plan) or drift is not None:
            row = {"step": step, "loss": round(loss.item(), 5), "grad_norm": round(float(grad_norm), 5),
                   "learning_rate": schedule.get_last_lr()[0],
                   "rewards/chosen": chosen_rewards.mean().item(), "rewards/rejected": rejected_rewards.mean().item(),
                   "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
                   "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
                   "logps/chosen": logps[:, 0].mean().item(), "logps/rejected": logps[:, 1].mean().item(),
                   "epoch": round(step / max(1, horizon) * config.num_train_epochs, 3),
                   **({"drift/perplexity_change": round(drift, 5)} if drift is not None else {})}
            history.append(row)
            on_log(row)
        if drift is None:
            continue
        if drift <= config.max_drift:
            if over:
                log.info("the drift monitor is back within the budget at step %d (%+.1f%%)", step, 100 * drift)
            over = 0
            continue
        over += 1
        if over > config.drift_patience or step == len(plan):
            kept = budget.restore()
            log.warning("DPO stopped at step %d of %d: the drift monitor's perplexity rose %+.1f%% (budget %.1f%%); "
                        "kept the adapter of step %d", step, len(plan), 100 * drift, 100 * config.max_drift, kept)
            break
    log.info("DPO: %d steps in %.1fs, the drift budget's start and %d checks in %.1fs", step,
             time.monotonic() - started - checking, checks, checking)
    return model, history, kept, (str(budget.dtype), budget.kept_perplexity) if budget else None


@torch.no_grad()
def reference_logps(model, data: list[Encoded], pad: int, autocast: bool, parent: str,
                    cache: ReferenceCache | None, load_reference=None) -> dict[str, tuple[float, float]]:
    """The reference's log-probs of both sides of every pair: from the cache, or computed by the
    model `load_reference()` returns, else by `model` with its adapters off (the parent)."""
    known = cache.get(parent, [e.pair_id for e in data]) if cache else {}
    missing = sorted((e for e in data if e.pair_id not in known), key=by_length)
    started = time.monotonic()
    model.eval()
    scorer = load_reference().eval() if load_reference and missing else model
    with contextlib.nullcontext() if scorer is not model else model.disable_adapter():
        for batch in [missing[i:i + 8] for i in range(0, len(missing), 8)]:
            logps = pair_logps(scorer, batch, pad, autocast)[0]
            fresh = {e.pair_id: (float(c), float(r)) for e, (c, r) in zip(batch, logps.tolist())}
            known.update(fresh)
            if cache:
                cache.put(parent, fresh)
    log.info("reference log-probs (%s): %d cached, %d computed in %.1fs", parent, len(data) - len(missing),
             len(missing), time.monotonic() - started)
    return known
