"""`prefloop demo`: runs the loop on the embedded default and writes a report.

Stages land as their issues land; each stage reports what it did, and the report lists
the stages that do not exist yet rather than pretending they ran.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry

from shared.broker import EmbeddedBroker
from shared.kafka import ConsumeLoop, EventProducer
from shared.settings import KafkaSettings
from shared.topics import PROMPTS, all_topics_with_dlq
from shared.wire import ChatMessage, PromptEvent

log = logging.getLogger(__name__)
SYSTEM_PROMPT = ("You are a helpful and empathetic medical assistant. Provide a clear, safe, and informative "
                 "response to the user's question. Always advise the user to consult a professional healthcare "
                 "provider for personal medical advice or diagnosis.")


@dataclass
class DemoReport:
    rounds: int = 0
    prompts_ingested: int = 0
    candidates: int = 0
    preferences: int = 0
    abstentions: int = 0
    dead_letters: int = 0
    feedback_events: int = 0
    user_preferences: int = 0
    served_version: str | None = None
    elapsed_s: float = 0.0
    versions: list[dict] = field(default_factory=list)
    stages_done: list[str] = field(default_factory=list)
    stages_missing: list[str] = field(default_factory=list)


def run_demo(out: Path, rounds: int = 1) -> DemoReport:
    started = time.monotonic()
    report = DemoReport(rounds=rounds)
    out.mkdir(parents=True, exist_ok=True)
    with EmbeddedBroker(log_file=out / "broker.log") as broker:
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap)
        broker_topics = all_topics_with_dlq(kafka.topic_prefix)
        from shared.broker import create_topics

        create_topics(broker.bootstrap, broker_topics)
        report.stages_done.append("broker")
        report.prompts_ingested = _backbone_round_trip(kafka)
        report.stages_done.append("kafka-round-trip")
    report.stages_missing = ["bootstrap", "generator", "judge", "trainer", "gateway", "user-feedback"]
    report.elapsed_s = round(time.monotonic() - started, 2)
    (out / "report.json").write_text(json.dumps(asdict(report), indent=2))
    return report


def _backbone_round_trip(kafka: KafkaSettings) -> int:
    """Publish a prompt and read it back through the consume loop (the messaging backbone)."""
    topic = PROMPTS.with_prefix(kafka.topic_prefix)
    producer = EventProducer(kafka, "cli")
    event = PromptEvent(producer="cli", messages=[ChatMessage(role="system", content=SYSTEM_PROMPT),
                                                  ChatMessage(role="user", content="How can I sleep better?")])
    seen = threading.Event()
    loop = ConsumeLoop(topic, group_id="demo", handler=lambda batch: seen.set(), kafka=kafka, producer=producer,
                       service="cli", registry=CollectorRegistry())
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        producer.publish(topic, [event])
        if not seen.wait(60):
            raise RuntimeError("the prompt did not come back through the broker within 60 s")
    finally:
        loop.stop()
        thread.join(15)
        producer.close()
    return 1
