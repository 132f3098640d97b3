"""`POST /v1/chat/completions`: validation, dynamic batching, JSON or SSE, response storage."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

from services.gateway.errors import APIError
from services.gateway.serving import Batcher, Job, ModelHolder
from services.gateway.settings import GatewaySettings
from services.gateway.store import ResponseStore
from shared.engine import GenerationRequest, PromptTooLong
from shared.openai_api import (AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice,
                               ChunkChoice, Delta, Usage)
from shared.prompts import with_system_prompt
from shared.wire import Candidate


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [text.find(s) for s in stops if s in text]
    return (text[: min(hits)], True) if hits else (text, False)


class ChatService:
    def __init__(self, settings: GatewaySettings, holder: ModelHolder, batcher: Batcher, store: ResponseStore) -> None:
        self.settings, self.holder, self.batcher, self.store = settings, holder, batcher, store

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
        engine = self.holder.engine
        if engine is None:
            raise APIError(503, "no model loaded yet")
        messages = with_system_prompt(body.messages, s.default_system_prompt)
        try:
            engine.encode_prompt(messages, wanted)
        except PromptTooLong as exc:
            raise APIError(400, f"this model's context is {engine.context_length} tokens: {exc}", "messages",
                           "context_length_exceeded") from exc
        return GenerationRequest(messages, body.to_sampling(s.default_max_tokens), n=body.n)

    def _finish(self, job: Job, body: ChatCompletionRequest, key: str, response_id: str) -> list[Candidate]:
        result = job.done.result()
        if result.error:
            raise APIError(400, result.error, "messages", "context_length_exceeded")
        choices = []
        for cand in result.candidates:
            text, stopped = cut_at_stop(cand.text, body.stops)
            choices.append(cand.model_copy(update={"text": text, "finish_reason": "stop" if stopped else cand.finish_reason}))
        self.store.put(response_id, key, job.request.messages, choices, job.version)
        return choices

    async def complete(self, body: ChatCompletionRequest, key: str) -> ChatCompletion:
        job = self.batcher.submit(self.prepare(body), stream=False)
        await job.done
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        choices = self._finish(job, body, key, response_id)
        result = job.done.result()
        completion = sum(c.completion_tokens for c in choices)
        return ChatCompletion(
            id=response_id, model=body.model, system_fingerprint=job.version,
            choices=[Choice(index=i, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason)
                     for i, c in enumerate(choices)],
            usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=completion,
                        total_tokens=result.prompt_tokens + completion))

    async def stream(self, body: ChatCompletionRequest, key: str) -> AsyncIterator[str]:
        request = self.prepare(body)  # validation errors surface before the stream starts
        job = self.batcher.submit(request, stream=True)
        response_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(choices, usage=None) -> str:
            # job.version is set when the batch starts, before any token or result arrives.
            return "data: " + ChatCompletionChunk(id=response_id, created=created, model=body.model,
                                                  system_fingerprint=job.version, choices=choices,
                                                  usage=usage).model_dump_json(exclude_none=False) + "\n\n"

        return self._events(job, body, key, response_id, chunk)

    async def _events(self, job: Job, body, key, response_id, chunk) -> AsyncIterator[str]:
        n = job.request.n
        sent = [""] * n
        stopped = [False] * n
        opened = False
        while True:
            getter = asyncio.ensure_future(job.deltas.get())
            done, _ = await asyncio.wait({getter, job.done}, return_when=asyncio.FIRST_COMPLETED)
            if not opened and job.version:
                opened = True
                yield chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content="")) for i in range(n)])
            if getter not in done:
                getter.cancel()
                break
            j, delta = getter.result()
            if stopped[j]:
                continue
            text, hit = cut_at_stop(sent[j] + delta, body.stops)
            piece, sent[j], stopped[j] = text[len(sent[j]):], text, hit
            if piece:
                yield chunk([ChunkChoice(index=j, delta=Delta(content=piece))])
        while not job.deltas.empty():  # tokens that arrived with the final result
            j, delta = job.deltas.get_nowait()
            if not stopped[j]:
                text, hit = cut_at_stop(sent[j] + delta, body.stops)
                piece, sent[j], stopped[j] = text[len(sent[j]):], text, hit
                if piece:
                    yield chunk([ChunkChoice(index=j, delta=Delta(content=piece))])
        choices = self._finish(job, body, key, response_id)
        if not opened:
            yield chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content="")) for i in range(n)])
        for j, c in enumerate(choices):
            if c.text.startswith(sent[j]) and len(c.text) > len(sent[j]):
                yield chunk([ChunkChoice(index=j, delta=Delta(content=c.text[len(sent[j]):]))])
        prompt_tokens = job.done.result().prompt_tokens
        completion = sum(c.completion_tokens for c in choices)
        yield chunk([ChunkChoice(index=j, delta=Delta(), finish_reason=c.finish_reason) for j, c in enumerate(choices)],
                    Usage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                          total_tokens=prompt_tokens + completion))
        yield "data: [DONE]\n\n"
