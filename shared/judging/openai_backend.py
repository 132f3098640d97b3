"""Pairwise judge over any OpenAI-compatible Chat Completions endpoint (httpx, async).

Bounded concurrency; retries with exponential backoff and jitter on 429, 5xx, timeouts,
transport errors and unusable replies, honouring Retry-After; a per-process request budget.

Failures are the endpoint's or the record's. Connection errors, timeouts, HTTP 5xx, 429 and 408
that last through the retries are an endpoint outage: the circuit breaker (`breaker.py`) opens
and `EndpointUnavailable` tells the caller to wait and try the same records again. Only a
timeout or a 500-type error (not 502/503/504, which say overloaded or unreachable) that one
request keeps getting while the endpoint answers other requests is that request's own failure
(an input that crashes or stalls the server); 429, 408, 502-504 and connection errors never are. A reply that is not a valid verdict (after retries) or any other 4xx
is the record's: `JudgeFailure`, abstained on and dead-lettered.
The API key goes only into the Authorization header; it is never logged.

Endpoints differ in what they accept. When one answers 400 naming a parameter, the request is
adapted once for the rest of the process and sent again: structured output falls back from
`json_schema` to `json_object` to none (the rubric prompt alone asks for JSON); `temperature` is
left out (reasoning models reject it); `max_tokens` becomes `max_completion_tokens`. A reply that
is not a valid verdict is retried, then the event is abstained on and dead-lettered: never
labelled. (The openai SDK would not make this smaller: the retry policy, Retry-After and these
fallbacks are ours either way.)
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import httpx
from pydantic import ValidationError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from shared.judging.breaker import CircuitBreaker
from shared.judging.prompt import build_messages, parse_verdict, response_format
from shared.wire import ChatMessage, PairVerdict

log = logging.getLogger(__name__)


class JudgeFailure(Exception):
    """A verdict could not be obtained; never turned into a label."""

    def __init__(self, message: str, attempts: int) -> None:
        super().__init__(message)
        self.attempts = attempts


class BudgetExhausted(JudgeFailure):
    pass


class EndpointUnavailable(JudgeFailure):
    """The endpoint is down (or the breaker is open): not the record's fault; wait and retry it."""


class MalformedVerdict(Exception):
    """The endpoint answered, but not with a valid verdict (not JSON, missing fields, out of range)."""


