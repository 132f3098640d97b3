"""SFT on any chat template: with `{% generation %}` markers TRL's assistant-only loss, without them
prompt/completion rows whose loss falls on the answer (and its end-of-turn token) only."""

from __future__ import annotations

import torch
from transformers import AutoTokenizer
from trl.chat_template_utils import has_generation_markers
from trl.trainer import utils as trl_utils

from services.trainer.bootstrap import TinyModelSpec, bootstrap_base, build_tiny_model, build_tokenizer, load_conversations
from services.trainer.sft import SFTJobConfig, make_sft_trainer, run_sft, sft_rows
from shared.registry import ModelRegistry

# TinyLlama-1.1B-Chat-v1.0's template (Zephyr style): no generation markers, `</s>` ends every turn.
ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
          "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
          "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
          "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
CONVERSATIONS = load_conversations("train")[:8]
SMALL = TinyModelSpec(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
CONFIG = SFTJobConfig(max_steps=3, logging_steps=1, lora=None, per_device_train_batch_size=2,
                      gradient_accumulation_steps=1, learning_rate=1e-2)


def zephyr_tokenizer():
    tok = build_tokenizer([m["content"] for c in CONVERSATIONS for m in c["messages"]], 600)
    tok.add_special_tokens({"eos_token": "</s>", "additional_special_tokens": ["<|user|>", "<|assistant|>", "<|system|>"]})
    tok.chat_template = ZEPHYR
    return tok


def trained_text(trainer, tok, i: int) -> str:
    labels = trainer.train_dataset[i]["labels"]
    return tok.decode([t for t in labels if t != -100])


def assert_loss_on_answers_only(tok, end_of_turn: str, tmp_path) -> None:
    model = build_tiny_model(tok, SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer, mask = make_sft_trainer(model, tok, CONVERSATIONS, CONFIG, tmp_path)
    assert mask == "completion_only"
    for i, conversation in enumerate(CONVERSATIONS):
        answer = conversation["messages"][-1]["content"]
        assert trained_text(trainer, tok, i) == answer + end_of_turn  # the answer and its end, nothing else
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())


def test_zephyr_style_template_trains_on_the_answers_only(tmp_path):
    assert_loss_on_answers_only(zephyr_tokenizer(), "</s>\n", tmp_path)


def test_smollm2_template_trains_on_the_answers_only(smollm2_registry, tmp_path):
    tok = AutoTokenizer.from_pretrained(str(ModelRegistry(smollm2_registry).verified_path("v0001")))
    assert not has_generation_markers(tok.chat_template)
    assert_loss_on_answers_only(tok, "<|im_end|>\n", tmp_path)


def test_a_template_with_generation_markers_keeps_assistant_only_loss():
    tok = build_tokenizer(["hello there", "see a doctor"], 300)
    assert sft_rows(tok, CONVERSATIONS)[1] == "assistant_only"


def test_every_assistant_turn_of_a_conversation_is_a_row():
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, how can I help?"},
             {"role": "user", "content": "My knee hurts."}, {"role": "assistant", "content": "Please see a doctor."}]
    rows, mask = sft_rows(zephyr_tokenizer(), [{"messages": turns}])
    assert mask == "completion_only" and [r["completion"][0]["content"] for r in rows] == [turns[1]["content"],
                                                                                          turns[3]["content"]]
    assert rows[1]["prompt"] == turns[:3]


def test_lora_sft_on_smollm2_registers_a_merged_sft_version(smollm2_registry, tmp_path):
    base = ModelRegistry(smollm2_registry).verified_path("v0001")
    reg = ModelRegistry(tmp_path / "registry")
    meta = bootstrap_base(reg, str(base), "lora", SFTJobConfig(max_steps=2, logging_steps=1, max_length=256))
    assert (meta.kind, meta.source.kind, meta.training_config["loss_mask"]) == ("sft", "hf", "completion_only")
    assert meta.metrics["sft_steps"] == 2 and reg.current() == meta.version
    assert trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE == 32768  # TRL's width; SmolLM2's 49152 tokens are wider
    merged = reg.verified_path(meta.version)
    assert not list(merged.glob("adapter*"))  # merged into the weights, not an adapter beside them


def test_run_sft_reports_the_mask_it_used(tmp_path):
    tok = zephyr_tokenizer()
    model = build_tiny_model(tok, SMALL)
    result = run_sft(model, tok, CONVERSATIONS, CONFIG, tmp_path)
    assert result.loss_mask == "completion_only" and result.steps == 3
    # TRL's fused log-prob tile narrowed to the vocabulary (fit_trl_logprob_tiles): if TRL renames
    # its private constant the speed-up is gone, and this says so
    assert trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE == model.get_output_embeddings().weight.shape[0] < 32768
