"""Read a topic from the beginning without a consumer group (no commits): for reports and
tests. Stops at `count` records, or after `idle_s` with nothing new, or at `timeout_s`;
does not rely on end_offsets (wrong on Tansu)."""

from __future__ import annotations

import time

from kafka import KafkaConsumer, TopicPartition

from shared.kafka.codec import decode
from shared.topics import Topic


def read_records(bootstrap: str, topic: Topic, count: int | None = None, timeout_s: float = 20.0,
                 idle_s: float | None = None) -> list:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap.split(","), group_id=None, enable_auto_commit=False)
    try:
        deadline = time.monotonic() + timeout_s
        parts = None
        while not parts and time.monotonic() < deadline:
            parts = consumer.partitions_for_topic(topic.name)
            if not parts:
                time.sleep(0.1)
        if not parts:
            return []
        tps = [TopicPartition(topic.name, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        out: list = []
        last_new = time.monotonic()
        while time.monotonic() < deadline and (count is None or len(out) < count):
            batch = [r for records in consumer.poll(timeout_ms=200).values() for r in records]
            if batch:
                out.extend(batch)
                last_new = time.monotonic()
            elif idle_s is not None and time.monotonic() - last_new >= idle_s:
                break
        return out
    finally:
        consumer.close()


def read_events(bootstrap: str, topic: Topic, count: int | None = None, timeout_s: float = 20.0,
                idle_s: float | None = None) -> list:
    return [decode(topic, r.value) for r in read_records(bootstrap, topic, count, timeout_s, idle_s)]
