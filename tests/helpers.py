"""Helpers shared by tests: waiting on conditions with a deadline, reading topics."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from kafka import KafkaConsumer, TopicPartition

from shared.kafka.codec import decode
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
    """Read raw records from the beginning of `topic` (no group, no commits) until `count`
    arrived. Does not rely on end_offsets (wrong on Tansu)."""
    consumer = KafkaConsumer(bootstrap_servers=[bootstrap], group_id=None, enable_auto_commit=False)
    try:
        parts = wait_for(lambda: consumer.partitions_for_topic(topic.name), 10, f"metadata for {topic.name}")
        tps = [TopicPartition(topic.name, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        out: list = []
        deadline = time.monotonic() + timeout_s
        while len(out) < count and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                out.extend(records)
        return out
    finally:
        consumer.close()


def read_events(bootstrap: str, topic: Topic, count: int, timeout_s: float = 20.0) -> list:
    return [decode(topic, r.value) for r in read_records(bootstrap, topic, count, timeout_s)]


def prompt(text: str, **kw) -> PromptEvent:
    return PromptEvent(producer="test", messages=[ChatMessage(role="user", content=text)], **kw)


def random_tiny_model(hidden: int = 16, layers: int = 1):
    """An untrained tiny Llama + the project's tokenizer: fast, for registry/plumbing tests."""
    from services.trainer.bootstrap import TinyModelSpec, build_tiny_model, build_tokenizer

    tok = build_tokenizer(["hello there", "see a doctor", "I am sorry you feel unwell"], 300)
    spec = TinyModelSpec(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                         num_attention_heads=2)
    return build_tiny_model(tok, spec), tok
