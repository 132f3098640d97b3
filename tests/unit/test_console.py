"""The operator console without processes: abstentions v1/v2, the review queue (order, idempotence,
human preferences into the outbox, agreement), the pairs filter and export, judge health, and the
console's keys (401 without one, 403 for a viewer labelling)."""

import json
from datetime import datetime, timedelta, timezone

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from services.trainer.console import ConsoleQueries, PairFilter
from services.trainer.console_api import install_console
from services.trainer.ledger import PreferenceLedger
from services.trainer.review import ConsoleError, ReviewStore, shown_order
from services.trainer.settings import TrainerSettings
from shared.console_wire import ReviewDecisionRequest
from shared.kafka import DecodeError, Received, decode
from shared.observability import new_registry
from shared.outbox import Outbox
from shared.topics import ABSTENTIONS, PREFERENCES
from shared.wire import ChatMessage, JudgementAbstainedEvent, PreferenceEvent
from tests.unit.test_judge import event, pairwise, ranked, rated_event, run

PROMPT = [ChatMessage(role="user", content="My knee hurts after running. What should I do?")]


def abstention(n: int, favours=0, reason="tie", **kw) -> JudgementAbstainedEvent:
    pair = dict(prompt_messages=PROMPT, answers=[f"rest and see a doctor ({n})", f"run more ({n})"])
    return JudgementAbstainedEvent(producer="judge", candidates_id=f"cnd_{n}", prompt_id="prm_1",
                                   policy_version="v0002", judge_id="rubric-v1", reason=reason,
                                   judge_favours=favours, **{**pair, **kw})


def received(events):
    return [Received(event=e, topic="t", partition=0, offset=i, key=None) for i, e in enumerate(events)]


@pytest.fixture
def store(tmp_path):
    outbox = Outbox(tmp_path / "review-outbox.sqlite", [PREFERENCES], new_registry(), "review")
    s = ReviewStore(tmp_path / "review.sqlite", outbox, PREFERENCES)
    yield s
    s.close()
    outbox.close()


def queued_preferences(store) -> list[PreferenceEvent]:
    rows = store._outbox._db.execute("SELECT event FROM outbox ORDER BY seq").fetchall()
    return [PreferenceEvent.model_validate_json(e) for (e,) in rows]


def test_abstention_v2_carries_the_pair_and_v1_records_still_decode():
    v2 = abstention(1)
    assert v2.schema_version == 2 and decode(ABSTENTIONS, v2.model_dump_json().encode()) == v2
    v1 = {"schema_version": 1, "producer": "judge", "candidates_id": "c", "prompt_id": "p", "policy_version": "v1",
          "judge_id": "j", "reason": "tie"}
    old = decode(ABSTENTIONS, json.dumps(v1).encode())
    assert old.schema_version == 1 and old.answers == [] and old.id == JudgementAbstainedEvent(
        **{**v1, "schema_version": 2}).id  # the same id in either version
    with pytest.raises(DecodeError, match="schema_version 1"):
        decode(ABSTENTIONS, json.dumps({**v1, "answers": ["a", "b"], "prompt_messages": [PROMPT[0].model_dump()]})
               .encode())


def test_the_judge_puts_the_pair_and_its_leaning_into_abstentions():
    tie = run(pairwise(ranked({"a": 2, "b": 1}), min_margin=15.0).decide(event("a", "b"))).abstention
    assert tie.answers == ["a", "b"] and tie.judge_favours == 0 and tie.prompt_messages[0].role == "user"
    flat = run(pairwise(lambda a, b: "tie").decide(event("good", "bad"))).abstention
    assert sorted(flat.answers) == ["bad", "good"] and flat.judge_favours is None
    conflict = run(pairwise(ranked({"rated": 1, "fresh1": 3, "fresh2": 2})).decide(
        rated_event(["rated", "fresh1", "fresh2"], 1))).abstention
    assert conflict.answers == ["fresh2", "rated"] and conflict.judge_favours == 0
    alone = run(pairwise(lambda a, b: "A").decide(event("same", "same"))).abstention
    assert alone.answers == [] and alone.prompt_messages == []


def test_review_queue_settles_pairs_into_human_preferences_once(store):
    store.handle(received([abstention(1), abstention(2, favours=None), abstention(3, reason="inconsistent")]))
    store.handle(received([abstention(1)]))  # a redelivery
    v1 = JudgementAbstainedEvent(schema_version=1, producer="judge", candidates_id="c9", prompt_id="p",
                                 policy_version="v1", judge_id="j", reason="tie")
    store.handle(received([v1]))
    queue = store.queue("ann", 10)
    assert queue.pending == 3 and len(queue.items) == 3 and len(store.abstentions()) == 4
    first = queue.items[0]
    a_index = shown_order(first.item_id, "ann")[0]
    assert first.a == abstention(1).answers[a_index]

    decision = store.decide(ReviewDecisionRequest(item_id=first.item_id, reviewer="ann", pick="a"))
    [pref] = queued_preferences(store)
    assert (pref.source, pref.judge_id, pref.chosen, pref.id) == ("human", "human:ann", first.a, decision.preference_id)
    assert decision.agrees_with_judge == (a_index == 0)
    again = store.decide(ReviewDecisionRequest(item_id=first.item_id, reviewer="ann", pick="a"))
    assert again.duplicate and again.decision_id == decision.decision_id and len(queued_preferences(store)) == 1
    with pytest.raises(ConsoleError) as exc:
        store.decide(ReviewDecisionRequest(item_id=first.item_id, reviewer="ann", pick="b"))
    assert exc.value.status == 409

    second = queue.items[1]
    neither = store.decide(ReviewDecisionRequest(item_id=second.item_id, reviewer="bob", pick="neither"))
    assert neither.preference_id is None and len(queued_preferences(store)) == 1
    with pytest.raises(ConsoleError):
        store.decide(ReviewDecisionRequest(item_id=v1.id, reviewer="bob", pick="a"))  # no pair to show
    assert store.queue("ann", 10).pending == 1
    stats = {r.reviewer: r for r in store.stats().reviewers}
    assert (stats["ann"].decisions, stats["ann"].preferences, stats["ann"].compared) == (1, 1, 1)
    assert (stats["bob"].neither, stats["bob"].compared, stats["bob"].agreement_rate) == (1, 0, None)


