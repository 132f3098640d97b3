"""The consume loop's parts that hold no loop logic: its metrics and a batch being handled."""

from __future__ import annotations

import threading
import time
import weakref

from prometheus_client import CollectorRegistry, Counter, Histogram

from shared.kafka.dead_letters import Received
from shared.wire import DeadLetter


class LoopMetrics:
    """Consume-loop metrics, labelled by topic; one set per registry, shared by its loops."""

    _per_registry: "weakref.WeakKeyDictionary[CollectorRegistry, LoopMetrics]" = weakref.WeakKeyDictionary()

    @classmethod
    def for_registry(cls, registry: CollectorRegistry | None) -> "LoopMetrics":
        reg = registry or CollectorRegistry()
        if reg not in cls._per_registry:
            cls._per_registry[reg] = cls(reg)
        return cls._per_registry[reg]

    def __init__(self, reg: CollectorRegistry) -> None:
        self.received = Counter("prefloop_records_received", "records polled", ["topic"], registry=reg)
        self.handled = Counter("prefloop_records_handled", "records handled and committed", ["topic"], registry=reg)
        self.dead = Counter("prefloop_dead_letters", "records sent to the DLQ", ["topic", "kind"], registry=reg)
        self.batch = Histogram("prefloop_batch_size", "records per batch", ["topic"], registry=reg,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.seconds = Histogram("prefloop_handler_seconds", "handler time per batch", ["topic"], registry=reg)
        self.broker_waits = Counter("prefloop_broker_unavailable", "publish attempts the broker did not take",
                                    ["topic"], registry=reg)


class InFlightBatch:
    """Records being handled on a thread of their own, and what came of it."""

    def __init__(self, records: list) -> None:
        self.records = records
        self.valid: list[Received] = []
        self.dead: list[DeadLetter] = []
        self.failures: list[tuple[Received, BaseException, int]] = []
        self.handled = threading.Event()  # the handler got past every outage (else a stop cut it short)
        self.done = threading.Event()
        self.started = time.monotonic()
        self.seconds = 0.0