class RetryableError(Exception):
    def __init__(self, message: str, retry_after: float | None = None, outage: bool = False,
                 input_may_cause: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.outage = outage
        """the endpoint's fault (connection, timeout, 5xx, 429, 408), not the reply's"""
        self.input_may_cause = input_may_cause
        """an outage error that one input can cause (a timeout, a 500): that input's failure if the
        endpoint answers other requests meanwhile"""


UNAVAILABLE_STATUS = frozenset({408, 429, 502, 503, 504})  # busy, overloaded or unreachable: never the input's


def is_outage_status(status: int) -> bool:
    return status >= 500 or status in UNAVAILABLE_STATUS


@dataclass
class Usage:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class OpenAIJudge:
    def __init__(self, *, base_url: str, model: str, api_key: str, concurrency: int = 64, max_retries: int = 4,
                 retry_base_s: float = 0.5, retry_max_s: float = 30.0, timeout_s: float = 60.0,
                 request_budget: int = 0, structured_output: str = "json_schema", temperature: float | None = 0.0,
                 max_tokens: int = 1024, on_latency=None, breaker: CircuitBreaker | None = None) -> None:
        self.judge_id = f"openai:{model}"
        self._model = model
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self._timeout = timeout_s
        self._max_attempts = max_retries + 1
        self._backoff = wait_random_exponential(multiplier=retry_base_s, max=retry_max_s)
        self._budget = request_budget
        self._format = structured_output
        self._temperature = temperature
        self._max_tokens = max_tokens
        self._max_tokens_field = "max_tokens"
        self._on_latency = on_latency or (lambda seconds: None)
        self._semaphore: asyncio.Semaphore | None = None
        self._concurrency = concurrency
        self._client: httpx.AsyncClient | None = None
        self.breaker = breaker or CircuitBreaker()
        self.usage = Usage()
        self.malformed = 0
        """replies that were not a valid verdict (each one retried, never labelled)"""

    @property
    def requests_sent(self) -> int:
        return self.usage.requests

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, RetryableError) and exc.retry_after is not None:
            return exc.retry_after
        return self._backoff(state)

    async def judge(self, conversation: list[ChatMessage], a: str, b: str, reference: str | None = None) -> PairVerdict:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout)
            self._semaphore = asyncio.Semaphore(self._concurrency)
        messages = build_messages(conversation, a, b, reference)
        started = self.breaker.now()
        attempts = 0
        try:
            async for attempt in AsyncRetrying(stop=stop_after_attempt(self._max_attempts), wait=self._wait,
                                               retry=retry_if_exception_type(RetryableError), reraise=True):
                with attempt:
                    attempts = attempt.retry_state.attempt_number
                    return await self._attempt(messages, attempts)
        except RetryableError as exc:
            if exc.outage and not (exc.input_may_cause and self.breaker.answered_since(started)):
                self.breaker.record_outage(str(exc))
                raise EndpointUnavailable(f"judge endpoint unavailable after {attempts} attempts: {exc}",
                                          attempts) from exc
            kind = ("malformed verdicts" if isinstance(exc.__cause__, MalformedVerdict) else
                    "no usable verdict (the endpoint answered other requests meanwhile)" if exc.outage else
                    "no usable verdict")
            raise JudgeFailure(f"{kind} after {attempts} attempts: {exc}", attempts) from exc

    async def _attempt(self, messages: list[dict], attempt: int) -> PairVerdict:
        """One attempt through the breaker: refused at once while it is open; a probe while half-open."""
        if not self.breaker.allows():
            raise EndpointUnavailable(f"judge endpoint unavailable (circuit open, next probe in "
                                      f"{self.breaker.seconds_until_probe():.1f}s)", attempt - 1)
        probe = self.breaker.probing
        try:
            return await self._call(messages)
        except RetryableError as exc:
            if probe and exc.outage and self.breaker.state != "closed":  # no other probe got through either
                self.breaker.record_outage(f"probe: {exc}")
                raise EndpointUnavailable(f"judge endpoint still unavailable: {exc}", attempt) from exc
            raise

    def _body(self, messages: list[dict]) -> dict:
        body = {"model": self._model, "messages": messages, self._max_tokens_field: self._max_tokens}
        if self._temperature is not None:
            body["temperature"] = self._temperature
        if self._format != "none":
            body["response_format"] = response_format(self._format)
        return body

    def _adapt(self, response: httpx.Response) -> bool:
        """Drop or rename what a 400 says the endpoint does not take. True if the request changed."""
        text = response.text.lower()
        if "response_format" in text and self._format != "none":
            self._format = {"json_schema": "json_object", "json_object": "none"}[self._format]
            log.warning("endpoint refused the structured-output setting; now asking for %s", self._format)
        elif "temperature" in text and self._temperature is not None:
            self._temperature = None
            log.warning("endpoint refused temperature; sending none")
        elif "max_tokens" in text and "max_completion_tokens" in text and self._max_tokens_field == "max_tokens":
            self._max_tokens_field = "max_completion_tokens"
            log.warning("endpoint wants max_completion_tokens instead of max_tokens")
        else:
            return False
        return True

    async def _post(self, body: dict) -> httpx.Response:
        if self._budget and self.usage.requests >= self._budget:
            raise BudgetExhausted(f"request budget of {self._budget} exhausted", self.usage.requests)
        assert self._semaphore is not None and self._client is not None
        async with self._semaphore:
            self.usage.requests += 1
            started = time.monotonic()
            try:
                return await self._client.post(self._url, json=body, headers=self._headers)
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                raise RetryableError(f"{type(exc).__name__} calling the judge endpoint", outage=True,
                                     input_may_cause=isinstance(exc, httpx.ReadTimeout)) from exc
            finally:
                self._on_latency(time.monotonic() - started)

    async def _call(self, messages: list[dict]) -> PairVerdict:
        while True:  # a refused parameter is adapted and sent again at once: not a failed attempt
            body = self._body(messages)  # (finite: every adaptation only moves forward)
            response = await self._post(body)
            if response.status_code != 400 or not (body != self._body(messages) or self._adapt(response)):
                break
        if is_outage_status(response.status_code):
            raise RetryableError(f"HTTP {response.status_code}", _retry_after(response), outage=True,
                                 input_may_cause=response.status_code not in UNAVAILABLE_STATUS)
        self.breaker.record_ok()  # it answered: whatever is wrong now is this request's
        if response.status_code != 200:
            raise JudgeFailure(f"HTTP {response.status_code}: {response.text[:300]}", 1)
        try:
            payload = response.json()
            usage = payload.get("usage") or {}
            self.usage.prompt_tokens += int(usage.get("prompt_tokens", 0))
            self.usage.completion_tokens += int(usage.get("completion_tokens", 0))
            content = payload["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise RetryableError(f"unusable reply: {type(exc).__name__}: {str(exc)[:200]}") from exc
        try:
            return parse_verdict(content or "")
        except (ValueError, TypeError, ValidationError) as exc:
            self.malformed += 1
            detail = f"malformed verdict: {type(exc).__name__}: {str(exc)[:200]}"
            raise RetryableError(detail) from MalformedVerdict(detail)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