def test_the_shown_order_is_fixed_per_reviewer_and_varies_between_items():
    orders = {shown_order(f"abs_{i}", "ann") for i in range(20)}
    assert orders == {(0, 1), (1, 0)} and shown_order("abs_1", "ann") == shown_order("abs_1", "ann")


def pref(n: int, source="judge", at=None, **kw) -> PreferenceEvent:
    return PreferenceEvent(producer="test", prompt_id=f"p{n}", prompt_messages=[ChatMessage(role="user",
                           content=f"question {n}")], chosen=f"a longer answer {n}", rejected=f"short {n}",
                           source=source, judge_id="rubric", policy_version="v0001",
                           created_at=at or datetime.now(timezone.utc), **kw)


class Runner:
    def runs(self):
        return []


class Letters:
    def __init__(self, records):
        self._records = records

    def records(self):
        return self._records


def test_pairs_filter_pages_export_and_judge_health(tmp_path, store):
    ledger = PreferenceLedger(tmp_path / "ledger")
    hour_ago = datetime.now(timezone.utc) - timedelta(hours=1)
    ledger.append([pref(i, at=hour_ago) for i in range(5)] + [pref(9, source="human", split="eval")])
    store.handle(received([abstention(1, reason="inconsistent"), abstention(2)]))
    queries = ConsoleQueries(Runner(), ledger, store, Letters([(hour_ago, "prefloop.candidates.v1: handler")]))
    page = queries.pairs(PairFilter(), 0, 4)
    assert page.total == 6 and len(page.pairs) == 4 and page.pairs[0].source == "human"  # newest first
    assert queries.pairs(PairFilter(q="QUESTION 3"), 0, 10).pairs[0].prompt_id == "p3"
    assert queries.pairs(PairFilter(source="human", split="eval"), 0, 10).total == 1
    rows = [json.loads(line) for line in queries.export_jsonl(PairFilter(source="judge"))]
    assert len(rows) == 5 and rows[0]["chosen"][0]["role"] == "assistant" and rows[0]["prompt"][0]["role"] == "user"
    exported = tmp_path / "pairs.jsonl"
    exported.write_text("".join(queries.export_jsonl(PairFilter())))
    import datasets

    loaded = datasets.load_dataset("json", data_files=str(exported), split="train")
    assert len(loaded) == 6 and {"prompt", "chosen", "rejected"} <= set(loaded.column_names)
    parquet = queries.export_parquet(PairFilter(source="judge"), tmp_path / "pairs.parquet")
    assert datasets.Dataset.from_parquet(str(parquet))[0]["chosen"] == rows[0]["chosen"]

    health = queries.judge_health(3600)
    total = health.total
    assert (total.judge_preferences, total.human_preferences) == (5, 1)
    assert total.swap_consistency == round(5 / 6, 3) and total.longer_chosen_rate == 1.0
    assert total.abstentions == {"inconsistent": 1, "tie": 1} and total.tie_rate == round(1 / 7, 3)
    assert total.dead_letters == {"prefloop.candidates.v1: handler": 1} and len(health.buckets) == 2


@pytest.fixture
def console(store):
    app = FastAPI()
    settings = TrainerSettings(admin_key="admin-k", viewer_key="viewer-k")
    install_console(app, settings, lambda: {"queries": ConsoleQueries(Runner(), None, store, Letters([]))})
    store.handle(received([abstention(1)]))
    return TestClient(app)


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def test_console_keys_no_key_is_401_and_a_viewer_cannot_label(console, store):
    item = store.queue("ann", 1).items[0].item_id
    body = {"item_id": item, "reviewer": "ann", "pick": "a"}
    for headers in ({}, bearer("wrong")):
        r = console.get("/console/api/review/stats", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert console.get("/console/api/whoami", headers=bearer("viewer-k")).json() == {"role": "viewer"}
    assert console.get("/console/api/review/queue?reviewer=ann", headers=bearer("viewer-k")).status_code == 200
    r = console.post("/console/api/review/decisions", json=body, headers=bearer("viewer-k"))
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    assert console.post("/console/api/review/decisions", json=body).status_code == 401
    r = console.post("/console/api/review/decisions", json={**body, "reviewer": "bad name!"}, headers=bearer("admin-k"))
    assert r.status_code == 400 and "reviewer" in r.json()["error"]["message"]
    assert console.post("/console/api/review/decisions", json=body, headers=bearer("admin-k")).json()["pick"] == "a"
    assert "prefloop console" in console.get("/console").text  # the shell holds no data


def test_console_is_503_without_keys_and_the_viewer_key_must_differ(store):
    app = FastAPI()
    install_console(app, TrainerSettings(), lambda: {})
    assert TestClient(app).get("/console/api/whoami").status_code == 503
    with pytest.raises(ValueError, match="must differ"):
        TrainerSettings(admin_key="same", viewer_key="same")
