"""The chat page at `/`, driven by Playwright in Debian's headless chromium (installed by
scripts/install.sh test; Playwright cannot download its own browser on these machines)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from shared.topics import FEEDBACK, PREFERENCES, PROMPTS
from tests.helpers import read_events
from tests.integration.procs import ServiceProcess

CHROMIUM = Path("/usr/bin/chromium")
KEY = "sk-browser-user"
# The flags the machine notes ask for: no sandbox as root, no GPU, and no background networking
# (this machine's network is closed; chromium would otherwise keep trying Google's hosts).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
COUNT_UPDATES = """() => {
  window.textUpdates = 0;
  new MutationObserver(() => window.textUpdates++)
    .observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture
def page(tmp_path):
    assert CHROMIUM.exists(), "Debian chromium is missing: run scripts/install.sh test"
    profile = tempfile.mkdtemp(dir=tmp_path)
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(profile, executable_path=str(CHROMIUM), headless=True,
                                                        args=FLAGS)
        yield context.pages[0] if context.pages else context.new_page()
        context.close()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def gateway(kafka, tmp_path, tiny_registry):
    shutil.copytree(tiny_registry, tmp_path / "registry")
    gw = ServiceProcess("gateway", kafka, tmp_path, registry_dir=tmp_path / "registry", api_keys=KEY,
                        outbox_dir=tmp_path / "outbox", default_max_tokens=48).start()
    yield gw
    gw.kill()


def send(page, text: str) -> None:
    page.fill("#msg", text)
    page.click("#send")


def test_chat_page_streams_an_answer_and_feedback_reaches_the_broker(page, gateway, kafka):
    page.goto(gateway.url + "/")
    expect(page).to_have_title("prefloop chat")
    page.fill("#key", KEY)
    page.evaluate(COUNT_UPDATES)

    send(page, "I have a headache. What should I do?")
    answer = page.locator(".answer .text").first
    thumbs_up = page.locator(".thumbs-up").first
    expect(thumbs_up).to_be_visible(timeout=60_000)  # the buttons appear when the stream has ended
    text = answer.inner_text()
    assert text.strip()
    assert page.evaluate("window.textUpdates") > 3, "the answer arrived in one piece, not streamed"
    expect(page.locator("#version")).to_have_text("model v0001")

    thumbs_up.click()
    expect(page.locator(".answer .meta span").first).to_contain_text("thanks", timeout=30_000)
    expect(thumbs_up).to_be_disabled()
    feedback = read_events(kafka.bootstrap_servers, FEEDBACK.with_prefix(kafka.topic_prefix), 1, 30)[0]
    assert feedback.rating == 1 and feedback.choice_index == 0
    requeued = read_events(kafka.bootstrap_servers, PROMPTS.with_prefix(kafka.topic_prefix), 1, 30)[0]
    assert requeued.source == "feedback" and requeued.extra_candidates[0].text.strip() == text.strip()

    # two answers, pick the second: a user preference with the page's texts as chosen/rejected
    page.check("#two")
    send(page, "Is my cough serious?")
    picks = page.locator(".pick")
    expect(picks).to_have_count(2, timeout=60_000)
    texts = [t.strip() for t in page.locator(".turn").last.locator(".answer .text").all_inner_texts()]
    picks.nth(1).click()
    if texts[0] == texts[1]:  # rare with the tiny model: the page must then show the refusal
        expect(page.locator(".turn").last.locator(".error").first).to_contain_text("identical", timeout=30_000)
        return
    expect(picks.nth(0)).to_be_disabled(timeout=30_000)
    preference = read_events(kafka.bootstrap_servers, PREFERENCES.with_prefix(kafka.topic_prefix), 1, 30)[0]
    assert preference.source == "user"
    assert (preference.chosen.strip(), preference.rejected.strip()) == (texts[1], texts[0])


def test_chat_page_shows_the_api_error_for_a_wrong_key(page, gateway):
    page.goto(gateway.url + "/")
    page.fill("#key", "sk-wrong")
    send(page, "hello")
    expect(page.locator(".answer .text.error")).to_contain_text("API key", timeout=30_000)
