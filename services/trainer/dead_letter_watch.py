"""Counts every dead-letter topic's records by (topic, error kind, time) for the console's judge
health view. It reads with no consumer group from the beginning and keeps the counts in memory: a
restart counts again from what the broker still holds (its retention bounds the history)."""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime

from kafka import KafkaConsumer, TopicPartition

from shared.kafka import DecodeError, decode
from shared.settings import KafkaSettings
from shared.topics import ALL_TOPICS

log = logging.getLogger(__name__)


class DeadLetterWatch:
    def __init__(self, kafka: KafkaSettings, refresh_s: float = 30.0) -> None:
        self._kafka, self._refresh_s = kafka, refresh_s
        self._topics = {t.with_prefix(kafka.topic_prefix).dead_letter.name: t.with_prefix(kafka.topic_prefix).dead_letter
                        for t in ALL_TOPICS}
        self._lock = threading.Lock()
        self._seen: list[tuple[datetime, str]] = []
        """(dead-lettered at, `original topic: error kind`) per record"""

    def records(self) -> list[tuple[datetime, str]]:
        with self._lock:
            return list(self._seen)

    def run(self, stop: threading.Event) -> None:
        """The watcher thread's body: assign the dead-letter topics that exist (again every `refresh_s`)
        and count what arrives, until `stop`."""
        consumer = KafkaConsumer(bootstrap_servers=self._kafka.bootstrap_servers.split(","), group_id=None,
                                 enable_auto_commit=False, client_id=f"{self._kafka.client_id}-trainer-dlq-watch")
        assigned: set[TopicPartition] = set()
        next_refresh = 0.0
        try:
            while not stop.is_set():
                if (now := time.monotonic()) >= next_refresh:
                    next_refresh = now + self._refresh_s
                    wanted = {TopicPartition(name, p) for name in self._topics
                              for p in (consumer.partitions_for_topic(name) or ())}
                    if fresh := wanted - assigned:
                        assigned |= fresh
                        consumer.assign(sorted(assigned))
                        consumer.seek_to_beginning(*fresh)
                if not assigned:
                    stop.wait(min(1.0, self._refresh_s))
                    continue
                for records in consumer.poll(timeout_ms=500).values():
                    for r in records:
                        self._count(r.topic, r.value)
        finally:
            consumer.close()

    def _count(self, topic: str, value: bytes | None) -> None:
        try:
            letter = decode(self._topics[topic], value)
        except DecodeError as exc:
            log.warning("%s: a record that is not a dead letter (%s)", topic, exc)
            return
        with self._lock:
            self._seen.append((letter.created_at, f"{letter.original_topic}: {letter.error_kind}"))

