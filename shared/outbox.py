"""A durable outbox: wire events waiting for the broker, one sqlite row per event (WAL,
synchronous=FULL, so a committed row survives a crash), published in order and deleted once
the broker acknowledged it.

A row the broker refuses for good (`PublishRejected`, e.g. too large), or one that no longer
decodes (unknown topic, invalid event), is moved to the `dead` table with the reason and counted
in `prefloop_outbox_dead_total`; the rows after it go on. While the broker is unavailable the
relay stops at the first row and tries again later, keeping the order.

The gateway queues feedback here when the broker is down; the trainer queues every model-update
announcement here and lets the relay deliver it, so a promotion is announced even if the broker
is away at that moment or the trainer restarts meanwhile.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import weakref
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import ValidationError

from shared.kafka import BrokerUnavailable, EventProducer, PublishRejected
from shared.topics import Topic
from shared.wire import Event

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, event TEXT NOT NULL,
                                   queued_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP);
CREATE TABLE IF NOT EXISTS dead (seq INTEGER PRIMARY KEY, topic TEXT NOT NULL, event TEXT NOT NULL,
                                 reason TEXT NOT NULL, queued_at TEXT NOT NULL,
                                 dead_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP);
"""


_METRICS: "weakref.WeakKeyDictionary[CollectorRegistry, tuple[Counter, Gauge]]" = weakref.WeakKeyDictionary()


def _metrics_of(registry: CollectorRegistry) -> tuple[Counter, Gauge]:
    """One set of outbox metrics per registry, labelled by outbox name (a service may have several)."""
    if registry not in _METRICS:
        _METRICS[registry] = (
            Counter("prefloop_outbox_dead", "outbox rows moved aside as undeliverable", ["outbox"], registry=registry),
            Gauge("prefloop_outbox_pending", "events waiting in the outbox", ["outbox"], registry=registry))
    return _METRICS[registry]


class Outbox:
    def __init__(self, path: str | Path, topics: list[Topic], metrics: CollectorRegistry, name: str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._topics = {t.name: t for t in topics}
        self._lock = threading.Lock()
        # one connection, used under the lock; `with self._db` is one transaction (commit or rollback)
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        dead, pending = _metrics_of(metrics)
        self._dead_total = dead.labels(name)
        self._pending = pending.labels(name)
        self._pending.set_function(lambda: len(self))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]

    def put(self, items: list[tuple[Topic, Event]]) -> None:
        """Queue events durably (one transaction: all or none)."""
        rows = [(topic.name, event.model_dump_json()) for topic, event in items]
        with self._lock, self._db:
            self._db.executemany("INSERT INTO outbox (topic, event) VALUES (?, ?)", rows)

    def dead(self) -> list[dict]:
        """Rows moved aside, oldest first: topic, event (JSON text), reason."""
        with self._lock:
            rows = self._db.execute("SELECT topic, event, reason FROM dead ORDER BY seq").fetchall()
        return [{"topic": t, "event": e, "reason": r} for t, e, r in rows]

    def relay(self, producer: EventProducer, timeout_s: float | None = None) -> int:
        """Publish queued events in order, deleting each once acknowledged; move undeliverable ones
        aside. Raises `BrokerUnavailable` (the rest stay queued). Returns how many were delivered."""
        sent = 0
        while True:
            with self._lock:
                row = self._db.execute("SELECT seq, topic, event, queued_at FROM outbox ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return sent
            seq, topic_name, text, queued_at = row
            try:
                topic = self._topics.get(topic_name)
                if topic is None:
                    raise LookupError(f"unknown topic {topic_name!r}")
                producer.publish(topic, [topic.schema.model_validate_json(text)], timeout_s=timeout_s)
            except BrokerUnavailable:
                raise
            except (PublishRejected, LookupError, ValidationError) as exc:
                self._move_aside(seq, topic_name, text, queued_at, f"{type(exc).__name__}: {exc}")
                continue
            with self._lock, self._db:
                self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
            sent += 1

    def _move_aside(self, seq: int, topic: str, text: str, queued_at: str, reason: str) -> None:
        with self._lock, self._db:
            self._db.execute("INSERT INTO dead (seq, topic, event, reason, queued_at) VALUES (?, ?, ?, ?, ?)",
                             (seq, topic, text, reason[:2000], queued_at))
            self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
        self._dead_total.inc()
        log.error("outbox %s: moved an undeliverable %s event aside (%s)", self.path, topic, reason[:300])

    def relay_until(self, stop: threading.Event, producer: EventProducer, retry_s: float,
                    timeout_s: float | None = None) -> None:
        """The relay thread's body: relay now and every `retry_s`; once more when `stop` is set (a
        replica being scaled away delivers what it can before it goes)."""
        while True:
            stopping = stop.is_set()
            try:
                if sent := self.relay(producer, timeout_s):
                    log.info("outbox %s: delivered %d queued events", self.path.name, sent)
            except BrokerUnavailable as exc:
                log.info("outbox %s: %d events wait for the broker (%s)", self.path.name, len(self), exc)
            if stopping:
                return
            stop.wait(retry_s)

    def import_jsonl(self, path: Path) -> int:
        """Queue the rows of an older JSON-lines outbox (`{"topic", "event"}` per line) and rename
        the file to `*.imported`, so an upgrade loses nothing. Returns how many were queued. A torn
        line (a crash before its fsync, so never acknowledged to anyone) is skipped with a warning."""
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            try:
                row = json.loads(line)
                rows.append((row["topic"], json.dumps(row["event"])))
            except (ValueError, KeyError, TypeError):
                if line.strip():
                    log.warning("%s:%d: skipping an unreadable outbox line", path, number)
        with self._lock, self._db:
            self._db.executemany("INSERT INTO outbox (topic, event) VALUES (?, ?)", rows)
        path.rename(path.with_name(path.name + ".imported"))
        return len(rows)

    def close(self) -> None:
        with self._lock:
            self._db.close()
