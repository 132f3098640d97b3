"""Idempotent, acks=all producer for wire events."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from kafka import KafkaProducer

from shared.kafka.codec import encode
from shared.settings import KafkaSettings
from shared.topics import Topic
from shared.wire import Event

log = logging.getLogger(__name__)


class EventProducer:
    def __init__(self, kafka: KafkaSettings, service: str, max_block_ms: int = 30_000) -> None:
        self._settings = kafka
        self._service = service
        self._producer = KafkaProducer(
            bootstrap_servers=kafka.bootstrap_servers.split(","),
            client_id=f"{kafka.client_id}-{service}",
            acks="all",
            enable_idempotence=True,
            linger_ms=5,
            request_timeout_ms=kafka.request_timeout_ms,
            max_block_ms=max_block_ms,
        )

    def send(self, topic: Topic, event: Event, key: str | None = None):
        """Queue one event; returns kafka-python's future. Use `publish` to wait for acks."""
        if not isinstance(event, topic.schema):
            raise TypeError(f"{topic.name} carries {topic.schema.__name__}, got {type(event).__name__}")
        headers = [("schema", type(event).__name__.encode()), ("schema_version", str(event.schema_version).encode())]
        return self._producer.send(topic.name, value=encode(event), key=(key or event.id).encode(), headers=headers)

    def publish(self, topic: Topic, events: Iterable[Event], key: str | None = None,
                timeout_s: float | None = None) -> int:
        """Send events and block until every one is acknowledged (raises on any failure)."""
        futures = [self.send(topic, event, key) for event in events]
        for future in futures:
            future.get(timeout=timeout_s or self._settings.produce_timeout_s)
        return len(futures)

    def flush(self, timeout_s: float | None = None) -> None:
        self._producer.flush(timeout=timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        try:
            self._producer.flush(timeout=timeout_s)
        finally:
            self._producer.close(timeout=timeout_s)
