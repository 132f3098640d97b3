"""`POST /v1/chat/completions`: validation, submission to the served engine (continuous
batching), JSON or SSE, response storage. A streaming client that disconnects cancels its rows."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

from services.gateway.errors import APIError
from prometheus_client import Counter

from services.gateway.settings import GatewaySettings
from services.gateway.store import ResponseStore
from shared.engine import EngineClosed, GenerationRequest, GenerationResult, Job, PromptTooLong
from shared.model_follower import ModelFollower
from shared.openai_api import (AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice,
                               ChunkChoice, Delta, Usage)
from shared.prompts import with_system_prompt
from shared.wire import Candidate


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [text.find(s) for s in stops if s in text]
    return (text[: min(hits)], True) if hits else (text, False)


class ChatService:
    def __init__(self, settings: GatewaySettings, follower: ModelFollower, store: ResponseStore,
                 tokens: Counter) -> None:
        self.settings, self.follower, self.store, self.tokens = settings, follower, store, tokens

    def prepare(self, body: ChatCompletionRequest) -> GenerationRequest:
        s = self.settings
        if body.n > s.max_n:
            raise APIError(400, f"n must be at most {s.max_n}", "n")
        if len(body.messages) > s.max_messages:
            raise APIError(400, f"at most {s.max_messages} messages per request", "messages")
        if body.response_format is not None and body.response_format.type != "text":
            raise APIError(400, f"response_format {body.response_format.type!r} is not supported: this server samples "
                                "without constrained decoding; send type 'text' or none", "response_format",
                           "unsupported_parameter")
        chars = sum(len(m.content) for m in body.messages)
        if chars > s.max_prompt_chars:
            raise APIError(400, f"the messages hold {chars} characters together; the limit is {s.max_prompt_chars}",
                           "messages", "prompt_too_large")
        wanted = body.wanted_tokens(s.default_max_tokens)
        if wanted > s.max_tokens_cap:
            raise APIError(400, f"max_tokens must be at most {s.max_tokens_cap}", "max_tokens")
        messages = with_system_prompt(body.messages, s.default_system_prompt)
        return GenerationRequest(messages, body.to_sampling(s.default_max_tokens), n=body.n)

    def submit(self, request: GenerationRequest, on_token=None) -> tuple[Job, str]:
        """Hand the request to the served engine; returns the job and the version that runs it."""
        for _ in range(3):
            engine = self.follower.engine
            if engine is None:
                raise APIError(503, "no model loaded yet")
            try:
                return engine.submit(request, on_token), engine.version
            except EngineClosed:
                continue  # swapped between reading and submitting: the new engine takes it
            except PromptTooLong as exc:
                raise APIError(400, f"this model's context is {engine.context_length} tokens: {exc}", "messages",
                               "context_length_exceeded") from exc
        raise APIError(503, "the model is being swapped; try again")

    def _finish(self, result: GenerationResult, request: GenerationRequest, body: ChatCompletionRequest, key: str,
                response_id: str, version: str) -> list[Candidate]:
        if result.error:
            raise APIError(503 if "generation failed" in result.error else 400, result.error, "messages")
        choices = []
        for cand in result.candidates:
            text, stopped = cut_at_stop(cand.text, body.stops)
            choices.append(cand.model_copy(update={"text": text, "finish_reason": "stop" if stopped else cand.finish_reason}))
        self.tokens.inc(sum(c.completion_tokens for c in result.candidates))
        self.store.put(response_id, key, request.messages, choices, version)
        return choices

    async def complete(self, body: ChatCompletionRequest, key: str) -> ChatCompletion:
        request = self.prepare(body)
        job, version = self.submit(request)
        try:
            result = await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:
            job.cancel()
            raise
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        choices = self._finish(result, request, body, key, response_id, version)
        completion = sum(c.completion_tokens for c in choices)
        return ChatCompletion(
            id=response_id, model=body.model, system_fingerprint=version,
            choices=[Choice(index=i, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason)
                     for i, c in enumerate(choices)],
            usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=completion,
                        total_tokens=result.prompt_tokens + completion))

    async def stream(self, body: ChatCompletionRequest, key: str) -> AsyncIterator[str]:
        request = self.prepare(body)  # validation errors surface before the stream starts
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue = asyncio.Queue()
        job, version = self.submit(request, lambda j, delta: loop.call_soon_threadsafe(deltas.put_nowait, (j, delta)))
        job.future.add_done_callback(lambda _: loop.call_soon_threadsafe(deltas.put_nowait, None))
        response_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(choices, usage=None) -> str:
            return "data: " + ChatCompletionChunk(id=response_id, created=created, model=body.model,
                                                  system_fingerprint=version, choices=choices,
                                                  usage=usage).model_dump_json(exclude_none=False) + "\n\n"

        return self._events(job, request, deltas, body, key, response_id, version, chunk)

    async def _events(self, job: Job, request, deltas: asyncio.Queue, body, key, response_id, version,
                      chunk) -> AsyncIterator[str]:
        n = request.n
        sent, stopped = [""] * n, [False] * n
        try:
            yield chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content="")) for i in range(n)])
            while (item := await deltas.get()) is not None:
                j, delta = item
                if stopped[j]:
                    continue
                text, hit = cut_at_stop(sent[j] + delta, body.stops)
                piece, sent[j], stopped[j] = text[len(sent[j]):], text, hit
                if piece:
                    yield chunk([ChunkChoice(index=j, delta=Delta(content=piece))])
            result = job.future.result()
            choices = self._finish(result, request, body, key, response_id, version)
            for j, c in enumerate(choices):  # whatever the incremental decode held back
                if c.text.startswith(sent[j]) and len(c.text) > len(sent[j]):
                    yield chunk([ChunkChoice(index=j, delta=Delta(content=c.text[len(sent[j]):]))])
            completion = sum(c.completion_tokens for c in choices)
            yield chunk([ChunkChoice(index=j, delta=Delta(), finish_reason=c.finish_reason)
                         for j, c in enumerate(choices)],
                        Usage(prompt_tokens=result.prompt_tokens, completion_tokens=completion,
                              total_tokens=result.prompt_tokens + completion))
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # a client that went away frees its rows at the next step (no-op when finished)
