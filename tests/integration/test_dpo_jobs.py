"""DPO job paths on the real tiny model: QLoRA (nf4) on CPU with dequantize-then-merge, and a
ledger snapshot export that TRL trains on unchanged."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from datasets import load_dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

from services.trainer.dpo import DPOJobConfig, Reference, choose_reference, frozen_dtype, merge_adapter, run_dpo
from services.trainer.ledger import PreferenceLedger, to_trl_row
from shared.registry import ModelRegistry


def test_qlora_nf4_trains_on_cpu_and_merges_into_full_precision(tiny_registry, preferences, tmp_path):
    parent = ModelRegistry(tiny_registry).verified_path("v0001")
    config = DPOJobConfig(quantization="nf4", max_steps=3, learning_rate=2e-3)
    result = run_dpo(parent, [to_trl_row(p) for p in preferences[:12]], config, tmp_path / "run")
    assert result.steps == 3 and (result.adapter_dir / "adapter_config.json").exists()
    merged, _ = merge_adapter(parent, result.adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(str(parent))
    assert all(p.dtype == torch.float32 for p in merged.parameters())  # merged in full precision
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)


def test_an_exported_snapshot_loads_with_datasets_and_trains_with_trl_unchanged(tiny_registry, preferences, tmp_path):
    ledger = PreferenceLedger(tmp_path / "ledger")
    assert ledger.append(preferences) == len(preferences) and ledger.append(preferences) == 0
    ids = ledger.ids[:16]
    snapshot = ledger.snapshot(ids)
    assert ledger.snapshot_ids(snapshot) == sorted(ids) and ledger.snapshot(reversed(ids)) == snapshot
    path = ledger.export(tmp_path / "snapshot.jsonl", ledger.snapshot_ids(snapshot))
    data = load_dataset("json", data_files=str(path), split="train")
    assert len(data) == 16
    assert {"prompt", "chosen", "rejected", "source", "judge_id", "policy_version", "pair_id"} <= set(data.column_names)
    assert data[0]["chosen"][0]["role"] == "assistant" and data[0]["prompt"][-1]["role"] == "user"

    model_dir = str(ModelRegistry(tiny_registry).verified_path("v0001"))
    model, tok = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), max_steps=2, per_device_train_batch_size=4, use_cpu=True,
                     bf16=False, activation_checkpointing=False, report_to="none", save_strategy="no",
                     learning_rate=1e-3, disable_tqdm=True)
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                task_type="CAUSAL_LM"))
    trainer.train()
    assert trainer.state.global_step == 2 and any("rewards/accuracies" in h for h in trainer.state.log_history)


def test_a_pair_row_scores_both_answers_as_two_rows_would_with_the_prompt_computed_once(tiny_registry, preferences):
    """`pair_logps` packs prompt + chosen + rejected into one row (the rejected answer must not see
    the chosen one, its positions restart after the prompt): its log-probs, token counts and LoRA
    gradients equal two ordinary rows per pair, under SDPA's boolean mask and eager's additive one,
    with pairs of unequal lengths in one batch (padding) and an answer cut to nothing by max_length; and
    so do they when the tokens every row begins with (the system prompt) run once for the batch."""
    from services.trainer.dpo_pairs import Encoded, encode
    from services.trainer.lean_dpo import pair_logps, sequence_logps, shared_prefix_length

    model_dir = str(ModelRegistry(tiny_registry).verified_path("v0001"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    items = [encode(tok, to_trl_row(p), 256) for p in preferences[:5]]
    assert len({len(e.chosen) + len(e.rejected) for e in items}) > 1  # the batch needs padding
    cut = items[0]
    items.append(Encoded("cut", cut.chosen, cut.chosen[:cut.prompt_len], cut.prompt_len))  # empty rejected side
    assert shared_prefix_length(items) >= 8  # the rows begin alike: the shared path runs
    torch.manual_seed(0)  # the LoRA draws below
    for attention in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attention)
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        for name, param in model.named_parameters():
            if "lora_B" in name:  # a trained adapter, so that its gradients flow through both paths
                torch.nn.init.normal_(param, std=0.05)
        lora = [p for p in model.parameters() if p.requires_grad]

        def grads():
            flat = torch.cat([p.grad.flatten() for p in lora])
            model.zero_grad()
            return flat

        rows, counts = sequence_logps(model, [(s, e.prompt_len) for e in items for s in (e.chosen, e.rejected)],
                                      pad, False)
        rows.sum().backward()
        row_grad = grads()
        for share in (False, True):
            packed, packed_counts = pair_logps(model, items, pad, False, share_prefix=share)
            packed.sum().backward()
            packed_grad = grads()
            assert torch.equal(packed_counts, counts.view(-1, 2)) and packed_counts[-1, 1] == 0
            assert torch.allclose(packed, rows.view(-1, 2), rtol=1e-5, atol=1e-4), (attention, share, packed, rows)
            # elementwise closeness fails on some draws for a near-zero entry (summation order); the error
            # relative to the gradient's norm is ~1e-6 across seeds, and large when the mask is wrong
            assert (packed_grad - row_grad).norm() <= 1e-5 * row_grad.norm(), (attention, share)
        # either answer may come second: the chosen one, scored behind the rejected one, is unchanged
        swapped = Encoded("x", items[1].rejected, items[1].chosen, items[1].prompt_len)
        second = float(pair_logps(model, [swapped], pad, False)[0][0, 1].detach())
        assert abs(second - float(rows[2].detach())) < 1e-4 * abs(second)


def test_an_answer_cut_at_the_token_limit_trains_without_an_end_of_turn(tiny_registry, preferences):
    """The model never ended a cut answer's turn: its side stops at the last sampled token, the other side
    keeps the template's end, and the reference cache tells the two encodings apart."""
    from services.trainer.dpo_pairs import encode

    tok = AutoTokenizer.from_pretrained(str(ModelRegistry(tiny_registry).verified_path("v0001")))
    pair = preferences[0]
    whole = encode(tok, to_trl_row(pair), 256)
    cut = encode(tok, to_trl_row(pair.model_copy(update={"chosen_cut": True})), 256)
    end = [tok.convert_tokens_to_ids("<|im_end|>")]
    assert whole.chosen[-1:] == end and whole.rejected[-1:] == end
    assert cut.chosen == whole.chosen[:-1] and cut.rejected == whole.rejected
    assert tok.decode(cut.chosen[cut.prompt_len:]).strip() == pair.chosen.strip()
    assert len({whole.pair_id, cut.pair_id, encode(tok, to_trl_row(pair.model_copy(
        update={"rejected_cut": True})), 256).pair_id}) == 3


