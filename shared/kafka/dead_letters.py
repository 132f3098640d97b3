"""Dead letters: what a consume loop (or a handler rejecting a record itself) sends to
`<topic>.dlq`, with the record's origin, payload and the reason."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Generic, TypeVar

from shared.kafka.producer import EventProducer, PublishRejected
from shared.topics import Topic
from shared.wire import DeadLetter, Event, ServiceName

E = TypeVar("E", bound=Event)


@dataclass(frozen=True)
class Received(Generic[E]):
    event: E
    topic: str
    partition: int
    offset: int
    key: str | None
    raw: bytes = b""

    def dead_letter(self, service: ServiceName, kind: str, error: str, attempts: int) -> DeadLetter:
        """A dead letter for this record, for handlers that reject a record themselves."""
        return make_dead_letter(self.topic, self.partition, self.offset, self.key, self.raw, kind, error,
                                service, attempts)


def make_dead_letter(topic: str, partition: int, offset: int, key: str | None, value: bytes | None, kind: str,
                     error: str, service: ServiceName, attempts: int) -> DeadLetter:
    value = value or b""
    try:
        payload, encoding = value.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        payload, encoding = base64.b64encode(value).decode("ascii"), "base64"
    return DeadLetter(producer=service, original_topic=topic, partition=partition, offset=offset, key=key,
                      payload=payload, payload_encoding=encoding, error_kind=kind, error=error, service=service,
                      attempts=attempts)


def original_value(dead: DeadLetter) -> bytes:
    """The original record's value, as the dead letter carries it."""
    return base64.b64decode(dead.payload) if dead.payload_encoding == "base64" else dead.payload.encode("utf-8")


def reason_of(dead: DeadLetter) -> str:
    """A dead letter's reason without its record-specific tail, for counting: the error kind and the
    error's first two clauses ("handler: judge failed: HTTP 404")."""
    return f"{dead.error_kind}: {': '.join(dead.error.split(': ')[:2])[:120]}"


def publish_dead_letters(producer: EventProducer, dlq: Topic, dead: list[DeadLetter]) -> None:
    """Publish dead letters to `dlq` and wait for the acks. A dead letter wraps the original
    payload, so it can exceed the size limit its record met: such a one goes out with its payload
    cut to half the producer's `max_message_bytes`, saying so in `error`. `BrokerUnavailable`
    propagates."""
    try:
        producer.publish(dlq, dead)
        return
    except PublishRejected:
        pass
    for d in dead:
        try:
            producer.publish(dlq, [d])
        except PublishRejected as exc:
            whole = d.payload.encode()
            kept = whole[: producer.max_message_bytes // 8 * 4].decode("utf-8", "ignore")  # base64 stays whole quads
            cut = d.model_copy(update={"payload": kept, "error": f"{d.error} [payload cut from {len(whole)} to "
                                                                 f"{len(kept.encode())} bytes: {exc}]"})
            producer.publish(dlq, [cut])
