"""The at-least-once Kafka layer against the real embedded broker."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client import CollectorRegistry

from shared.kafka import ConsumeLoop, EventProducer
from shared.topics import ALL_TOPICS, PROMPTS
from tests.helpers import prompt, read_events, read_records, wait_for
from tests.unit.test_wire import sample_events

ROOT = Path(__file__).resolve().parents[2]


class Collector:
    """An in-process loop on a topic that records what its handler saw."""

    def __init__(self, topic, kafka, producer, group=None, fail_on=None, **kw):
        self.seen: list = []
        self.calls = 0
        self.fail_on = fail_on
        self.loop = ConsumeLoop(topic, group_id=group or f"g-{uuid.uuid4().hex[:8]}", handler=self.handle,
                                kafka=kafka, producer=producer, service="test", registry=CollectorRegistry(),
                                retry_wait_s=0.01, **kw)
        self.thread = threading.Thread(target=self.loop.run, daemon=True)

    def handle(self, batch):
        self.calls += 1
        for r in batch:
            if self.fail_on and self.fail_on(r.event):
                raise RuntimeError(f"cannot handle {r.event.id}")
        self.seen.extend(batch)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.loop.stop()
        self.thread.join(15)
        assert not self.thread.is_alive()


def committed(bootstrap, group, topic) -> dict[int, int | None]:
    c = KafkaConsumer(bootstrap_servers=[bootstrap], group_id=group, enable_auto_commit=False)
    try:
        return {p: c.committed(TopicPartition(topic.name, p)) for p in range(topic.partitions)}
    finally:
        c.close()


def spawn(kafka, topic, group, out: Path, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.integration.consumer_proc", kafka.bootstrap_servers,
                             topic.name, group, str(out), *extra], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=open(str(out) + ".log", "ab"))


def lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []


def handled_ids(out: Path, pid=None) -> list[str]:
    return [i for x in lines(out) if x["kind"] == "handled" and (pid is None or x["pid"] == pid) for i in x["ids"]]


@pytest.mark.parametrize("base", ALL_TOPICS, ids=lambda t: t.schema.__name__)
def test_every_schema_round_trips_through_the_broker(base, kafka, producer):
    topic = base.with_prefix(kafka.topic_prefix)
    event = sample_events()[base]
    producer.publish(topic, [event])
    with Collector(topic, kafka, producer) as c:
        wait_for(lambda: c.seen, 20, "the event to be consumed")
    assert c.seen[0].event == event and type(c.seen[0].event) is type(event)
    assert c.seen[0].key == event.id


def test_producer_refuses_an_event_of_the_wrong_schema(kafka, producer):
    with pytest.raises(TypeError, match="carries PromptEvent"):
        producer.send(PROMPTS.with_prefix(kafka.topic_prefix), sample_events()[ALL_TOPICS[2]])


def test_poison_messages_go_to_the_dlq_with_reasons_and_the_loop_goes_on(kafka, producer):
    topic = PROMPTS.with_prefix(kafka.topic_prefix)
    raw = KafkaProducer(bootstrap_servers=kafka.bootstrap_servers.split(","))  # bytes no event model allows
    for value in (b"not json", b'{"schema_version": 7, "producer": "test"}',
                  b'{"schema_version": 1, "producer": "test", "messages": []}'):
        raw.send(topic.name, value=value, key=b"k", partition=0)
    raw.flush(10)
    raw.close()
    boom, good = prompt("boom please"), prompt("a perfectly good question")
    producer.send(topic, boom).get(10)
    raw.flush()
    group = f"g-{uuid.uuid4().hex[:8]}"
    with Collector(topic, kafka, producer, group=group, max_attempts=3,
                   fail_on=lambda e: "boom" in e.messages[-1].content) as c:
        producer.publish(topic, [good])
        wait_for(lambda: any(r.event.id == good.id for r in c.seen), 30, "the good message after the poison ones")
        dead = read_events(kafka.bootstrap_servers, topic.dead_letter, 4)
        assert {d.error_kind for d in dead} == {"decode", "schema_version", "validation", "handler"}
        by_kind = {d.error_kind: d for d in dead}
        assert "not JSON" in by_kind["decode"].error and by_kind["decode"].payload == "not json"
        assert "unknown schema_version 7" in by_kind["schema_version"].error
        assert "messages" in by_kind["validation"].error
        assert by_kind["handler"].attempts == 3 and "cannot handle" in by_kind["handler"].error
        assert json.loads(by_kind["handler"].payload)["id"] == boom.id
        assert all(d.original_topic == topic.name and d.service == "test" for d in dead)
        wait_for(lambda: sum(o or 0 for o in committed(kafka.bootstrap_servers, group, topic).values()) == 5,
                 15, "offsets committed past the dead-lettered records")
    assert all(r.event.id != boom.id for r in c.seen)


def test_failing_batch_is_split_so_only_the_bad_record_is_dead_lettered(kafka, producer):
    topic = PROMPTS.with_prefix(kafka.topic_prefix)
    events = [prompt(f"question {i}") for i in range(5)] + [prompt("boom")]
    producer.publish(topic, events, key="same-partition")
    with Collector(topic, kafka, producer, batch_size=6, batch_timeout_ms=2000, max_attempts=2,
                   fail_on=lambda e: e.messages[-1].content == "boom") as c:
        wait_for(lambda: len(c.seen) == 5, 30, "the five good records")
        dead = read_events(kafka.bootstrap_servers, topic.dead_letter, 1)
    assert [d.attempts for d in dead] == [2] and json.loads(dead[0].payload)["id"] == events[-1].id
    assert {r.event.id for r in c.seen} == {e.id for e in events[:5]}


def test_crash_before_commit_redelivers_and_committed_work_is_not_redelivered(kafka, producer, tmp_path):
    topic = PROMPTS.with_prefix(kafka.topic_prefix)
    group, out = f"g-{uuid.uuid4().hex[:8]}", tmp_path / "c.jsonl"
    first, second = prompt("first question"), prompt("CRASH on this one")
    producer.publish(topic, [first], key="k")
    proc = spawn(kafka, topic, group, out, "--crash-on", "CRASH")
    wait_for(lambda: first.id in handled_ids(out), 40, "the first record handled")
    wait_for(lambda: committed(kafka.bootstrap_servers, group, topic) and
             any(committed(kafka.bootstrap_servers, group, topic).values()), 15, "the first commit")
    producer.publish(topic, [second], key="k")
    assert proc.wait(40) == 3  # crashed inside the handler, before committing
    crashed = [x["id"] for x in lines(out) if x["kind"] == "crash"]
    assert crashed == [second.id]

    with Collector(topic, kafka, producer, group=group) as c:
        wait_for(lambda: c.seen, 40, "redelivery after restart")
    redelivered = [r.event.id for r in c.seen]
    assert redelivered == [second.id]  # same id: the duplicate is recognisable; `first` not seen again


def test_two_consumers_split_partitions_and_a_killed_one_hands_over(kafka, producer, tmp_path):
    topic = PROMPTS.with_prefix(kafka.topic_prefix)
    group = f"g-{uuid.uuid4().hex[:8]}"
    out_a, out_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a, b = spawn(kafka, topic, group, out_a), spawn(kafka, topic, group, out_b)
    try:
        wave1 = [prompt(f"wave one {i}") for i in range(40)]
        producer.publish(topic, wave1)
        wait_for(lambda: set(handled_ids(out_a)) | set(handled_ids(out_b)) >= {e.id for e in wave1}, 60,
                 "wave one handled by the group")
        parts_a = {p for x in lines(out_a) if x["kind"] == "batch" for p in x["partitions"]}
        parts_b = {p for x in lines(out_b) if x["kind"] == "batch" for p in x["partitions"]}
        assert parts_a and parts_b and not parts_a & parts_b and parts_a | parts_b == {0, 1, 2, 3}

        b.kill()  # no clean leave: the group notices through the session timeout
        b.wait(10)
        wave2 = [prompt(f"wave two {i}") for i in range(40)]
        producer.publish(topic, wave2)
        wait_for(lambda: set(handled_ids(out_a)) >= {e.id for e in wave2}, 60, "the survivor taking over")
        later = {p for x in lines(out_a) if x["kind"] == "batch" and set(x["ids"]) & {e.id for e in wave2}
                 for p in x["partitions"]}
        assert parts_b <= later
    finally:
        for p in (a, b):
            p.kill()
            p.wait(10)


def test_sigterm_during_a_batch_commits_nothing_for_it(kafka, producer, tmp_path):
    topic = PROMPTS.with_prefix(kafka.topic_prefix)
    group, out = f"g-{uuid.uuid4().hex[:8]}", tmp_path / "s.jsonl"
    events = [prompt(f"slow {i}") for i in range(3)]
    producer.publish(topic, events, key="k")
    proc = spawn(kafka, topic, group, out, "--block-batches", "--batch-size", "3", "--grace", "0.5")
    wait_for(lambda: any(x["kind"] == "batch" for x in lines(out)), 40, "the batch to start")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    stopped = [x for x in lines(out) if x["kind"] == "stopped"]
    assert stopped and stopped[0]["abandoned"] == 1
    assert not any(x["kind"] == "handled" for x in lines(out))
    assert not any(committed(kafka.bootstrap_servers, group, topic).values())
    with Collector(topic, kafka, producer, group=group, batch_size=3, batch_timeout_ms=500) as c:
        wait_for(lambda: len(c.seen) == 3, 40, "the abandoned batch redelivered")
    assert {r.event.id for r in c.seen} == {e.id for e in events}


def test_sigterm_between_batches_exits_cleanly_and_keeps_commits(kafka, producer, tmp_path):
    topic = PROMPTS.with_prefix(kafka.topic_prefix)
    group, out = f"g-{uuid.uuid4().hex[:8]}", tmp_path / "q.jsonl"
    event = prompt("quick")
    producer.publish(topic, [event])
    proc = spawn(kafka, topic, group, out)
    wait_for(lambda: event.id in handled_ids(out), 40, "the record handled")
    wait_for(lambda: any(committed(kafka.bootstrap_servers, group, topic).values()), 15, "the commit")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert [x["abandoned"] for x in lines(out) if x["kind"] == "stopped"] == [0]




def test_a_broker_outage_while_publishing_is_waited_out_not_dead_lettered(tmp_path):
    """The handler's publish fails because the broker went away: no record is blamed (no DLQ);
    the batch runs again once the broker is back, through a renewed producer (Tansu forgets
    producer ids on restart)."""
    from shared.broker import EmbeddedBroker
    from shared.settings import KafkaSettings
    from shared.topics import all_topics_with_dlq

    out = PROMPTS.with_prefix("out.")
    topics = [*all_topics_with_dlq(), out]
    broker = EmbeddedBroker(log_file=tmp_path / "broker.log").start(topics=topics)
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap, produce_timeout_s=3, request_timeout_ms=3000)
    producer = EventProducer(kafka, "test", max_block_ms=3000)
    out_producer = EventProducer(kafka, "test-out", max_block_ms=3000)
    fetched, release = threading.Event(), threading.Event()
    events = [prompt(f"outage question {i}") for i in range(3)]

    def handle(batch):
        fetched.set()
        release.wait(60)
        out_producer.publish(out, [r.event for r in batch])  # stands in for e.g. CandidatesEvents

    registry = CollectorRegistry()
    loop = ConsumeLoop(PROMPTS, group_id="outage",
                       handler=handle, kafka=kafka, producer=producer, service="test", registry=registry,
                       retry_wait_s=0.2, batch_size=3, batch_timeout_ms=500)
    thread = threading.Thread(target=loop.run, daemon=True)
    try:
        producer.publish(PROMPTS, events)
        thread.start()
        assert fetched.wait(60), "the loop never fetched the batch"
        broker.stop()
        release.set()
        wait_for(lambda: registry.get_sample_value("prefloop_broker_unavailable_total", {"topic": PROMPTS.name}),
                 60, "the loop to notice the outage")
        assert thread.is_alive()
        broker = EmbeddedBroker(port=broker.port, log_file=tmp_path / "broker.log").start(topics=topics)
        got = wait_for(lambda: read_events(broker.bootstrap, out, 3, 2), 120, "the batch published after the outage")
        assert {e.id for e in got} >= {e.id for e in events}
        assert not read_records(broker.bootstrap, PROMPTS.dead_letter, 1, 2)
        assert not registry.get_sample_value("prefloop_dead_letters_total", {"topic": PROMPTS.name, "kind": "handler"})
    finally:
        release.set()
        loop.stop()
        thread.join(30)
        broker.stop()
    assert not thread.is_alive()


def test_a_record_the_broker_refuses_for_good_is_dead_lettered_with_why_not_waited_for(kafka, producer):
    """A handler's output over the size limit can never be published: the record that produced it
    is dead-lettered at once with the reason (not retried, not waited out as an outage), the rest
    of the batch goes through, and the loop goes on."""
    topic, out = PROMPTS.with_prefix(kafka.topic_prefix), PROMPTS.with_prefix("out-" + kafka.topic_prefix)
    small_limit = EventProducer(kafka.model_copy(update={"max_message_bytes": 4096}), "test-out")
    outputs = []

    def handle(batch):
        for r in batch:  # the "output" is the prompt itself, through a producer with a 4 KB limit
            small_limit.publish(out, [r.event])
            outputs.append(r.event.id)

    fine, huge = prompt("a short question"), prompt("why " * 2000)  # ~8 KB encoded
    producer.publish(topic, [fine, huge], key="one-partition")
    registry = CollectorRegistry()
    loop = ConsumeLoop(topic, group_id=f"g-{uuid.uuid4().hex[:8]}", handler=handle, kafka=kafka, producer=producer,
                       service="test", registry=registry, batch_size=2, batch_timeout_ms=500, max_attempts=3,
                       retry_wait_s=0.01)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        dead = read_events(kafka.bootstrap_servers, topic.dead_letter, 1, 30)
        assert json.loads(dead[0].payload)["id"] == huge.id and dead[0].error_kind == "handler"
        assert "PublishRejected" in dead[0].error and "MessageSizeTooLargeError" in dead[0].error
        assert dead[0].attempts == 1  # hopeless: not retried
        wait_for(lambda: fine.id in outputs, 10, "the fine record's output")
        assert not registry.get_sample_value("prefloop_broker_unavailable_total", {"topic": topic.name})
        late = prompt("after the refusal")
        producer.publish(topic, [late])
        wait_for(lambda: late.id in outputs, 30, "the loop to go on")
    finally:
        loop.stop()
        thread.join(15)
        small_limit.close()


def test_a_dead_letter_too_large_for_the_broker_goes_out_with_its_payload_cut(kafka, producer):
    topic = PROMPTS.with_prefix(kafka.topic_prefix)
    limited = EventProducer(kafka.model_copy(update={"max_message_bytes": 8192}), "test-dlq")
    huge = prompt("pain " * 1500)  # ~7.5 KB: fits, but its dead letter (payload + envelope) does not
    producer.publish(topic, [huge])
    try:
        with Collector(topic, kafka, limited, max_attempts=1, fail_on=lambda e: True):
            dead = read_events(kafka.bootstrap_servers, topic.dead_letter, 1, 30)[0]
        assert dead.original_topic == topic.name and "cannot handle" in dead.error
        assert "payload cut from" in dead.error and len(dead.payload.encode()) <= 4096
        assert huge.model_dump_json()[:100] == dead.payload[:100]
    finally:
        limited.close()


def test_a_batch_handled_for_longer_than_the_poll_interval_keeps_its_partitions(kafka, producer):
    """A generator batch on a busy CPU can take minutes. The loop keeps polling (partitions paused)
    while its handler works, so the group does not take the partitions away and hand the batch
    out again: each record is handled once and committed."""
    topic = PROMPTS.with_prefix(kafka.topic_prefix)
    quick = kafka.model_copy(update={"max_poll_interval_ms": 6000})
    events = [prompt(f"slow batch {i}") for i in range(3)]

    class Slow(Collector):
        def handle(self, batch):
            if not self.seen:
                threading.Event().wait(15)  # the handler's own work: 2.5x the poll interval
            super().handle(batch)

    with Slow(topic, quick, producer, batch_size=3, batch_timeout_ms=500) as c:
        producer.publish(topic, events)
        wait_for(lambda: len(c.seen) >= 3, timeout_s=60, what="the slow batch handled")
        later = prompt("after the slow batch")
        producer.publish(topic, [later])
        wait_for(lambda: later.id in {r.event.id for r in c.seen}, timeout_s=30, what="the next record")
        group = c.loop._group_id
    assert sorted(r.event.id for r in c.seen) == sorted([e.id for e in events] + [later.id])  # none twice
    offsets = committed(kafka.bootstrap_servers, group, topic)
    assert sum(o or 0 for o in offsets.values()) == 4
