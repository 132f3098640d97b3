"""User feedback -> FeedbackEvent, plus a PreferenceEvent (a pick of two) or a re-queued
PromptEvent carrying the rated answer (a rating). If the broker cannot take them, they go to a
durable local outbox (JSON lines, fsynced) that a background thread drains once it is back:
the client gets 202 either way and nothing is lost."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from shared.kafka import EventProducer
from shared.topics import Topic
from shared.wire import Candidate, Event, FeedbackEvent, PreferenceEvent, PromptEvent

log = logging.getLogger(__name__)


class FeedbackRejected(ValueError):
    pass


def feedback_events(served, feedback: FeedbackEvent, topics: dict[str, Topic]) -> list[tuple[Topic, Event]]:
    out: list[tuple[Topic, Event]] = [(topics["feedback"], feedback)]
    prompt = PromptEvent(producer="gateway", messages=served.messages, source="feedback")
    if feedback.preferred_index is not None:
        if len(served.choices) != 2 or feedback.preferred_index > 1:
            raise FeedbackRejected("preferred_index needs a response with exactly two choices (n=2): 0 or 1")
        chosen = served.choices[feedback.preferred_index]
        rejected = served.choices[1 - feedback.preferred_index]
        if chosen.text.strip() == rejected.text.strip() or not chosen.text.strip() or not rejected.text.strip():
            raise FeedbackRejected("the two answers are identical or empty; there is nothing to prefer")
        out.append((topics["preferences"], PreferenceEvent(
            producer="gateway", prompt_id=prompt.id, prompt_messages=served.messages, chosen=chosen.text,
            rejected=rejected.text, source="user", judge_id=f"user:{feedback.key_id}", reasoning=feedback.comment,
            policy_version=served.model_version)))
    else:
        if feedback.choice_index >= len(served.choices):
            raise FeedbackRejected(f"choice_index {feedback.choice_index} is out of range "
                                   f"(the response had {len(served.choices)} choices)")
        rated = served.choices[feedback.choice_index]
        if not rated.text.strip():
            raise FeedbackRejected("the rated answer is empty")
        extra = Candidate(text=rated.text, completion_tokens=rated.completion_tokens, finish_reason=rated.finish_reason,
                          origin="served", user_rating=feedback.rating)
        out.append((topics["prompts"], PromptEvent(producer="gateway", messages=served.messages, source="feedback",
                                                   extra_candidates=[extra])))
    return out


class FeedbackPublisher:
    def __init__(self, producer: EventProducer, topics: list[Topic], outbox_dir: str,
                 retry_s: float, timeout_s: float = 5.0) -> None:
        self._producer = producer  # renews its own connection after a failed publish
        self._timeout = timeout_s
        self._dir = Path(outbox_dir)
        self._dir.mkdir(parents=True, exist_ok=True)
        self._file = self._dir / "outbox.jsonl"
        self._lock = threading.Lock()
        self._topics = {t.name: t for t in topics}
        self._stop = threading.Event()
        self._retry_s = retry_s
        self._thread = threading.Thread(target=self._drain_loop, name="feedback-outbox", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        with self._lock:
            return len(self._file.read_text().splitlines()) if self._file.exists() else 0

    def publish(self, items: list[tuple[Topic, Event]]) -> str:
        """'accepted' if the broker acknowledged every event, else 'queued' in the durable outbox."""
        if not self.queued:
            try:
                for topic, event in items:
                    self._producer.publish(topic, [event], timeout_s=self._timeout)
                return "accepted"
            except Exception as exc:  # noqa: BLE001 - any broker failure goes to the outbox
                log.warning("broker unavailable for feedback (%s); writing to the outbox", type(exc).__name__)
        self._append(items)
        return "queued"

    def _append(self, items: list[tuple[Topic, Event]]) -> None:
        with self._lock, open(self._file, "a") as f:
            for topic, event in items:
                f.write(json.dumps({"topic": topic.name, "event": event.model_dump(mode="json")}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _drain_loop(self) -> None:
        while not self._stop.wait(self._retry_s):
            try:
                self.drain()
            except Exception:  # noqa: BLE001 - keep retrying
                log.info("outbox not drained yet; will retry")

    def drain(self) -> int:
        """Publish queued records in order; keep the ones not yet acknowledged. Returns how many were sent."""
        with self._lock:
            if not self._file.exists():
                return 0
            lines = [json.loads(x) for x in self._file.read_text().splitlines() if x.strip()]
            sent = 0
            for row in lines:
                topic = self._topics.get(row["topic"])
                if topic is None:
                    break
                event = topic.schema.model_validate(row["event"])
                self._producer.publish(topic, [event], timeout_s=self._timeout)  # raises: keep the rest
                sent += 1
                remaining = lines[sent:]
                tmp = self._file.with_suffix(".tmp")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in remaining))
                os.replace(tmp, self._file)
            if sent:
                log.info("outbox: delivered %d queued feedback records", sent)
            return sent

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._producer.close()
