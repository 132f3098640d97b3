"""A consumer process for the Kafka-layer tests: runs a ConsumeLoop on one topic and
appends what it sees to a JSON-lines file, so tests can kill it at precise moments.

usage: python -m tests.integration.consumer_proc BOOTSTRAP TOPIC GROUP OUT [--crash-on TEXT]
       [--block-batches] [--batch-size N] [--grace S]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

from prometheus_client import CollectorRegistry

from shared.kafka import ConsumeLoop, EventProducer
from shared.settings import KafkaSettings
from shared.topics import PROMPTS, Topic


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bootstrap")
    ap.add_argument("topic")
    ap.add_argument("group")
    ap.add_argument("out")
    ap.add_argument("--crash-on", default=None)
    ap.add_argument("--block-batches", action="store_true")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--grace", type=float, default=10.0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    kafka = KafkaSettings(bootstrap_servers=args.bootstrap)
    topic = Topic(args.topic, PROMPTS.schema, PROMPTS.partitions)
    out = open(args.out, "a", buffering=1)

    def note(**kw) -> None:
        out.write(json.dumps(kw) + "\n")
        out.flush()
        os.fsync(out.fileno())

    def handle(batch) -> None:
        note(kind="batch", ids=[r.event.id for r in batch], partitions=[r.partition for r in batch], pid=os.getpid())
        for r in batch:
            if args.crash_on and args.crash_on in r.event.messages[-1].content:
                note(kind="crash", id=r.event.id)
                os._exit(3)  # die before commit, like a killed process
        if args.block_batches:
            while True:
                time.sleep(0.05)
        note(kind="handled", ids=[r.event.id for r in batch], pid=os.getpid())

    producer = EventProducer(kafka, "test")
    loop = ConsumeLoop(topic, group_id=args.group, handler=handle, kafka=kafka, producer=producer, service="test",
                       batch_size=args.batch_size, batch_timeout_ms=300, shutdown_grace_s=args.grace,
                       registry=CollectorRegistry())
    loop.install_signal_handlers()
    note(kind="started", pid=os.getpid())
    loop.run()
    producer.close()
    note(kind="stopped", pid=os.getpid(), abandoned=loop.abandoned_batches)


if __name__ == "__main__":
    main()
