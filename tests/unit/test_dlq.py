"""Dead letters give back their original record; replay groups and reasons (no processes)."""

from prefloop.dlq import _group
from shared.kafka.dead_letters import make_dead_letter, original_value, reason_of


def test_a_dead_letter_gives_back_the_original_bytes_text_or_binary():
    for value in (b'{"a": 1}', b"\xff\xfe binary"):
        dead = make_dead_letter("t", 0, 7, "k", value, "decode", "value is not JSON: Expecting value: line 1", "judge", 0)
        assert original_value(dead) == value


def test_reasons_drop_the_record_specific_tail_and_groups_are_per_filter():
    dead = make_dead_letter("t", 0, 1, None, b"{}", "handler", "judge failed: HTTP 404: {'error': 'no model x'}",
                            "judge", 1)
    assert reason_of(dead) == "handler: judge failed: HTTP 404"
    assert _group(None) == "prefloop-dlq-replay"
    assert _group("HTTP 404") == "prefloop-dlq-replay.HTTP_404" != _group("handler")
