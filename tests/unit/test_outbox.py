"""The durable outbox (sqlite): order, survival across a reopen, bad rows moved aside with why."""

import json

import pytest

from shared.kafka import BrokerUnavailable, PublishRejected
from shared.observability import new_registry
from shared.outbox import Outbox
from shared.topics import FEEDBACK, PROMPTS
from tests.helpers import prompt


class Broker:
    """Stands in for EventProducer: takes events, or is down, or refuses some for good."""

    def __init__(self) -> None:
        self.up, self.published, self.refuse = True, [], set()

    def publish(self, topic, events, timeout_s=None):
        if not self.up:
            raise BrokerUnavailable("broker down")
        for e in events:
            if e.id in self.refuse:
                raise PublishRejected(f"{topic.name} refuses the record: MessageSizeTooLargeError()")
        self.published += [(topic.name, e.id) for e in events]
        return len(events)


def outbox_at(tmp_path, metrics=None):
    return Outbox(tmp_path / "outbox.sqlite", [PROMPTS, FEEDBACK], metrics or new_registry(), "feedback")


def test_events_wait_out_an_outage_in_order_and_survive_a_reopen(tmp_path):
    events = [prompt(f"question {i}") for i in range(3)]
    box, broker = outbox_at(tmp_path), Broker()
    box.put([(PROMPTS, e) for e in events])
    broker.up = False
    with pytest.raises(BrokerUnavailable):
        box.relay(broker)
    assert len(box) == 3 and broker.published == []
    box.close()  # a restart

    again = outbox_at(tmp_path)
    broker.up = True
    assert again.relay(broker) == 3 and len(again) == 0
    assert broker.published == [(PROMPTS.name, e.id) for e in events]
    assert again.relay(broker) == 0  # delivered rows are gone


def test_a_row_refused_for_good_is_moved_aside_with_why_and_the_rest_go_on(tmp_path):
    metrics = new_registry()
    box, broker = outbox_at(tmp_path, metrics), Broker()
    first, bad, last = prompt("one"), prompt("too large"), prompt("three")
    broker.refuse.add(bad.id)
    box.put([(PROMPTS, first), (PROMPTS, bad), (PROMPTS, last)])
    assert box.relay(broker) == 2 and len(box) == 0
    assert [i for _, i in broker.published] == [first.id, last.id]
    (dead,) = box.dead()
    assert json.loads(dead["event"])["id"] == bad.id and "MessageSizeTooLargeError" in dead["reason"]
    assert metrics.get_sample_value("prefloop_outbox_dead_total", {"outbox": "feedback"}) == 1
    assert metrics.get_sample_value("prefloop_outbox_pending", {"outbox": "feedback"}) == 0


def test_a_row_for_an_unknown_topic_or_with_a_broken_event_is_moved_aside(tmp_path):
    legacy = tmp_path / "outbox.jsonl"
    good = prompt("still good")
    legacy.write_text("\n".join([json.dumps({"topic": "gone.v0", "event": good.model_dump(mode="json")}),
                                 json.dumps({"topic": PROMPTS.name, "event": {"producer": "gateway"}}),
                                 json.dumps({"topic": PROMPTS.name, "event": good.model_dump(mode="json")}),
                                 '{"topic": "prefloop.pro']))  # torn: never acknowledged to anyone
    box, broker = outbox_at(tmp_path), Broker()
    assert box.import_jsonl(legacy) == 3 and not legacy.exists()
    assert box.relay(broker) == 1 and broker.published == [(PROMPTS.name, good.id)]
    reasons = [d["reason"] for d in box.dead()]
    assert reasons[0].startswith("LookupError: unknown topic") and reasons[1].startswith("ValidationError")


def test_two_outboxes_share_one_registry_labelled_by_name(tmp_path):
    from prometheus_client import generate_latest

    metrics = new_registry()
    first = Outbox(tmp_path / "a.sqlite", [PROMPTS], metrics, "model-updates")
    second = Outbox(tmp_path / "b.sqlite", [PROMPTS], metrics, "review")
    second.put([(PROMPTS, prompt("queued"))])
    text = generate_latest(metrics).decode()
    assert 'prefloop_outbox_pending{outbox="model-updates"} 0.0' in text
    assert 'prefloop_outbox_pending{outbox="review"} 1.0' in text
    first.close()
    second.close()
