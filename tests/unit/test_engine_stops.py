"""Where generation stops: every eos id of the generation config (an int or a list), the
tokenizer's eos, and the token the chat template puts at the end of an assistant turn."""

from shared.engine import end_of_turn_token, stop_token_ids
from tests.helpers import random_tiny_model

ZEPHYR = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
LLAMA3 = ("{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + "
          "message['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def test_chatml_stops_at_im_end_and_every_configured_eos():
    model, tok = random_tiny_model()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_token(tok) == im_end
    model.generation_config.eos_token_id = [tok.convert_tokens_to_ids("<|endoftext|>"), 7]
    assert stop_token_ids(tok, model) == sorted({im_end, tok.convert_tokens_to_ids("<|endoftext|>"), 7})
    model.generation_config.eos_token_id = 5
    assert 5 in stop_token_ids(tok, model) and im_end in stop_token_ids(tok, model)


def test_the_templates_own_end_of_turn_token_is_found():
    model, tok = random_tiny_model()
    tok.add_special_tokens({"additional_special_tokens": ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]})
    tok.chat_template = LLAMA3
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert end_of_turn_token(tok) == eot and eot in stop_token_ids(tok, model)
    tok.add_special_tokens({"eos_token": "</s>"})
    tok.chat_template = ZEPHYR
    assert end_of_turn_token(tok) == tok.convert_tokens_to_ids("</s>")


def test_a_template_that_ends_turns_with_plain_text_adds_no_stop_id():
    model, tok = random_tiny_model()
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
    assert end_of_turn_token(tok) is None
    assert stop_token_ids(tok, model) == sorted({tok.eos_token_id, model.generation_config.eos_token_id})
