"""User feedback -> FeedbackEvent, plus a PreferenceEvent (a pick of two) or a re-queued
PromptEvent carrying the rated answer (a rating). If the broker cannot take them, they go to a
durable local outbox (sqlite) that a background thread drains once it is back: the client gets
202 either way and nothing is lost (an event the broker refuses for good is kept aside, with why)."""

from __future__ import annotations

import logging
import threading

from shared.kafka import EventProducer
from shared.outbox import Outbox
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
            policy_version=served.model_version, chosen_cut=chosen.finish_reason == "length",
            rejected_cut=rejected.finish_reason == "length")))
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
    """Publishes feedback events; whatever the broker does not take at once goes to the durable
    outbox (sqlite, `shared/outbox.py`), which the app's relay thread drains in order."""

    def __init__(self, producer: EventProducer, outbox: Outbox, timeout_s: float = 5.0) -> None:
        self._producer = producer  # renews its own connection after a failed publish
        self.outbox = outbox
        self._timeout = timeout_s

    def publish(self, items: list[tuple[Topic, Event]]) -> str:
        """'accepted' if the broker acknowledged every event, else 'queued' in the durable outbox
        (the events not yet acknowledged; a permanent rejection is moved aside there, with why)."""
        sent = 0
        if not len(self.outbox):  # otherwise queue behind what waits, to keep the order
            try:
                for topic, event in items:
                    self._producer.publish(topic, [event], timeout_s=self._timeout)
                    sent += 1
                return "accepted"
            except Exception as exc:  # noqa: BLE001 - any failure goes to the outbox, which sorts it out
                log.warning("feedback not published (%s); writing to the outbox", type(exc).__name__)
        self.outbox.put(items[sent:])
        return "queued"

    def relay_until(self, stop: threading.Event, retry_s: float) -> None:
        self.outbox.relay_until(stop, self._producer, retry_s, self._timeout)

    def close(self) -> None:
        self._producer.close()
        self.outbox.close()
