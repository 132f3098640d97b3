"""Wire contracts: round trips, content ids, and rejection of bad payloads."""

import json

import pytest
from pydantic import ValidationError

from shared.kafka.codec import DecodeError, decode, encode
from shared.topics import (ABSTENTIONS, ALL_TOPICS, CANDIDATES, FEEDBACK, MODEL_UPDATES, PREFERENCES, PROMPTS,
                           all_topics_with_dlq)
from shared.wire import (Candidate, CandidatesEvent, ChatMessage, DeadLetter, EvalSummary, FeedbackEvent,
                         JudgementAbstainedEvent, ModelUpdatedEvent, PreferenceEvent, PromptEvent, RubricScores,
                         SamplingParams)
from tests.helpers import prompt


def sample_events() -> dict:
    p = prompt("I have had a headache for three days. What should I do?", reference_answer="See a doctor.")
    cands = CandidatesEvent(producer="generator", prompt=p, policy_version="v0001", prompt_tokens=12, candidates=[
        Candidate(text="Rest, drink water, and see a doctor if it persists.", completion_tokens=12, finish_reason="stop"),
        Candidate(text="It is a tumour.", completion_tokens=5, finish_reason="length"),
    ])
    scores = RubricScores(correctness=7, clarity=8, safety=9, empathy=6)
    pref = PreferenceEvent(producer="judge", prompt_id=p.id, prompt_messages=p.messages, chosen="See a doctor.",
                           rejected="It is a tumour.", source="judge", judge_id="rubric-v1", reasoning="safer",
                           chosen_scores=scores, rejected_scores=scores, policy_version="v0001")
    return {
        PROMPTS: p,
        CANDIDATES: cands,
        PREFERENCES: pref,
        ABSTENTIONS: JudgementAbstainedEvent(producer="judge", candidates_id=cands.id, prompt_id=p.id,
                                             policy_version="v0001", judge_id="rubric-v1", reason="inconsistent"),
        FEEDBACK: FeedbackEvent(producer="gateway", response_id="chatcmpl-1", key_id="k1", model_version="v0001",
                                preferred_index=1),
        MODEL_UPDATES: ModelUpdatedEvent(producer="trainer", version="v0002", parent="v0001", kind="dpo",
                                         location="/registry/v0002",
                                         eval_summary=EvalSummary(win_rate_vs_parent=0.6, promoted=True)),
    }


def test_every_topic_has_a_sample_and_a_dead_letter_topic():
    assert set(sample_events()) == set(ALL_TOPICS)
    names = [t.name for t in all_topics_with_dlq()]
    assert len(names) == len(set(names)) == 2 * len(ALL_TOPICS)
    assert all(t.dead_letter.schema is DeadLetter for t in ALL_TOPICS)
    assert all_topics_with_dlq("x.")[0].name == "x." + ALL_TOPICS[0].name


@pytest.mark.parametrize("topic", ALL_TOPICS, ids=lambda t: t.schema.__name__)
def test_schema_round_trips_through_codec(topic):
    event = sample_events()[topic]
    back = decode(topic, encode(event))
    assert back == event
    assert back.id == event.id and back.schema_version == max(topic.schema.SCHEMA_VERSIONS)
    assert back.producer == event.producer


def test_content_ids_are_stable_and_content_sensitive():
    a = prompt("How do I sleep better?")
    b = prompt("How do I sleep better?")
    c = prompt("How do I sleep better tonight?")
    assert a.id == b.id
    assert a.id != c.id and a.id.startswith("prm_")
    # JSON with defaults omitted hashes the same as Python construction
    raw = {"producer": "test", "messages": [{"role": "user", "content": "How do I sleep better?"}]}
    assert PromptEvent.model_validate(raw).id == a.id


def test_a_version_1_preference_decodes_as_two_finished_answers_and_cannot_claim_a_cut():
    event = sample_events()[PREFERENCES]
    body = json.loads(event.model_dump_json(exclude={"chosen_cut", "rejected_cut"}))
    old = decode(PREFERENCES, json.dumps({**body, "schema_version": 1}).encode())
    assert old.id == event.id and (old.chosen_cut, old.rejected_cut) == (False, False)
    with pytest.raises(DecodeError) as info:
        decode(PREFERENCES, json.dumps({**body, "schema_version": 1, "rejected_cut": True}).encode())
    assert "carry no chosen_cut" in str(info.value)
    assert decode(PREFERENCES, json.dumps({**body, "rejected_cut": True}).encode()).rejected_cut


def test_a_tampered_id_is_rejected():
    event = sample_events()[PREFERENCES]
    body = json.loads(event.model_dump_json())
    body["chosen"] = "Something else entirely."
    with pytest.raises(DecodeError) as info:
        decode(PREFERENCES, json.dumps(body).encode())
    assert info.value.kind == "validation" and "does not match its content" in str(info.value)


@pytest.mark.parametrize("raw, kind, needle", [
    (b"\xff\xfe", "decode", "UTF-8"),
    (b"not json", "decode", "not JSON"),
    (b"[1, 2]", "decode", "expected an object"),
    (b'{"schema_version": 99, "producer": "test"}', "schema_version", "unknown schema_version 99"),
    (b'{"producer": "test"}', "schema_version", "unknown schema_version None"),
    (b'{"schema_version": 1, "producer": "test", "messages": []}', "validation", "messages"),
])
def test_codec_reports_why_a_record_is_unreadable(raw, kind, needle):
    with pytest.raises(DecodeError) as info:
        decode(PROMPTS, raw)
    assert info.value.kind == kind and needle in str(info.value)


def user(text):
    return [ChatMessage(role="user", content=text)]


@pytest.mark.parametrize("build, needle", [
    (lambda: ChatMessage(role="user", content="   "), "blank"),
    (lambda: ChatMessage(role="tool", content="x"), "role"),
    (lambda: PromptEvent(producer="test", messages=[ChatMessage(role="assistant", content="hi")]), "last message"),
    (lambda: PromptEvent(producer="test", messages=user("q"), n=1), "n"),
    (lambda: PromptEvent(producer="test", messages=user("q"), unknown=1), "unknown"),
    (lambda: SamplingParams(temperature=0), "temperature"),
    (lambda: SamplingParams(top_p=1.5), "top_p"),
    (lambda: RubricScores(correctness=11, clarity=5, safety=5, empathy=5), "correctness"),
    (lambda: PreferenceEvent(producer="judge", prompt_id="p", prompt_messages=user("q"), chosen="same",
                             rejected=" same ", source="judge", judge_id="j", policy_version="v"), "same text"),
    (lambda: PreferenceEvent(producer="judge", prompt_id="p", prompt_messages=user("q"), chosen="a",
                             rejected="b", source="oracle", judge_id="j", policy_version="v"), "source"),
    (lambda: FeedbackEvent(producer="gateway", response_id="r", key_id="k", model_version="v", rating=1,
                           choice_index=0, preferred_index=1), "either a rating"),
    (lambda: FeedbackEvent(producer="gateway", response_id="r", key_id="k", model_version="v", rating=1), "choice_index"),
    (lambda: CandidatesEvent(producer="generator", prompt=prompt("q"), prompt_id="prm_other", policy_version="v",
                             prompt_tokens=1, candidates=[Candidate(text="a", completion_tokens=1,
                                                                    finish_reason="stop")]), "prompt_id"),
])
def test_bad_payloads_are_rejected(build, needle):
    with pytest.raises(ValidationError) as info:
        build()
    assert needle in str(info.value)


def test_events_are_immutable():
    event = prompt("q")
    with pytest.raises(ValidationError):
        event.n = 5
