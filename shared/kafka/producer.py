"""Idempotent, acks=all producer for wire events.

A failed publish raises `BrokerUnavailable` and renews the underlying client: a restarted broker
may not know the old producer id (Tansu forgets them), and a fresh client gets a new one. The
consume loop treats `BrokerUnavailable` as the broker's fault, not the record's: it retries the
batch until the broker is back, and never dead-letters a record for it."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from kafka import KafkaProducer
from kafka.errors import KafkaError

from shared.kafka.codec import encode
from shared.settings import KafkaSettings
from shared.topics import Topic
from shared.wire import Event

log = logging.getLogger(__name__)


class BrokerUnavailable(Exception):
    """Publishing failed for the broker's sake (down, timed out, lost our producer id)."""


class EventProducer:
    def __init__(self, kafka: KafkaSettings, service: str, max_block_ms: int = 30_000) -> None:
        self._settings = kafka
        self._service = service
        self._max_block_ms = max_block_ms
        self._producer: KafkaProducer | None = None  # connects on the first send

    def _connect(self) -> KafkaProducer:
        kafka = self._settings
        return KafkaProducer(
            bootstrap_servers=kafka.bootstrap_servers.split(","),
            client_id=f"{kafka.client_id}-{self._service}",
            acks="all",
            enable_idempotence=True,
            linger_ms=5,
            request_timeout_ms=kafka.request_timeout_ms,
            max_block_ms=self._max_block_ms,
        )

    def renew(self) -> None:
        """Drop the client; the next send connects afresh (with a new producer id)."""
        old, self._producer = self._producer, None
        if old is not None:
            _discard(old)

    def send(self, topic: Topic, event: Event, key: str | None = None):
        """Queue one event; returns kafka-python's future. Use `publish` to wait for acks."""
        if not isinstance(event, topic.schema):
            raise TypeError(f"{topic.name} carries {topic.schema.__name__}, got {type(event).__name__}")
        headers = [("schema", type(event).__name__.encode()), ("schema_version", str(event.schema_version).encode())]
        producer = self._producer  # one read: another thread may renew meanwhile
        if producer is None:
            try:
                producer = self._producer = self._connect()
            except KafkaError as exc:
                raise BrokerUnavailable(f"cannot connect to {self._settings.bootstrap_servers}: {exc!r}") from exc
        return producer.send(topic.name, value=encode(event), key=(key or event.id).encode(), headers=headers)

    def publish(self, topic: Topic, events: Iterable[Event], key: str | None = None,
                timeout_s: float | None = None) -> int:
        """Send events and block until every one is acknowledged; `BrokerUnavailable` if any is not."""
        try:
            futures = [self.send(topic, event, key) for event in events]
            for future in futures:
                future.get(timeout=timeout_s or self._settings.produce_timeout_s)
        except KafkaError as exc:
            log.warning("publish to %s failed (%r); renewing the producer", topic.name, exc)
            self.renew()
            raise BrokerUnavailable(f"publish to {topic.name} failed: {exc!r}") from exc
        return len(futures)

    def flush(self, timeout_s: float | None = None) -> None:
        if self._producer is not None:
            self._producer.flush(timeout=timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        if self._producer is not None:
            _discard(self._producer, timeout_s)
            self._producer = None


def _discard(producer: KafkaProducer, timeout_s: float = 0.5) -> None:
    """Close a client even when its records cannot be flushed: kafka-python's `close` flushes
    first and, if that times out, raises and leaves its sender thread running."""
    try:
        producer.close(timeout=timeout_s)
    except Exception:  # noqa: BLE001 - unflushable records: the broker is gone, force it
        sender = getattr(producer, "_sender", None)
        if sender is not None:
            sender.force_close()
        producer._closed = True  # so __del__ does not try (and fail) again
