"""HTTP bodies of the gateway's OpenAI-compatible API (shaped like OpenAI's) and its feedback API."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.wire import ChatMessage, SamplingParams


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema"]


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use

    messages: list[ChatMessage] = Field(min_length=1)
    model: str = "prefloop"
    # strict: "2" or 0 for a number or a flag is an error, as in OpenAI's API, not a silent coercion
    temperature: float = Field(0.7, ge=0.0, le=2.0, strict=True)
    top_p: float = Field(0.9, gt=0.0, le=1.0, strict=True)
    max_tokens: int | None = Field(None, ge=1, strict=True)
    max_completion_tokens: int | None = Field(None, ge=1, strict=True)
    n: int = Field(1, ge=1, strict=True)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1, strict=True)  # torch seeds are 64-bit
    stream: bool = Field(False, strict=True)
    user: str | None = None
    response_format: ResponseFormat | None = None
    """Only `text`: the engine samples without constrained decoding, so JSON output cannot be
    promised; a request for it gets a 400 naming the parameter rather than a silent ignore."""

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @model_validator(mode="after")
    def _ends_with_user(self) -> "ChatCompletionRequest":
        if self.messages[-1].role != "user":
            raise ValueError("the last message must have role 'user'")
        return self

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def wanted_tokens(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default

    def to_sampling(self, default_max_tokens: int) -> SamplingParams:
        # temperature 0 means greedy in OpenAI's API; sampling needs > 0, so use a tiny value.
        return SamplingParams(temperature=max(self.temperature, 1e-4), top_p=self.top_p, top_k=0,
                              max_new_tokens=self.wanted_tokens(default_max_tokens), seed=self.seed)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "prefloop"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class FeedbackRequest(BaseModel):
    """A rating (+1/-1) of one choice, or which of two choices the user preferred."""

    model_config = ConfigDict(extra="forbid")

    response_id: str = Field(min_length=1, max_length=200)
    choice_index: int | None = Field(None, ge=0, strict=True)
    rating: Literal[-1, 1] | None = None
    preferred_index: int | None = Field(None, ge=0, strict=True)
    comment: str | None = Field(None, max_length=2000)

    @field_validator("rating", mode="before")
    @classmethod
    def _integer_rating(cls, value):
        if value is not None and type(value) is not int:  # Literal alone would take True and 1.0
            raise ValueError("rating must be the integer 1 or -1")
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> "FeedbackRequest":
        if (self.rating is None) == (self.preferred_index is None):
            raise ValueError("send either rating (with choice_index) or preferred_index")
        if self.rating is not None and self.choice_index is None:
            raise ValueError("a rating needs choice_index")
        return self


class FeedbackAccepted(BaseModel):
    id: str
    status: Literal["accepted", "queued"]
    """`queued`: the broker was unreachable; the feedback is in the durable outbox."""


class AdminResult(BaseModel):
    served_version: str
    detail: str
