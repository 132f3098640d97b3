"""The consume loop with more than one batch in flight (the generator's setting), on the real broker:
a later batch is handled while an earlier one still runs, and offsets are committed oldest first,
never past a batch that has not finished."""

from __future__ import annotations

import threading
import uuid

import pytest

from shared.topics import PROMPTS
from tests.helpers import prompt, wait_for
from tests.integration.test_kafka_layer import Collector, committed


class HeldFirst(Collector):
    """Holds the batch holding `first` until `release` is set; records which batches started and ended."""

    def __init__(self, *args, first, **kw):
        super().__init__(*args, **kw)
        self.first = first
        self.release = threading.Event()
        self.started: list[str] = []
        self.ended: list[str] = []

    def handle(self, batch):
        ids = [r.event.id for r in batch]
        self.started += ids
        if self.first.id in ids:
            self.release.wait(60)
        super().handle(batch)
        self.ended += ids


def total(kafka, group, topic) -> int:
    return sum(o or 0 for o in committed(kafka.bootstrap_servers, group, topic).values())


def test_a_batch_arriving_while_one_runs_is_handled_at_once_and_committed_after_it(kafka, producer):
    topic = PROMPTS.with_prefix(kafka.topic_prefix)
    first, second = prompt("a long batch"), prompt("a short batch that comes later")
    group = f"g-{uuid.uuid4().hex[:8]}"
    with HeldFirst(topic, kafka, producer, group=group, first=first, batch_size=1, max_in_flight=2) as c:
        producer.publish(topic, [first], key="one-partition")
        wait_for(lambda: c.started == [first.id], 30, "the first batch started")
        producer.publish(topic, [second], key="one-partition")
        wait_for(lambda: c.ended == [second.id], 30, "the second batch handled while the first runs")
        # Its offset is after the first's on the same partition: committing it would skip the first on a crash.
        with pytest.raises(AssertionError, match="timed out"):
            wait_for(lambda: total(kafka, group, topic) > 0, 2.0, "a commit past the batch still in flight")
        c.release.set()
        wait_for(lambda: total(kafka, group, topic) == 2, 30, "both batches committed once the first finished")
    assert c.ended == [second.id, first.id]


def test_a_stop_while_the_oldest_batch_runs_commits_neither_and_both_are_redelivered(kafka, producer):
    topic = PROMPTS.with_prefix(kafka.topic_prefix)
    first, second = prompt("held past the grace"), prompt("finished, but after the held one")
    group = f"g-{uuid.uuid4().hex[:8]}"
    held = HeldFirst(topic, kafka, producer, group=group, first=first, batch_size=1, max_in_flight=2,
                     shutdown_grace_s=0.5)
    try:
        with held:
            producer.publish(topic, [first], key="one-partition")
            wait_for(lambda: held.started == [first.id], 30, "the first batch started")
            producer.publish(topic, [second], key="one-partition")
            wait_for(lambda: held.ended == [second.id], 30, "the second batch handled")
        assert held.loop.abandoned_batches == 2
        assert total(kafka, group, topic) == 0
    finally:
        held.release.set()
    with Collector(topic, kafka, producer, group=group) as again:
        wait_for(lambda: len(again.seen) == 2, 30, "both records redelivered to the group")
    assert [r.event.id for r in again.seen] == [first.id, second.id]


def test_one_batch_in_flight_is_the_default_and_zero_is_refused(kafka, producer):
    topic = PROMPTS.with_prefix(kafka.topic_prefix)
    first, second = prompt("one at a time"), prompt("waits for it")
    with HeldFirst(topic, kafka, producer, first=first, batch_size=1) as c:
        producer.publish(topic, [first, second], key="one-partition")
        wait_for(lambda: c.started == [first.id], 30, "the first batch started")
        with pytest.raises(AssertionError, match="timed out"):
            wait_for(lambda: second.id in c.started, 1.5, "the second batch starting while the first runs")
        c.release.set()
        wait_for(lambda: c.ended == [first.id, second.id], 30, "both batches, in turn")
    with pytest.raises(ValueError, match="max_in_flight must be at least 1"):
        Collector(topic, kafka, producer, max_in_flight=0)
