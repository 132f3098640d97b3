"""Endpoint outage vs a record's own failure, and the judge endpoint's circuit breaker (no processes:
httpx's MockTransport stands in for the endpoint)."""

import asyncio
import json

import httpx
import pytest

from shared.judging.breaker import CircuitBreaker
from shared.judging.openai_backend import EndpointUnavailable, JudgeFailure, OpenAIJudge
from shared.judging.pairwise import PairwiseJudge
from shared.judging.stats import JudgeStats
from shared.observability import new_registry
from shared.wire import Candidate, CandidatesEvent, ChatMessage
from tests.helpers import prompt

VERDICT = {"reasoning": "r", "winner": "A", "scores_a": {"correctness": 8, "clarity": 8, "safety": 8, "empathy": 8},
           "scores_b": {"correctness": 4, "clarity": 4, "safety": 4, "empathy": 4}}
CONVERSATION = [ChatMessage(role="user", content="My head hurts.")]


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def reply(status: int = 200, content: str | None = None) -> httpx.Response:
    if status != 200:
        return httpx.Response(status, json={"error": {"message": "no"}})
    body = {"choices": [{"message": {"content": content if content is not None else json.dumps(VERDICT)}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
    return httpx.Response(200, json=body)


def judge_with(handler, clock=None, **kw) -> tuple[OpenAIJudge, list]:
    """An OpenAIJudge whose HTTP calls go to `handler(request) -> httpx.Response`; also returns the
    list of requests sent."""
    sent: list = []

    def transport(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return handler(request)

    breaker = CircuitBreaker(open_s=1.0, max_open_s=8.0, **({"clock": clock} if clock else {}))
    judge = OpenAIJudge(base_url="http://judge.invalid/v1", model="m", api_key="k", max_retries=2,
                        retry_base_s=0.001, retry_max_s=0.002, breaker=breaker, **kw)
    judge._client = httpx.AsyncClient(transport=httpx.MockTransport(transport))
    judge._semaphore = asyncio.Semaphore(8)
    return judge, sent


def run(judge: OpenAIJudge, *answers: tuple[str, str]):
    async def go():
        try:
            return await asyncio.gather(*(judge.judge(CONVERSATION, a, b) for a, b in answers), return_exceptions=True)
        finally:
            await judge.aclose()
    return asyncio.run(go())


def test_breaker_opens_waits_probes_and_closes_with_a_capped_doubling_wait():
    clock, changes = Clock(), []
    breaker = CircuitBreaker(open_s=1.0, max_open_s=3.0, clock=clock, on_change=changes.append)
    assert breaker.state == "closed" and breaker.allows()
    breaker.record_outage("HTTP 503")
    breaker.record_outage("HTTP 503")  # a second request failing while it is open changes nothing
    assert (breaker.state, breaker.allows(), breaker.outages, changes) == ("open", False, 1, [True])
    assert breaker.seconds_until_probe() == 1.0
    clock.t += 1.0
    assert breaker.state == "half_open" and breaker.allows() and breaker.probing
    breaker.record_outage("probe failed")
    assert breaker.seconds_until_probe() == 2.0
    clock.t += 2.0
    breaker.record_outage("probe failed")
    assert breaker.seconds_until_probe() == 3.0  # capped at max_open_s
    clock.t += 3.0
    breaker.record_ok()
    assert (breaker.state, breaker.outages, changes, breaker.open_for_s()) == ("closed", 1, [True, False], 0.0)
    breaker.record_outage("again")
    assert breaker.seconds_until_probe() == 1.0 and breaker.outages == 2  # the wait starts over


@pytest.mark.parametrize("fault", [503, 500, 429, 408, "connect", "timeout"])
def test_endpoint_faults_through_the_retries_are_an_outage_and_open_the_breaker(fault):
    def handler(request):
        if fault == "connect":
            raise httpx.ConnectError("connection refused", request=request)
        if fault == "timeout":
            raise httpx.ReadTimeout("timed out", request=request)
        return reply(fault)

    judge, sent = judge_with(handler)
    first, second = run(judge, ("a", "b"), ("b", "a"))
    assert isinstance(first, EndpointUnavailable) and isinstance(second, EndpointUnavailable)
    assert judge.breaker.state == "open" and judge.breaker.outages == 1
    before = len(sent)
    judge._client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    assert isinstance(run(judge, ("a", "b"))[0], EndpointUnavailable)
    assert len(sent) == before  # while open: refused at once, no request sent


@pytest.mark.parametrize("status, content, why", [(200, "I prefer A.", "malformed verdicts after 3 attempts"),
                                                  (400, None, "HTTP 400"), (401, None, "HTTP 401"),
                                                  (404, None, "HTTP 404"), (422, None, "HTTP 422")])
def test_a_bad_verdict_or_a_4xx_is_the_records_failure_and_leaves_the_breaker_closed(status, content, why):
    judge, _ = judge_with(lambda request: reply(status, content))
    result = run(judge, ("a", "b"))[0]
    assert type(result) is JudgeFailure and why in str(result)
    assert judge.breaker.state == "closed" and judge.breaker.outages == 0


def test_a_500_or_a_read_timeout_for_one_request_while_the_endpoint_answers_others_is_that_records_failure():
    def handler(request):
        if b"STALLS" in request.content:
            raise httpx.ReadTimeout("timed out", request=request)
        return reply(500) if b"POISON" in request.content else reply()

    judge, _ = judge_with(handler)
    poison, stalls, fine = run(judge, ("POISON", "b"), ("STALLS", "b"), ("a", "b"))
    assert type(poison) is JudgeFailure and "answered other requests" in str(poison)
    assert type(stalls) is JudgeFailure and "ReadTimeout" in str(stalls)
    assert fine.winner == "A" and judge.breaker.state == "closed"


@pytest.mark.parametrize("status", [429, 503, 502, 504, 408])
def test_busy_or_unreachable_is_never_one_records_failure_even_while_others_are_answered(status):
    judge, _ = judge_with(lambda r: reply(status) if b"UNLUCKY" in r.content else reply())
    unlucky, fine = run(judge, ("UNLUCKY", "b"), ("a", "b"))
    assert isinstance(unlucky, EndpointUnavailable) and fine.winner == "A"


def test_a_half_open_probe_that_succeeds_closes_the_breaker_and_one_that_fails_reopens_it():
    clock, up = Clock(), {"now": False}
    judge, sent = judge_with(lambda r: reply() if up["now"] else reply(503), clock=clock)
    assert isinstance(run(judge, ("a", "b"))[0], EndpointUnavailable)
    clock.t += 1.0  # the wait is over: the next request is a probe, one attempt only
    judge._client = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: (sent.append(1), reply(503))[1]))
    before = len(sent)
    assert isinstance(run(judge, ("a", "b"))[0], EndpointUnavailable) and len(sent) == before + 1
    assert judge.breaker.seconds_until_probe() == 2.0
    clock.t += 2.0
    up["now"] = True
    judge._client = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: reply()))
    assert run(judge, ("a", "b"))[0].winner == "A" and judge.breaker.state == "closed"


def test_an_outage_is_no_outcome_no_abstention_no_failure_count():
    judge, _ = judge_with(lambda r: reply(502))
    stats = JudgeStats(new_registry())
    event = CandidatesEvent(producer="generator", prompt=prompt("q"), policy_version="v0001", prompt_tokens=1,
                            candidates=[Candidate(text=t, completion_tokens=1, finish_reason="stop") for t in "xy"])

    async def decide():
        try:
            return await PairwiseJudge(judge, None, stats).decide(event)
        finally:
            await judge.aclose()

    outcome = asyncio.run(decide())
    assert isinstance(outcome.outage, EndpointUnavailable)
    assert (outcome.preference, outcome.abstention, outcome.failure) == (None, None, None)
    assert stats.summary()["failures"] == 0