def test_activation_checkpointing_recomputes_layers_and_trains_the_same(tiny_registry, preferences, tmp_path,
                                                                         monkeypatch):
    """`activation_checkpointing` (TRL's default memory policy, for the like-for-like benchmark row and
    big models): the decoder layers run under torch's checkpoint, and training is unchanged."""
    import transformers.modeling_utils as modeling

    from services.trainer import lean_dpo

    calls = []
    original = modeling.checkpoint  # what activation_checkpointing_enable wraps each layer's call in
    monkeypatch.setattr(modeling, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    # the batch's shared system prompt runs once only without checkpointing (transformers returns no cache
    # under it), and in bf16 that rounds otherwise: both runs score every row whole, so only the memory
    # policy differs (the shared prompt's equality is test_a_pair_row_scores_both_answers...)
    monkeypatch.setattr(lean_dpo, "shared_prefix_length", lambda items: 0)
    parent = ModelRegistry(tiny_registry).verified_path("v0001")
    rows = [to_trl_row(p) for p in preferences[:8]]
    histories = {}
    for on in (False, True):
        config = DPOJobConfig(dpo_implementation="prefloop", learning_rate=2e-3, max_steps=2, max_length=256,
                              per_device_train_batch_size=4, gradient_accumulation_steps=1,
                              activation_checkpointing=on)
        histories[on] = run_dpo(parent, rows, config, tmp_path / f"run-{on}").history
        assert bool(calls) == on
    assert [h["loss"] for h in histories[True]] == pytest.approx([h["loss"] for h in histories[False]], abs=1e-5)
    assert histories[True][-1]["rewards/margins"] == pytest.approx(histories[False][-1]["rewards/margins"], abs=1e-5)
    assert abs(histories[False][-1]["rewards/margins"]) > 1e-3  # the first step moved the adapter: gradients arrived


def test_prefloops_dpo_loop_starts_at_the_reference_and_reuses_cached_references(tiny_registry, preferences, tmp_path):
    """The CPU loop's first step sees policy == reference (loss ln 2, zero margins): the cached
    reference log-probs are the parent's own, scored on completion tokens only. A replay reads
    them from the cache instead of recomputing."""
    from services.trainer.dpo_pairs import encode
    from services.trainer.lean_dpo import reference_logps, sequence_logps
    from services.trainer.reference_cache import ReferenceCache
    from shared.evaluation import _answer_logps

    parent = ModelRegistry(tiny_registry).verified_path("v0001")
    rows = [to_trl_row(p) for p in preferences[:12]]
    cache = ReferenceCache(tmp_path / "refs.sqlite")
    config = DPOJobConfig(dpo_implementation="prefloop", learning_rate=2e-3, num_train_epochs=3,
                          per_device_train_batch_size=4, gradient_accumulation_steps=1, max_length=256)
    result = run_dpo(parent, rows, config, tmp_path / "run", parent="v0001", reference_cache=cache)
    first, last = result.history[0], result.history[-1]
    assert result.steps == 9 and result.config["implementation"] == "prefloop"
    assert abs(first["loss"] - 0.6931) < 2e-3 and abs(first["rewards/margins"]) < 1e-2
    assert last["loss"] < first["loss"] and last["rewards/margins"] > 0.05
    # schedule_tail leaves the cosine's last steps unrun: the steps that run are the full schedule's own
    tail = run_dpo(parent, rows, DPOJobConfig(**{**config.__dict__, "schedule_tail": 0.1}), tmp_path / "tail",
                   parent="v0001", reference_cache=cache)
    assert tail.steps == len(tail.history) == 6  # of 9 steps; the last three carry 9.0% of the schedule's rate
    assert [h["learning_rate"] for h in tail.history] == [h["learning_rate"] for h in result.history[:6]]
    assert [h["loss"] for h in tail.history] == [h["loss"] for h in result.history[:6]]

    model, tok = AutoModelForCausalLM.from_pretrained(str(parent)), AutoTokenizer.from_pretrained(str(parent))
    encoded = [encode(tok, r, 256) for r in rows[:3]]
    cached = cache.get("v0001", [e.pair_id for e in encoded])
    assert len(cached) == 3  # every pair's reference is on disk, keyed by (parent, pair, max_length)
    lp, _ = _answer_logps(model, tok, rows[0]["prompt"], rows[0]["chosen"][0]["content"])
    assert abs(cached[encoded[0].pair_id][0] - lp) < 1e-2 * abs(lp)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with torch.no_grad():  # the loop's references may come from a bf16 base: equal to a fraction of a percent
        fresh = float(sequence_logps(model, [(encoded[1].chosen, encoded[1].prompt_len)], pad, False)[0][0])
    assert abs(fresh - cached[encoded[1].pair_id][0]) < 1e-2 * abs(fresh)

    cache.put("v0001", {encoded[0].pair_id: (-1.0, -2.0)})  # a replay must read this, not recompute it

    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    refs = reference_logps(peft_model, encoded, pad, False, "v0001", cache)
    assert refs[encoded[0].pair_id] == (-1.0, -2.0) and refs[encoded[1].pair_id] == cached[encoded[1].pair_id]
    other_parent = reference_logps(peft_model, encoded[:1], pad, False, "v0002", cache)
    assert other_parent[encoded[0].pair_id] != (-1.0, -2.0)  # another parent's references are its own

    # max_steps ends the plan inside its first epoch: only the pairs of its one batch meet the reference
    unseen = [to_trl_row(p) for p in preferences[12:24]]
    run_dpo(parent, unseen, DPOJobConfig(**{**config.__dict__, "max_steps": 1}), tmp_path / "short", parent="v0001",
            reference_cache=cache)
    assert len(cache.get("v0001", [encode(tok, r, 256).pair_id for r in unseen])) == 4


def test_a_root_reference_keeps_the_margins_a_replayed_pair_won_in_an_earlier_round(tiny_registry, preferences,
                                                                                    tmp_path):
    """`reference="root"`: round 2 trains from v0002 against v0001's log-probs, so pairs round 1
    taught start with the margin they won (a parent reference starts every pair at zero) and
    their references come from the cache, keyed by the root."""
    from services.trainer.dpo_pairs import encode
    from services.trainer.lean_dpo import sequence_logps
    from services.trainer.reference_cache import ReferenceCache

    shutil.copytree(ModelRegistry(tiny_registry).verified_path("v0001"), tmp_path / "registry" / "v0001")
    registry = ModelRegistry(tmp_path / "registry")  # a copy: the session's registry must not grow a child
    root = registry.verified_path("v0001")
    rows = [to_trl_row(p) for p in preferences[:12]]
    cache = ReferenceCache(tmp_path / "refs.sqlite")
    config = DPOJobConfig(dpo_implementation="prefloop", learning_rate=2e-3, num_train_epochs=3,
                          per_device_train_batch_size=4, gradient_accumulation_steps=1, max_length=256)
    first = run_dpo(root, rows, config, tmp_path / "r1", parent="v0001", reference_cache=cache)
    merged, tok = merge_adapter(root, first.adapter_dir)
    child = registry.save(merged, tok, kind="dpo", parent="v0001").version
    child_path = registry.verified_path(child)

    assert registry.lineage(child) == [child, "v0001"]
    assert choose_reference(registry, child, "parent") is None and choose_reference(registry, "v0001", "root") is None
    chosen = choose_reference(registry, child, "root")
    loads = []
    counted = Reference(chosen.version, lambda: loads.append(chosen.version) or chosen.weights())
    # one step over all 12 pairs: the first step's margin is their mean (a batch of 4 varied 0.15-1.2
    # with the session's sampled pairs)
    rooted_config = DPOJobConfig(**{**config.__dict__, "reference": "root", "max_steps": 1,
                                    "per_device_train_batch_size": 12})
    rooted = run_dpo(child_path, rows, rooted_config, tmp_path / "r2", parent=child, reference_cache=cache,
                     reference=counted)
    assert rooted.history[0]["rewards/margins"] > 0.05 and rooted.history[0]["loss"] < 0.68
    assert rooted.config["reference"] == "root"
    assert loads == []  # every reference log-prob was cached: the root was neither loaded nor checksummed

    # pairs round 1 never saw: the loop loads the root and scores them with it, not with the child
    fresh_rows = [to_trl_row(p) for p in preferences[12:16]]
    run_dpo(child_path, fresh_rows, rooted_config, tmp_path / "r2b", parent=child, reference_cache=cache,
            reference=counted)
    assert loads == ["v0001"]
    encoded = [encode(tok, r, 256) for r in fresh_rows]
    stored = cache.get("v0001", [e.pair_id for e in encoded])
    assert len(stored) == 4 and not cache.get(child, [encode(tok, r, 256).pair_id for r in rows + fresh_rows])
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    sequences = [(ids, e.prompt_len) for e in encoded for ids in (e.chosen, e.rejected)]
    # in the dtype the loop scored them in (bf16 where the CPU computes it natively: 0.5% off fp32)
    load = {name: AutoModelForCausalLM.from_pretrained(str(path), dtype=frozen_dtype())
            for name, path in (("root", root), ("child", child_path))}
    with torch.no_grad():
        by = {name: [float(x) for x in sequence_logps(model, sequences, pad, False)[0]] for name, model in load.items()}
    kept = [x for e in encoded for x in stored[e.pair_id]]

    def worst(values: list[float], against: list[float]) -> float:
        return max(abs(v - a) / abs(a) for v, a in zip(values, against))

    # bf16 rounds the loop's packed pair rows and these single sequences differently: 9e-6 to 6e-4
    # here, more than 1e-3 in one CI run
    tolerance = 1e-3 if frozen_dtype() == torch.float32 else 1e-2
    assert worst(by["root"], by["child"]) > 10 * tolerance  # the check tells them apart (0.31-0.61 in bf16)
    assert worst(kept, by["root"]) < tolerance, (worst(kept, by["root"]), worst(kept, by["child"]))

    parented = run_dpo(child_path, rows, DPOJobConfig(**{**config.__dict__, "max_steps": 1}), tmp_path / "r3",
                       parent=child, reference_cache=cache)
    assert abs(parented.history[0]["rewards/margins"]) < 1e-2 and abs(parented.history[0]["loss"] - 0.6931) < 2e-3

    # TRL's DPOTrainer takes the root as its ref_model: a positive margin at its first step too
    trl = run_dpo(child_path, rows, DPOJobConfig(dpo_implementation="trl", learning_rate=2e-3, max_steps=1,
                                                 per_device_train_batch_size=12, gradient_accumulation_steps=1,
                                                 max_length=256, reference="root", lora_dropout=0.0),
                  tmp_path / "r4", parent=child, reference=Reference("v0001", lambda: root))
    assert trl.history[0]["rewards/margins"] > 0.05


def served_monitor(tiny_registry, adapter_dir, tmp_path) -> tuple[float, float]:
    """The drift monitor's perplexity under v0001 and under the version `adapter_dir` makes, as the gate
    measures them: merged, saved in the parent's dtype, loaded by the engine in its own."""
    from shared.alignment_data import drift_monitor_conversations
    from shared.engine import GenerationEngine
    from shared.evaluation import perplexity

    shutil.copytree(tiny_registry, tmp_path / "registry")
    registry = ModelRegistry(tmp_path / "registry")
    merged, tok = merge_adapter(registry.verified_path("v0001"), adapter_dir)
    child = registry.save(merged, tok, kind="dpo", parent="v0001").version
    before, after = (perplexity(GenerationEngine.from_registry(registry, v), drift_monitor_conversations())
                     for v in ("v0001", child))
    return before, after


SCRIPTED_STOPS = [
    # (the monitor's readings: before training, then at steps 2, 4, 6), checks past the 2% budget training goes
    # on through (drift_patience), the step it stopped at, the step kept
    ([10.0, 10.1, 10.15, 10.3], 0, 6, 4),  # over the budget at the last step
    ([10.0, 10.1, 10.5], 0, 4, 2),  # over at step 4: stop there
    ([10.0, 10.5], 0, 2, 0),  # over at the first check: the parent's weights
    ([10.0, 10.5, 10.1, 10.3], 1, 6, 4),  # over, back within (kept), over at the last step
    ([10.0, 10.5, 10.6], 1, 4, 0),  # two checks over in a row: stop at the second
    ([10.0, 10.5, 10.6, 10.1], 2, 6, 6),  # back within at the last step: its adapter stays
]


def stops_as_scripted(parent, rows, settings: dict, cases, tmp_path, monkeypatch) -> None:
    """Train 6 steps per case with the monitor's readings scripted; check where DPO stopped and what it kept."""
    from services.trainer.drift_budget import DriftBudget

    base = AutoModelForCausalLM.from_pretrained(str(parent))
    for readings, patience, end, kept in cases:
        monitor = iter(readings)
        monkeypatch.setattr(DriftBudget, "perplexity", lambda self, model: next(monitor))
        result = run_dpo(parent, rows, DPOJobConfig(**settings, max_drift=0.02, drift_patience=patience),
                         tmp_path / f"end{end}-{kept}-{patience}")
        assert result.steps == kept and result.history[-1]["step"] == end
        assert result.history[-1]["drift/perplexity_change"] == pytest.approx(readings[end // 2] / 10 - 1)
        merged, _ = merge_adapter(parent, result.adapter_dir)
        unchanged = all(torch.equal(v, base.state_dict()[k]) for k, v in merged.state_dict().items())
        assert unchanged == (kept == 0)  # step 0 kept: the parent's weights exactly


def test_the_drift_budget_stops_dpo_and_keeps_the_adapter_of_the_last_check_within_it(tiny_registry, preferences,
                                                                                     tmp_path, monkeypatch):
    """max_drift: prefloop's loop measures the drift monitor's perplexity every `drift_check_steps` and, past
    the budget (for more than `drift_patience` checks in a row, or at the last step), stops and restores the
    adapter of the last check within it (step 0: the parent itself).
    The tiny model's monitor perplexity (thousands on medical text) falls as often as it rises under DPO,
    so the stopping runs script the monitor's readings; the first run measures it for real."""
    from shared.alignment_data import drift_monitor_conversations, medical_conversations

    parent = ModelRegistry(tiny_registry).verified_path("v0001")
    rows = [to_trl_row(p) for p in preferences if p.split == "train"][:12]
    settings = dict(learning_rate=2e-2, max_steps=6, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                    drift_check_steps=2, dpo_implementation="prefloop")
    free = run_dpo(parent, rows, DPOJobConfig(**settings, max_drift=100.0), tmp_path / "free")
    change = {h["step"]: h["drift/perplexity_change"] for h in free.history if "drift/perplexity_change" in h}
    assert free.steps == 6 and sorted(change) == [2, 4, 6] and len(set(change.values())) == 3
    # each reading is the version the adapter makes, as the gate measures it
    before, after = served_monitor(tiny_registry, free.adapter_dir, tmp_path)
    ratio = after / before  # the history rounds to 5 places
    assert 1 + change[6] == pytest.approx(ratio, abs=6e-6) and abs(change[6]) > 1e-3
    stops_as_scripted(parent, rows, settings, SCRIPTED_STOPS, tmp_path, monkeypatch)
    # the monitor is apart from the gate's guard set
    guard = {c[-2]["content"] for c in medical_conversations(10_000)}
    assert len(guard) == 110 and not guard & {c[-2]["content"] for c in drift_monitor_conversations()}


def test_the_drift_budget_stops_trls_qlora_by_the_same_rule_and_reads_the_version_as_served(tiny_registry, preferences,
                                                                                          tmp_path, monkeypatch):
    """QLoRA trains through TRL's DPOTrainer; its drift budget (BudgetCallback) reads the version the adapter
    makes over the parent's stored weights, in the engine's dtype (the 4-bit frozen weights are not it), and
    stops and restores as prefloop's loop does."""
    parent = ModelRegistry(tiny_registry).verified_path("v0001")
    rows = [to_trl_row(p) for p in preferences if p.split == "train"][:12]
    settings = dict(learning_rate=2e-2, max_steps=6, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                    drift_check_steps=2, quantization="nf4")
    assert DPOJobConfig(**settings).resolved_implementation() == "trl"
    free = run_dpo(parent, rows, DPOJobConfig(**settings, max_drift=100.0), tmp_path / "free")
    change = {h["step"]: h["drift/perplexity_change"] for h in free.history if "drift/perplexity_change" in h}
    assert free.steps == 6 and sorted(change) == [2, 4, 6] and abs(change[6]) > 1e-3
    logged = [json.loads(line) for line in (tmp_path / "free" / "metrics.jsonl").read_text().splitlines()]
    assert [(row["step"], row["drift/perplexity_change"]) for row in logged
            if "drift/perplexity_change" in row] == sorted(change.items())  # once a check, on its step's row
    before, after = served_monitor(tiny_registry, free.adapter_dir, tmp_path)
    assert 1 + change[6] == pytest.approx(after / before, abs=6e-6)
    assert free.drift_monitor == (str(frozen_dtype()), pytest.approx(after, rel=1e-5))
    # schedule_tail cuts TRL's own schedule as it cuts the loop's: of its 6 steps (one warmup step, at 0 in
    # transformers' cosine), the last carries 3.2% of the rate; 5 run, at the full schedule's rates, and the
    # budget checks the last that runs
    tail = run_dpo(parent, rows, DPOJobConfig(**settings, max_drift=100.0, schedule_tail=0.1), tmp_path / "tail")
    assert tail.steps == 5 and [h["step"] for h in tail.history] == [1, 2, 3, 4, 5]
    assert [h["learning_rate"] for h in tail.history] == [h["learning_rate"] for h in free.history[:5]]
    assert [h["step"] for h in tail.history if "drift/perplexity_change" in h] == [2, 4, 5]
    stops_as_scripted(parent, rows, settings, SCRIPTED_STOPS[1:4], tmp_path, monkeypatch)


def test_the_drift_budget_counts_from_the_reference_when_it_is_lower_than_the_parent(tiny_registry):
    """The gate guards the forgetting sets against the parent and against the base: a second round's
    budget is what the first left, so the start is the lower of the parent's and the reference's."""
    from services.trainer.drift_budget import DriftBudget

    path = ModelRegistry(tiny_registry).verified_path("v0001")
    tok = AutoTokenizer.from_pretrained(str(path))
    clean = AutoModelForCausalLM.from_pretrained(str(path))
    drifted = AutoModelForCausalLM.from_pretrained(str(path))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in drifted.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    probe = DriftBudget(get_peft_model(clean, LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")),
                        tok, 0.05)
    low, high = sorted((clean, drifted), key=probe.perplexity)  # the parent: the one the monitor finds worse
    policy = get_peft_model(high, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    alone = DriftBudget(policy, tok, 0.05)
    gap = alone.start / probe.perplexity(low) - 1
    rooted = DriftBudget(policy, tok, gap / 2, load_reference=lambda: low)
    assert gap > 0 and rooted.start < alone.start and alone.check(1) == pytest.approx(0, abs=1e-6)
    assert rooted.check(1) == pytest.approx(gap)  # past its budget: the adapter of step 0 stays kept
    assert rooted.kept_step == 0 and alone.kept_step == 1 and policy.training


def test_a_drift_check_measures_the_merged_version_and_leaves_the_frozen_weights_as_they_were(tiny_registry,
                                                                                              tmp_path):
    """The check merges the adapter into the parent's stored weights (fp32 sum, rounded once to the frozen
    dtype, the engine's), measures with the adapter path off, and puts the frozen weights and the adapter
    back as they were."""
    from services.trainer.drift_budget import DriftBudget
    from shared.alignment_data import drift_monitor_conversations

    path = ModelRegistry(tiny_registry).verified_path("v0001")
    tok = AutoTokenizer.from_pretrained(str(path))
    torch.manual_seed(0)
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(str(path), dtype=frozen_dtype()),
                            LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    budget = DriftBudget(policy, tok, 1.0, load_parent=lambda: AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32))  # the parent as stored, not rounded to the frozen dtype
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    frozen = {k: v.clone() for k, v in policy.state_dict().items() if "lora_" not in k}
    ids = torch.tensor([tok.encode("Is it safe to take ibuprofen with a cold?")])
    with torch.no_grad():
        before = policy(input_ids=ids).logits
    reading = budget.check(1)
    policy.save_pretrained(str(tmp_path / "adapter"))
    merge_adapter(path, tmp_path / "adapter")[0].save_pretrained(str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=frozen_dtype())  # as served
    served = DriftBudget(get_peft_model(merged, LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")),
                         tok, 1.0)
    assert 1 + reading == pytest.approx(served.start / budget.start, rel=1e-9) and abs(reading) > 1e-3
    assert served.conversations == drift_monitor_conversations() and budget.kept_step == 1
    assert all(torch.equal(v, frozen[k]) for k, v in policy.state_dict().items() if "lora_" not in k)
    with torch.no_grad():
        assert torch.equal(policy(input_ids=ids).logits, before)  # the adapter path is on again


def test_a_run_whose_drift_budget_kept_nothing_is_rejected_before_the_gate(tiny_registry, preferences, tmp_path,
                                                                          monkeypatch):
    """No check within the budget: the adapter is the parent itself, so the run merges, saves and gates
    nothing (a copy of the parent would tie with it on every question); it is rejected with the
    monitor's readings, and its pairs count as used, like a rejected version's. A first round (its parent
    not trained by DPO) has `first_round_max_drift` as its budget, not `max_drift`."""
    from services.trainer.drift_budget import DriftBudget
    from services.trainer.runner import TrainingRunner
    from services.trainer.settings import TrainerSettings
    from shared.observability import new_registry
    from shared.outbox import Outbox
    from shared.topics import MODEL_UPDATES

    shutil.copytree(tiny_registry, tmp_path / "registry")
    registry = ModelRegistry(tmp_path / "registry")
    ledger = PreferenceLedger(tmp_path / "ledger")
    ledger.append(preferences)
    s = TrainerSettings(runs_dir=str(tmp_path / "runs"), ledger_dir=str(tmp_path / "ledger"), max_drift=0.05,
                        first_round_max_drift=0.02, drift_check_steps=2, max_steps=4, per_device_train_batch_size=2,
                        gradient_accumulation_steps=1, dpo_implementation="prefloop")
    metrics = new_registry()
    runner = TrainingRunner(s, ledger, registry, Outbox(tmp_path / "outbox.sqlite", [MODEL_UPDATES], metrics, "mu"),
                            MODEL_UPDATES, metrics)
    assert registry.get("v0001").kind != "dpo"
    readings = iter([10.0, 10.3])  # +3% at step 2, the first check: over the first round's 2% budget
    monkeypatch.setattr(DriftBudget, "perplexity", lambda self, model: next(readings))
    assert runner.new_pair_ids()
    record = runner.run("test")
    assert record.status == "rejected" and record.version is None and record.error is None
    assert record.eval_summary.gate_reasons == ["drift budget: no check within 2.0% of the monitor's perplexity "
                                                "(step 2 +3.0%): the parent leaves this round no "
                                                "room, so nothing was merged or gated"]
    assert set(record.phases) == {"dpo"}  # no merge, save or gate
    assert [m.version for m in registry.list()] == ["v0001"] and registry.current() == "v0001"
    assert not runner.new_pair_ids() and runner.trigger_status().consecutive_failures == 0


def test_a_versions_drift_monitor_reading_is_kept_and_the_next_round_starts_from_it(tiny_registry, preferences,
                                                                                   tmp_path, monkeypatch):
    """The runner keeps the monitor's perplexity of the version a round saves (its last kept check) and of
    the parent with the gate's perplexities (by weights id); the next round's budget starts from them
    without measuring either again, and the kept reading is what measuring the saved version gives."""
    from services.trainer.drift_budget import DriftBudget, MonitorReadings, monitor_key
    from services.trainer.runner import TrainingRunner
    from services.trainer.settings import TrainerSettings
    from shared.observability import new_registry
    from shared.outbox import Outbox
    from shared.topics import MODEL_UPDATES

    shutil.copytree(tiny_registry, tmp_path / "registry")
    registry = ModelRegistry(tmp_path / "registry")
    ledger = PreferenceLedger(tmp_path / "ledger")
    ledger.append(preferences)
    s = TrainerSettings(runs_dir=str(tmp_path / "runs"), ledger_dir=str(tmp_path / "ledger"), max_drift=100.0,
                        drift_check_steps=2, max_steps=4, per_device_train_batch_size=2, learning_rate=2e-2,
                        gradient_accumulation_steps=1, dpo_implementation="prefloop", eval_prompts=4,
                        eval_samples=1, medical_reference_size=4, general_reference_size=4, eval_max_new_tokens=8)
    metrics = new_registry()
    runner = TrainingRunner(s, ledger, registry, Outbox(tmp_path / "outbox.sqlite", [MODEL_UPDATES], metrics, "mu"),
                            MODEL_UPDATES, metrics)
    record = runner.run("test")
    assert record.version == "v0002" and record.error is None
    path = registry.verified_path("v0002")
    tok = AutoTokenizer.from_pretrained(str(path))

    def policy():
        return get_peft_model(AutoModelForCausalLM.from_pretrained(str(path), dtype=frozen_dtype()),
                              LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))

    measured = DriftBudget(policy(), tok, 1.0)  # the saved version, loaded as the next round loads its parent
    ids = {v: registry.weights_id(v) for v in ("v0002", "v0001")}  # kept with the gate's, by weights
    kept, root = (runner.gate.answers.known_perplexity(monitor_key(ids[v], measured.dtype)) for v in ids)
    assert kept == pytest.approx(measured.start, rel=1e-9) and root is not None and kept != root
    monkeypatch.setattr(DriftBudget, "perplexity", lambda self, model: pytest.fail("measured a known version"))
    cached = DriftBudget(policy(), tok, 1.0, load_reference=lambda: pytest.fail("loaded the reference"),
                         readings=MonitorReadings(runner.gate.answers, ids["v0002"], ids["v0001"]))
    assert cached.start == min(kept, root) and cached.kept_perplexity == kept
