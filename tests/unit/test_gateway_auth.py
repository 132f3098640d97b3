"""Gateway bearer keys and per-key rate limits, without a server."""

from services.gateway.auth import KeyRing, RateLimiter, key_id
from services.gateway.chat import cut_at_stop


def test_keys_are_checked_exactly_and_identified_by_a_hash():
    ring = KeyRing(["sk-one", "sk-two"])
    assert ring.check("Bearer sk-two") == key_id("sk-two") != "sk-two"
    for bad in (None, "", "sk-one", "Bearer ", "Bearer sk-on", "Bearer sk-one2", "Basic sk-one"):
        assert ring.check(bad) is None
    assert KeyRing([]).check("Bearer anything") is None


def test_rate_limit_is_per_key_and_says_when_to_retry():
    limiter = RateLimiter(per_minute=3)
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.acquire("a")
    assert 0 < wait <= 20.0  # one token refills in 60/3 s
    assert limiter.acquire("b") == 0.0


def test_stop_strings_cut_at_the_earliest_match():
    assert cut_at_stop("see a doctor. END more END", ["END", "more"]) == ("see a doctor. ", True)
    assert cut_at_stop("no stop here", ["###"]) == ("no stop here", False)
