"""Idempotent, acks=all producer for wire events.

A publish fails in one of two ways:
- `PublishRejected`: the record itself can never be written as it is (too large for
  `max_request_size` or the broker's limit, an invalid record or topic). Retrying is pointless;
  the consume loop dead-letters the record that produced it, with the reason.
- `BrokerUnavailable`: anything else (broker down, timeouts, no leader, a producer id a
  restarted broker forgot, missing authorization). The underlying client is renewed (a fresh
  producer id) and the consume loop waits the broker out; no record is blamed for it."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from kafka import KafkaProducer
from kafka.errors import (CorruptRecordError, InvalidRecordError, InvalidTimestampError, InvalidTopicError,
                          KafkaError, MessageSizeTooLargeError, RecordListTooLargeError)

from shared.kafka.codec import encode
from shared.settings import KafkaSettings
from shared.topics import Topic
from shared.wire import Event

log = logging.getLogger(__name__)


# Errors about the record or request itself: the same record fails again however long we wait.
# kafka-python's `.retriable` is not enough on its own: e.g. BrokerNotAvailableError and
# UnknownProducerIdError are "not retriable" for the same client, yet a renewed client gets past them.
RECORD_ERRORS = (MessageSizeTooLargeError, RecordListTooLargeError, InvalidRecordError, CorruptRecordError,
                 InvalidTopicError, InvalidTimestampError)


class Unavailable(Exception):
    """A dependency a handler needs is down (the broker, the judge endpoint): not the records' fault.
    The consume loop waits (`retry_after_s` if given, else its own backoff) and runs the batch again."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BrokerUnavailable(Unavailable):
    """Publishing failed for the broker's sake (down, timed out, lost our producer id)."""


class PublishRejected(Exception):
    """The broker (or the client, before sending) refuses this record for good, e.g. too large."""


def is_permanent(exc: BaseException) -> bool:
    """True if retrying the same record cannot succeed (see RECORD_ERRORS)."""
    return isinstance(exc, RECORD_ERRORS)


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
            max_request_size=kafka.max_message_bytes,
            request_timeout_ms=kafka.request_timeout_ms,
            max_block_ms=self._max_block_ms,
            # kafka-python waits 30 s for a first connection by default, whatever max_block_ms says:
            # a producer renewed during an outage would hold its caller (a chat request's feedback,
            # an announcement) that long instead of failing over within its budget
            bootstrap_timeout_ms=self._max_block_ms,
        )

    @property
    def max_message_bytes(self) -> int:
        return self._settings.max_message_bytes

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
        """Send events and block until every one is acknowledged. `PublishRejected` if a record can
        never be written (the others may have been); `BrokerUnavailable` for any other failure."""
        try:
            futures = [self.send(topic, event, key) for event in events]
            for future in futures:
                future.get(timeout=timeout_s or self._settings.produce_timeout_s)
        except KafkaError as exc:
            if is_permanent(exc):
                log.warning("publish to %s rejected for good: %r", topic.name, exc)
                raise PublishRejected(f"{topic.name} refuses the record: {exc!r}") from exc
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
