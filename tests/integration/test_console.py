"""The operator console on a real trainer process (real broker, the real tiny model), driven by
Playwright in Debian's headless chromium: a promoted version with its gate figures, a pair found by
text, two review-queue items settled, and the human preferences on the topic and in the ledger."""

from __future__ import annotations

import shutil

import httpx
import pytest
from playwright.sync_api import expect

from shared.kafka import reader
from shared.kafka.dead_letters import make_dead_letter
from shared.topics import ABSTENTIONS, CANDIDATES, PREFERENCES
from shared.wire import ChatMessage, JudgementAbstainedEvent
from tests.helpers import wait_for
from tests.integration.procs import ServiceProcess
from tests.integration import test_chat_page

ADMIN, VIEWER = "admin-console-key", "viewer-console-key"
page = test_chat_page.page  # the chromium fixture


def abstention(n: int) -> JudgementAbstainedEvent:
    return JudgementAbstainedEvent(
        producer="test", candidates_id=f"cnd_console_{n}", prompt_id=f"prm_console_{n}", policy_version="v0001",
        judge_id="rubric-v1", reason="tie", judge_favours=0,
        prompt_messages=[ChatMessage(role="user", content=f"Console question {n}: my ankle is swollen.")],
        answers=[f"Rest it, keep it raised and see a doctor if it gets worse ({n}).", f"Ignore it ({n})."])


def unique_text(preferences):
    """A pair and a piece of its chosen answer that no other pair's texts contain (the tiny model repeats itself)."""
    def text(p):
        return "\n".join([*(m.content for m in p.prompt_messages), p.chosen, p.rejected]).lower()
    for p in preferences:
        for start in range(0, max(1, len(p.chosen) - 24), 8):
            needle = p.chosen[start:start + 24].strip()
            if len(needle) >= 12 and sum(needle.lower() in text(q) for q in preferences) == 1:
                return p, needle
    raise AssertionError("no pair has a unique piece of text")


@pytest.fixture
def trainer(kafka, tmp_path, tiny_registry):
    shutil.copytree(tiny_registry, tmp_path / "registry")
    proc = ServiceProcess("trainer", kafka, tmp_path, registry_dir=tmp_path / "registry",
                          ledger_dir=tmp_path / "ledger", runs_dir=tmp_path / "runs", check_interval_s=0.5,
                          eval_prompts=16, eval_max_new_tokens=48, batch_timeout_ms=200, admin_key=ADMIN,
                          viewer_key=VIEWER, min_new_pairs=30, min_win_ci_lower=-1, max_perplexity_increase=1.0,
                          max_length_drift=1.0, safety_tolerance=10, heldout_pairs=0, announce_retry_s=0.2).start()
    yield proc
    proc.kill()


def api(trainer, path: str, key: str | None = ADMIN, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(kw.pop("method", "GET"), f"{trainer.url}/console/api{path}", headers=headers, timeout=30, **kw)


def test_console_shows_versions_finds_pairs_and_settles_the_review_queue(page, trainer, kafka, producer,
                                                                        preferences):
    topic = PREFERENCES.with_prefix(kafka.topic_prefix)
    producer.publish(topic, preferences)
    producer.publish(ABSTENTIONS.with_prefix(kafka.topic_prefix), [abstention(1), abstention(2)])
    dlq = CANDIDATES.with_prefix(kafka.topic_prefix).dead_letter
    producer.publish(dlq, [make_dead_letter("prefloop.candidates.v1", 0, 7, None, b"{}", "validation", "bad", "judge",
                                            1)])
    run = wait_for(lambda: [r for r in trainer.get("/runs").json() if r["status"] != "running"], 300,
                   "a finished training run", interval_s=1)[0]
    assert run["status"] == "promoted", run
    summary = run["eval_summary"]

    # keys: none is 401, a viewer reads but cannot label
    assert api(trainer, "/versions", key=None).status_code == 401
    assert api(trainer, "/versions", key="wrong").json()["error"]["type"] == "authentication_error"
    assert api(trainer, "/versions", key=VIEWER).status_code == 200
    queue = wait_for(lambda: api(trainer, "/review/queue?reviewer=viewer", key=VIEWER).json()["items"], 30,
                     "the abstentions in the review queue")
    denied = api(trainer, "/review/decisions", key=VIEWER, method="POST",
                 json={"item_id": queue[0]["item_id"], "reviewer": "viewer", "pick": "a"})
    assert denied.status_code == 403 and denied.json()["error"]["type"] == "permission_error"

    page.goto(trainer.url + "/console")
    expect(page).to_have_title("prefloop console")
    page.fill("#key", ADMIN)
    page.click("#connect")
    expect(page.locator("#role")).to_have_text("signed in as admin")
    version = page.locator("tr.version[data-version='v0002']")
    expect(version).to_contain_text("current", timeout=30_000)
    fixed = [page.evaluate("v => v.toFixed(3)", v) for v in (summary["win_rate_vs_parent"], *summary["win_rate_ci95"])]
    expect(version).to_contain_text(f"{fixed[0]} [{fixed[1]}, {fixed[2]}]")
    expect(page.locator("tr.version[data-version='v0001']")).to_contain_text("promoted")

    page.click("nav button[data-tab='pairs']")
    wanted, needle = unique_text(preferences)
    page.fill("#pair-q", needle)
    page.click("#pair-search")
    expect(page.locator("#pair-count")).to_contain_text("1 pairs match", timeout=30_000)
    expect(page.locator("#pairs .pair")).to_contain_text(wanted.id)
    expect(page.locator("#pairs .pair .chosen")).to_contain_text(needle)

    page.click("nav button[data-tab='review']")
    page.fill("#reviewer", "alice")
    page.click("#review-load")
    items = page.locator("#queue .item")
    expect(items).to_have_count(2, timeout=30_000)
    shown = [items.nth(i).locator(".answer-a").inner_text().removeprefix("A:\n") for i in range(2)]
    items.nth(0).locator(".pick-a").click()
    expect(page.locator("#queue .settled")).to_have_count(1, timeout=30_000)
    page.locator("#queue .item .pick-a").first.click()
    expect(page.locator("#queue .settled")).to_have_count(2, timeout=30_000)
    expect(page.locator("#review-stats")).to_contain_text("alice")

    # the picks reach the preferences topic (source human) and, through it, the ledger
    def human_on_topic():
        events = reader.read_events(kafka.bootstrap_servers, topic, len(preferences) + 2, timeout_s=5)
        return [e for e in events if e.source == "human"]
    human = wait_for(lambda: len(human_on_topic()) == 2 and human_on_topic(), 60, "two human preferences")
    assert {e.chosen.strip() for e in human} == {s.strip() for s in shown}
    assert {e.judge_id for e in human} == {"human:alice"}
    ledger = wait_for(lambda: api(trainer, "/pairs?source=human").json()["total"] == 2, 60, "the ledger to hold them")
    assert ledger
    stats = api(trainer, "/review/stats").json()
    assert stats["settled"] == 2 and stats["pending"] == 0 and stats["reviewers"][0]["decisions"] == 2
    health = api(trainer, "/judge-health").json()["total"]
    assert health["abstentions"] == {"tie": 2} and health["human_preferences"] == 2
    assert wait_for(lambda: api(trainer, "/judge-health").json()["total"]["dead_letters"], 30, "the dead letter") == {
        "prefloop.candidates.v1: validation": 1}
    csv = api(trainer, f"/runs/{run['run_id']}/blinded_eval.csv")
    assert csv.status_code == 200 and csv.text.count("\n") > 1
