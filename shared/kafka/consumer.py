"""The consume loop every service uses.

Per batch (up to `batch_size` records or `batch_timeout_ms` after the first one):
decode and validate each record; hand the valid ones to the handler; retry a failing
batch, then isolate the failing records one by one; dead-letter what cannot be decoded
or handled, with the reason; commit offsets only after all of that succeeded. On stop
(SIGTERM), an in-flight batch gets `shutdown_grace_s` to finish, else it is abandoned
uncommitted and will be redelivered. Handlers must be idempotent on the event id.

With `max_in_flight` > 1 the loop gathers the next batch while earlier ones are handled, each on
its own thread (the generator: a batch that arrives while one decodes joins the engine's running
batch instead of waiting for all of it). Batches are committed oldest first and never past one
still in flight, so a crash redelivers every record not yet handled and none is skipped.

A handler whose publish the broker cannot take for now (`BrokerUnavailable`), or that finds
another dependency down (any `Unavailable`, e.g. the judge endpoint), is waited out and the
batch runs again; nothing is dead-lettered or committed for it. One whose output the broker
refuses for good (`PublishRejected`, e.g. too large) is not retried: the record is isolated and
dead-lettered with that reason.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import deque
from collections.abc import Callable

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata
from prometheus_client import CollectorRegistry
from tenacity import Retrying, retry_if_not_exception_type, stop_after_attempt, stop_when_event_set, wait_exponential

from shared.kafka.codec import DecodeError, decode
from shared.kafka.dead_letters import Received, make_dead_letter, publish_dead_letters
from shared.kafka.loop_parts import InFlightBatch, LoopMetrics
from shared.kafka.producer import BrokerUnavailable, EventProducer, PublishRejected, Unavailable
from shared.settings import KafkaSettings
from shared.topics import Topic
from shared.wire import DeadLetter, ServiceName

log = logging.getLogger(__name__)


BatchHandler = Callable[[list[Received]], None]


class _DropRevoked(ConsumerRebalanceListener):
    def __init__(self, loop: "ConsumeLoop") -> None:
        self._loop = loop

    def on_partitions_revoked(self, revoked):  # noqa: D401 - kafka-python API
        gone = {(tp.topic, tp.partition) for tp in revoked}
        # Records gathered but not yet handled from a revoked partition now belong to
        # another member; drop them (uncommitted, so they are redelivered there).
        self._loop._pending = [r for r in self._loop._pending if (r.topic, r.partition) not in gone]
        self._loop._carried = [r for r in self._loop._carried if (r.topic, r.partition) not in gone]
        log.info("partitions revoked: %s", sorted(gone))

    def on_partitions_assigned(self, assigned):
        log.info("partitions assigned: %s", sorted((tp.topic, tp.partition) for tp in assigned))


class ConsumeLoop:
    def __init__(
        self,
        topic: Topic,
        *,
        group_id: str,
        handler: BatchHandler,
        kafka: KafkaSettings,
        producer: EventProducer,
        service: ServiceName,
        batch_size: int = 1,
        batch_timeout_ms: int = 0,
        max_attempts: int = 3,
        retry_wait_s: float = 0.2,
        shutdown_grace_s: float = 10.0,
        max_in_flight: int = 1,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.topic = topic
        self._group_id = group_id
        self._handler = handler
        self._kafka = kafka
        self._producer = producer
        self._service = service
        self._batch_size = batch_size
        self._batch_timeout_s = batch_timeout_ms / 1000
        self._max_attempts = max_attempts
        self._retry_wait_s = retry_wait_s
        self._grace_s = shutdown_grace_s
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, not {max_in_flight}")
        self._max_in_flight = max_in_flight
        self._stop = threading.Event()
        self._pending: list = []
        self._carried: list = []  # records a keep-alive poll returned while a batch was being handled
        self._metrics = LoopMetrics.for_registry(registry)
        self.assigned = threading.Event()
        """Set once the group has assigned this member at least one partition."""
        self.abandoned_batches = 0
        self.crashed = False

    # -- control -------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def install_signal_handlers(self) -> None:
        """SIGTERM / SIGINT stop the loop (main thread only)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

    # -- main loop -----------------------------------------------------------
    def run(self) -> None:
        consumer = KafkaConsumer(
            bootstrap_servers=self._kafka.bootstrap_servers.split(","),
            group_id=self._group_id,
            client_id=f"{self._kafka.client_id}-{self._service}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=self._kafka.session_timeout_ms,
            heartbeat_interval_ms=self._kafka.heartbeat_interval_ms,
            max_poll_interval_ms=self._kafka.max_poll_interval_ms,
            request_timeout_ms=self._kafka.request_timeout_ms,
            bootstrap_timeout_ms=self._kafka.request_timeout_ms,  # no broker at start: the loop dies, /healthz says so
        )
        consumer.subscribe([self.topic.name], listener=_DropRevoked(self))
        log.info("consuming %s as group %s", self.topic.name, self._group_id)
        in_flight: deque[InFlightBatch] = deque()  # oldest first: committed in this order, never past an unfinished one
        try:
            while not self._stop.is_set():
                if in_flight and in_flight[0].done.is_set():
                    if not self._settle_oldest(consumer, in_flight):
                        return
                elif len(in_flight) >= self._max_in_flight:
                    self._wait_paused(consumer, in_flight[0])
                else:
                    records = self._gather(consumer, in_flight[0] if in_flight else None)
                    if records:
                        in_flight.append(self._start(records))
            self._finish_on_stop(consumer, in_flight)
        finally:
            consumer.close(autocommit=False)
            log.info("consumer for %s closed", self.topic.name)

    def _gather(self, consumer: KafkaConsumer, oldest: "InFlightBatch | None" = None) -> list:
        """Poll until `batch_size` records or `batch_timeout` after the first record. Returns early, with
        nothing, when no record came and the `oldest` batch in flight finished (it is committed first)."""
        self._pending, self._carried = self._carried, []
        first_at: float | None = time.monotonic() if self._pending else None
        while not self._stop.is_set():
            if first_at is None and oldest is not None and oldest.done.is_set():
                return []
            idle_s = 0.5 if oldest is None else 0.1
            wait_s = idle_s if first_at is None else max(0.0, first_at + self._batch_timeout_s - time.monotonic())
            polled = consumer.poll(timeout_ms=int(wait_s * 1000), max_records=self._batch_size - len(self._pending))
            if consumer.assignment():
                self.assigned.set()
            for records in polled.values():
                self._pending.extend(records)
                self._metrics.received.labels(self.topic.name).inc(len(records))
            if self._pending and first_at is None:
                first_at = time.monotonic()
            if len(self._pending) >= self._batch_size or (first_at is not None and time.monotonic() >= first_at + self._batch_timeout_s):
                break
        if self._stop.is_set():
            return []  # abandon what was gathered: nothing handled, nothing committed
        return self._pending

    def _start(self, records: list) -> "InFlightBatch":
        """Decode the records and start handling the valid ones on a thread of their own."""
        batch = InFlightBatch(records)
        for rec in records:
            key = rec.key.decode("utf-8", "replace") if rec.key is not None else None
            try:
                batch.valid.append(Received(decode(self.topic, rec.value), rec.topic, rec.partition, rec.offset, key,
                                            rec.value or b""))
            except DecodeError as exc:
                batch.dead.append(self._dead_letter(rec, key, exc.kind, str(exc), attempts=0))

        def work() -> None:
            try:
                self._until_available(lambda: batch.failures.extend(self._handle_with_retries(batch.valid)))
                batch.handled.set()
            finally:
                batch.seconds = time.monotonic() - batch.started
                batch.done.set()

        threading.Thread(target=work, name=f"handler-{self.topic.name}", daemon=True).start()
        return batch

    def _wait_paused(self, consumer: KafkaConsumer | None, batch: "InFlightBatch") -> None:
        """Wait for `batch` (or a stop), polling with the partitions paused.

        While the handler works (a generator batch on a busy CPU, an endpoint outage waited out),
        the loop's own thread keeps polling with its partitions paused: the group then never takes
        the partitions away for `max_poll_interval_ms` and redelivers a batch that is still being
        handled. A record such a poll returns anyway (a partition assigned meanwhile) is carried
        into the next batch, never dropped."""
        paused = self._pause(consumer)
        try:
            while not batch.done.wait(0.1) and not self._stop.is_set():
                self._keep_alive(consumer)
        finally:
            self._resume(consumer, paused)

    def _finish_on_stop(self, consumer: KafkaConsumer, in_flight: "deque[InFlightBatch]") -> None:
        """On stop, the batches in flight get `shutdown_grace_s` (together) to finish; those that do are
        committed in order up to the first that does not, which is abandoned with all after it."""
        deadline = time.monotonic() + self._grace_s
        while in_flight:
            if not in_flight[0].done.wait(max(0.0, deadline - time.monotonic())):
                self._abandon(in_flight)
                return
            if not self._settle_oldest(consumer, in_flight):
                return

    def _settle_oldest(self, consumer: KafkaConsumer, in_flight: "deque[InFlightBatch]") -> bool:
        """Settle and commit the oldest batch (finished). If a stop cut it short it is abandoned with every
        batch after it, and False is returned: nothing past it may be committed."""
        batch = in_flight.popleft()
        if not self._settle(batch):
            self._abandon([batch, *in_flight])
            in_flight.clear()
            return False
        self._commit(consumer, batch.records)
        return True

    def _abandon(self, batches) -> None:
        """Leave `batches` uncommitted: they are redelivered."""
        for batch in batches:
            self.abandoned_batches += 1
            log.warning("abandoned an in-flight batch of %d records uncommitted", len(batch.records))

    def _settle(self, batch: "InFlightBatch") -> bool:
        """After a batch's handler finished: dead-letter what failed. Returns False if the batch must be
        abandoned (uncommitted, redelivered) because a stop cut it short."""
        if not batch.handled.is_set():
            return False  # stopped while the broker was away: nothing is committed, all is redelivered
        failures, dead, records = batch.failures, list(batch.dead), batch.records
        if self._stop.is_set() and failures and any(a < self._max_attempts for *_, a in failures):
            return False  # retries were cut short by the stop: do not dead-letter, redeliver instead
        self._metrics.seconds.labels(self.topic.name).observe(batch.seconds)
        self._metrics.batch.labels(self.topic.name).observe(len(records))
        for item, exc, attempts in failures:
            raw = next(r for r in records if r.partition == item.partition and r.offset == item.offset)
            dead.append(self._dead_letter(raw, item.key, "handler", f"{type(exc).__name__}: {exc}", attempts))
        if dead:
            # Wait for the DLQ acks before committing: a dead letter is never lost.
            dlq = self.topic.dead_letter
            if not self._until_available(lambda: publish_dead_letters(self._producer, dlq, dead)):
                return False
            for d in dead:
                self._metrics.dead.labels(self.topic.name, d.error_kind).inc()
                log.warning("dead-lettered %s[%d]@%d (%s): %s", d.original_topic, d.partition, d.offset,
                            d.error_kind, d.error[:300])
        self._metrics.handled.labels(self.topic.name).inc(len(batch.valid) - len(failures))
        return True

    @staticmethod
    def _pause(consumer: KafkaConsumer | None) -> list:
        if consumer is None:
            return []
        paused = list(consumer.assignment())
        consumer.pause(*paused)
        return paused

    @staticmethod
    def _resume(consumer: KafkaConsumer | None, paused: list) -> None:
        if consumer is not None:
            consumer.resume(*[tp for tp in paused if tp in consumer.assignment()])

    def _keep_alive(self, consumer: KafkaConsumer | None) -> None:
        """A poll that fetches nothing from the paused partitions but tells the group we are alive."""
        if consumer is None:
            return
        for records in consumer.poll(timeout_ms=0).values():
            self._carried.extend(records)
            self._metrics.received.labels(self.topic.name).inc(len(records))

    def _until_available(self, step) -> bool:
        """Run `step` until it gets past `Unavailable` (True) or the loop stops (False). A broker or
        endpoint outage is nobody's record's fault: it is waited out, never dead-lettered."""
        wait_s = self._retry_wait_s
        while True:
            try:
                step()
                return True
            except Unavailable as exc:
                if isinstance(exc, BrokerUnavailable):
                    self._metrics.broker_waits.labels(self.topic.name).inc()
                pause_s = wait_s if exc.retry_after_s is None else max(0.05, exc.retry_after_s)
                log.warning("%s while handling %s (%s); retrying in %.1fs", type(exc).__name__, self.topic.name, exc,
                            pause_s)
                if self._stop.wait(pause_s):
                    return False
                wait_s = min(wait_s * 2, 10.0)

    def _attempts(self) -> Retrying:
        return Retrying(
            stop=stop_after_attempt(self._max_attempts) | stop_when_event_set(self._stop),
            wait=wait_exponential(multiplier=self._retry_wait_s, max=5.0),
            retry=retry_if_not_exception_type((Unavailable, PublishRejected)),  # waited out / hopeless
            reraise=True,
        )

    def _handle_with_retries(self, items: list[Received]) -> list[tuple[Received, BaseException, int]]:
        """Whole batch first; if it keeps failing, each record alone to isolate the bad ones."""
        if not items:
            return []
        retrying = self._attempts()
        try:
            retrying(self._handler, items)
            return []
        except Unavailable:
            raise  # not the records' fault: the caller waits for the broker or endpoint and runs the batch again
        except Exception as exc:  # noqa: BLE001 - any handler failure is retried, then isolated
            attempts = retrying.statistics.get("attempt_number", 1)
            if len(items) == 1:
                return [(items[0], exc, attempts)]
            log.warning("batch of %d failed %d times (%s); handling records one by one", len(items), attempts, exc)
        failures = []
        for item in items:
            if self._stop.is_set():
                failures.append((item, RuntimeError("stopped before handling"), 0))
                continue
            retrying = self._attempts()
            try:
                retrying(self._handler, [item])
            except Unavailable:
                raise
            except Exception as exc:  # noqa: BLE001
                failures.append((item, exc, retrying.statistics.get("attempt_number", 1)))
        return failures

    def _dead_letter(self, rec, key: str | None, kind: str, error: str, attempts: int) -> DeadLetter:
        return make_dead_letter(rec.topic, rec.partition, rec.offset, key, rec.value, kind, error, self._service,
                                attempts)

    def _commit(self, consumer: KafkaConsumer, records: list) -> None:
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        for rec in records:
            tp = TopicPartition(rec.topic, rec.partition)
            if tp not in offsets or offsets[tp].offset < rec.offset + 1:
                offsets[tp] = OffsetAndMetadata(rec.offset + 1, "", -1)
        try:
            consumer.commit(offsets=offsets)
        except (CommitFailedError, KafkaError) as exc:
            # The group rebalanced while we handled the batch; the new owner will get these
            # records again. Handlers are idempotent on event id, so that is safe.
            log.warning("commit failed (%s); records will be redelivered", exc)
