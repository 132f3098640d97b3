"""The demo's simulated users: a pick needs a clear rubric margin, never a coin flip."""

from prefloop.demo import user_pick
from shared.judging.rubric import score, weighted

GOOD = ("Chest pain that spreads to your arm or jaw can be a sign of a heart attack. Call emergency "
        "services now, chew an aspirin if you are not allergic, and do not drive yourself. A doctor "
        "should check any new chest pain, even if it settles.")
BAD = "pain pain pain pain pain pain pain pain pain pain"


def test_the_clearly_better_answer_is_picked_in_either_position():
    assert weighted(score(GOOD)) - weighted(score(BAD)) >= 2
    assert user_pick(GOOD, BAD) == 0
    assert user_pick(BAD, GOOD) == 1


def test_close_identical_or_blank_answers_get_no_verdict():
    near = GOOD.replace("Call emergency services now", "Call emergency services right away")
    assert abs(weighted(score(GOOD)) - weighted(score(near))) < 2
    assert user_pick(GOOD, near) is None
    assert user_pick(GOOD, GOOD + "  ") is None
    assert user_pick(GOOD, "   ") is None
