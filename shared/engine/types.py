"""What callers hand the engine and get back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from shared.wire import Candidate, ChatMessage, SamplingParams


class PromptTooLong(ValueError):
    pass


@dataclass(frozen=True)
class GenerationRequest:
    messages: list[ChatMessage]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    n: int = 1

    def __post_init__(self) -> None:
        if self.n < 1:  # no candidate would ever finish the request
            raise ValueError(f"n must be at least 1, got {self.n}")


@dataclass
class GenerationResult:
    prompt_tokens: int
    candidates: list[Candidate]
    truncated: bool = False
    error: str | None = None


TokenCallback = Callable[[int, str], None]
"""on_token(choice index, text delta), called from the engine's thread"""
