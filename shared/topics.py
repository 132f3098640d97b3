"""The one topic registry: names, partitions, the event each carries, its dead-letter topic.

Operators may namespace every topic with `PREFLOOP_KAFKA_TOPIC_PREFIX` (tests use a
fresh prefix per test so topics never leak between them).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from shared.wire import (
    CandidatesEvent,
    DeadLetter,
    Event,
    FeedbackEvent,
    JudgementAbstainedEvent,
    ModelUpdatedEvent,
    PreferenceEvent,
    PromptEvent,
)


@dataclass(frozen=True)
class Topic:
    name: str
    schema: type[Event]
    partitions: int = 1
    description: str = ""

    @property
    def dead_letter(self) -> "Topic":
        return Topic(f"{self.name}.dlq", DeadLetter, 1, f"records from {self.name} that could not be handled")

    def with_prefix(self, prefix: str) -> "Topic":
        return replace(self, name=f"{prefix}{self.name}") if prefix else self


PROMPTS = Topic("prefloop.prompts.v1", PromptEvent, 4, "prompts to sample candidates for (ingest, feedback)")
CANDIDATES = Topic("prefloop.candidates.v1", CandidatesEvent, 4, "candidate answers tagged with the policy version")
PREFERENCES = Topic("prefloop.preferences.v1", PreferenceEvent, 4, "chosen/rejected pairs from the judge and users")
ABSTENTIONS = Topic("prefloop.abstentions.v1", JudgementAbstainedEvent, 1, "pairs the judge declined to label")
FEEDBACK = Topic("prefloop.feedback.v1", FeedbackEvent, 1, "user ratings and picks from the gateway")
MODEL_UPDATES = Topic("prefloop.model-updates.v1", ModelUpdatedEvent, 1, "promoted model versions")

ALL_TOPICS: tuple[Topic, ...] = (PROMPTS, CANDIDATES, PREFERENCES, ABSTENTIONS, FEEDBACK, MODEL_UPDATES)


def all_topics_with_dlq(prefix: str = "") -> list[Topic]:
    """Every topic and its dead-letter topic, namespaced by `prefix`."""
    out: list[Topic] = []
    for topic in ALL_TOPICS:
        named = topic.with_prefix(prefix)
        out += [named, named.dead_letter]
    return out
