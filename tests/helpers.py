"""Helpers shared by tests: waiting on conditions with a deadline, reading topics."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from shared.kafka import reader
from shared.topics import Topic
from shared.wire import ChatMessage, PromptEvent

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout_s: float = 30.0, what: str = "condition", interval_s: float = 0.05) -> T:
    """Poll `condition` until it returns something truthy; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


def read_records(bootstrap: str, topic: Topic, count: int, timeout_s: float = 20.0) -> list:
    """Raw records from the beginning of `topic` until `count` arrived (or the timeout)."""
    return reader.read_records(bootstrap, topic, count, timeout_s)


def read_events(bootstrap: str, topic: Topic, count: int, timeout_s: float = 20.0) -> list:
    return reader.read_events(bootstrap, topic, count, timeout_s)


def prompt(text: str, **kw) -> PromptEvent:
    return PromptEvent(producer="test", messages=[ChatMessage(role="user", content=text)], **kw)


def random_tiny_model(hidden: int = 16, layers: int = 1):
    """An untrained tiny Llama + the project's tokenizer: fast, for registry/plumbing tests."""
    from services.trainer.bootstrap import TinyModelSpec, build_tiny_model, build_tokenizer

    tok = build_tokenizer(["hello there", "see a doctor", "I am sorry you feel unwell"], 300)
    spec = TinyModelSpec(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                         num_attention_heads=2)
    return build_tiny_model(tok, spec), tok
