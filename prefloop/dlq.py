"""`prefloop dlq replay TOPIC`: re-publish the dead letters of TOPIC to TOPIC after a fix.

Each dead letter carries its original record (payload, key) and the reason. Replay decodes the
payload with TOPIC's schema, so what goes back is the original event, id and all; a payload this
version still cannot read is reported and left out (the dead letter stays in `TOPIC.dlq`).

Running a replay twice re-publishes nothing twice, on two layers:
1. Offsets. The dead-letter topic is read in a consumer group (`prefloop-dlq-replay`, or
   `prefloop-dlq-replay.REASON` with `--reason`), whose offsets are committed only after every
   re-published record was acknowledged; the next run starts after them. `--dry-run` commits
   nothing. A record that fails again is dead-lettered again, as a new dead letter that the next
   replay sees.
2. Ids. Event ids are content hashes, so an event replayed twice anyway (a crash between the
   publish and the commit, or one replayed by an earlier run with another `--reason`) is the
   same event: the judge answers it from its verdict cache, its preference has the same id and
   the trainer's ledger keeps one pair per id.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from shared.settings import KafkaSettings

dlq_app = typer.Typer(help="Dead-letter topics: inspect and re-publish records after a fix.", no_args_is_help=True)
console = Console()


@dataclass
class ReplaySummary:
    read: int = 0
    matching: int = 0
    readable: int = 0
    """matching dead letters whose original record decodes: what a replay re-publishes"""
    replayed: int = 0
    unreadable: int = 0
    """dead letters (or their original records) this version still cannot decode: left out"""
    reasons: Counter = field(default_factory=Counter)


def _group(reason: str | None) -> str:
    return "prefloop-dlq-replay" + (f".{re.sub(r'[^A-Za-z0-9_-]+', '_', reason)[:60]}" if reason else "")


def _read_dead_letters(kafka: KafkaSettings, dlq, group: str, idle_s: float, timeout_s: float):
    """(consumer, records) read in `group` until nothing new came for `idle_s` after the group
    assigned us the topic (Tansu's end_offsets cannot be trusted, so no 'read to the end')."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(bootstrap_servers=kafka.bootstrap_servers.split(","), group_id=group,
                             client_id=f"{kafka.client_id}-dlq-replay", enable_auto_commit=False,
                             auto_offset_reset="earliest", session_timeout_ms=kafka.session_timeout_ms,
                             heartbeat_interval_ms=kafka.heartbeat_interval_ms,
                             request_timeout_ms=kafka.request_timeout_ms)
    consumer.subscribe([dlq.name])
    records: list = []
    deadline, last_new = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        polled = [r for batch in consumer.poll(timeout_ms=200).values() for r in batch]
        if polled or (last_new is None and consumer.assignment()):
            records += polled
            last_new = time.monotonic()
        elif last_new is not None and time.monotonic() - last_new >= idle_s:
            break
    return consumer, records


def replay(kafka: KafkaSettings, topic, reason: str | None = None, dry_run: bool = False, idle_s: float = 3.0,
           timeout_s: float = 120.0) -> ReplaySummary:
    """Re-publish the dead letters of `topic` (optionally only those matching `reason`: an error
    kind, or text in the error) to `topic`; see the module docstring for why twice is safe."""
    from shared.kafka import EventProducer
    from shared.kafka.codec import DecodeError, decode
    from shared.kafka.dead_letters import original_value, reason_of

    summary = ReplaySummary()
    consumer, records = _read_dead_letters(kafka, topic.dead_letter, _group(reason), idle_s, timeout_s)
    producer = EventProducer(kafka, "cli")
    try:
        for record in records:
            summary.read += 1
            try:
                dead = decode(topic.dead_letter, record.value)
            except DecodeError:
                summary.unreadable += 1
                continue
            if reason and reason != dead.error_kind and reason.lower() not in dead.error.lower():
                continue
            summary.matching += 1
            summary.reasons[reason_of(dead)] += 1
            try:
                event = decode(topic, original_value(dead))
            except DecodeError:
                summary.unreadable += 1
                continue
            summary.readable += 1
            if not dry_run:
                summary.replayed += producer.publish(topic, [event], key=dead.key)  # waits for the ack
        if not dry_run and records:
            consumer.commit()  # only now: everything read was re-published (or cannot be)
    finally:
        producer.close()
        consumer.close(autocommit=False)
    return summary


@dlq_app.command("replay")
def replay_command(
    topic: str = typer.Argument(..., help="the topic whose dead letters to re-publish, e.g. prefloop.candidates.v1"),
    reason: Optional[str] = typer.Option(None, help="only dead letters of this error kind (decode, validation, schema_version, "
                                          "handler) or whose error contains this text"),
    dry_run: bool = typer.Option(False, "--dry-run", help="count the dead letters by reason; publish and commit "
                                                          "nothing"),
    idle_s: float = typer.Option(3.0, min=0.1, help="stop reading after this long without a new dead letter"),
) -> None:
    """Re-publish dead letters to their topic, once (see `prefloop/dlq.py` for why twice is safe)."""
    from shared.kafka import BrokerUnavailable
    from shared.topics import ALL_TOPICS

    kafka = KafkaSettings()
    named = {t.with_prefix(kafka.topic_prefix).name: t.with_prefix(kafka.topic_prefix) for t in ALL_TOPICS}
    named.update({t.name: t.with_prefix(kafka.topic_prefix) for t in ALL_TOPICS})
    if topic not in named:
        raise typer.BadParameter(f"unknown topic {topic!r}; one of {', '.join(t.name for t in ALL_TOPICS)}",
                                 param_hint="TOPIC")
    target = named[topic]
    try:
        summary = replay(kafka, target, reason, dry_run, idle_s)
    except BrokerUnavailable as exc:
        console.print(f"[red]error:[/red] {exc} (nothing was committed: running it again is safe)")
        raise typer.Exit(code=1)
    table = Table("reason", "dead letters", title=f"{target.dead_letter.name}" + (f" matching {reason!r}" if reason
                                                                                  else ""))
    for why, count in summary.reasons.most_common():
        table.add_row(why, str(count))
    console.print(table)
    verb = "would re-publish" if dry_run else "re-published"
    console.print(f"read {summary.read} dead letters, {summary.matching} matching; {verb} "
                  f"{summary.readable if dry_run else summary.replayed} to {target.name}; "
                  f"{summary.unreadable} still unreadable (left out)")
