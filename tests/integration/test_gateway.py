"""Gateway (`prefloop serve gateway`) with the tiny model, driven by the official openai SDK."""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading

import httpx
import openai
import pytest

from shared.engine import GenerationEngine
from shared.registry import ModelRegistry
from shared.topics import FEEDBACK, MODEL_UPDATES, PREFERENCES, PROMPTS
from shared.wire import ModelUpdatedEvent
from tests.helpers import read_events, wait_for
from tests.integration.procs import ServiceProcess

KEY, OTHER, ADMIN = "sk-user-one", "sk-user-two", "sk-admin"


@pytest.fixture
def registry_copy(tiny_registry, tmp_path):
    shutil.copytree(tiny_registry, tmp_path / "registry")
    return ModelRegistry(tmp_path / "registry")


@pytest.fixture
def gateway(kafka, tmp_path, registry_copy):
    # 32 streaming clients x up to 40 requests each must not meet the per-key rate limit (the
    # 429 path has its own test below)
    gw = ServiceProcess("gateway", kafka, tmp_path, registry_dir=registry_copy.root, api_keys=f"{KEY},{OTHER}",
                        admin_key=ADMIN, outbox_dir=tmp_path / "outbox", default_max_tokens=48,
                        outbox_retry_s=0.5, requests_per_minute=100_000).start()
    yield gw
    gw.kill()


def client(gw, key=KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=60)


def ask(text="I have a headache. What should I do?"):
    return [{"role": "user", "content": text}]


def test_non_stream_stream_and_n2_through_the_openai_sdk(gateway):
    c = client(gateway)
    out = c.chat.completions.create(model="prefloop", messages=ask(), max_tokens=32)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.system_fingerprint == "v0001" and out.choices[0].message.content
    assert out.usage.completion_tokens > 0 and out.usage.total_tokens > out.usage.prompt_tokens > 0

    pieces, finish, usage, fingerprints = [], None, None, set()
    for chunk in c.chat.completions.create(model="prefloop", messages=ask(), max_tokens=32, stream=True):
        fingerprints.add(chunk.system_fingerprint)
        for ch in chunk.choices:
            pieces.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
        usage = chunk.usage or usage
    assert "".join(pieces).strip() and finish in ("stop", "length") and usage.completion_tokens > 0
    assert fingerprints == {"v0001"}

    two = c.chat.completions.create(model="prefloop", messages=ask(), n=2, max_tokens=32)
    assert [ch.index for ch in two.choices] == [0, 1]
    assert c.models.list().data[1].id == "v0001"


def test_auth_and_invalid_bodies_get_openai_errors_never_500(gateway):
    with pytest.raises(openai.AuthenticationError):
        client(gateway, "sk-wrong").chat.completions.create(model="prefloop", messages=ask())
    c = client(gateway)
    for kwargs, param in ((dict(messages=[]), "messages"), (dict(messages=ask(), n=50), "n"),
                          (dict(messages=ask(), max_tokens=100_000), "max_tokens"),
                          (dict(messages=ask(), temperature=5), "temperature"),
                          (dict(messages=ask(), seed=2**64), "seed"),  # once a 500 (torch seed overflow)
                          (dict(messages=ask(), n="2"), "n"),
                          (dict(messages=[{"role": "tool", "content": "x"}]), "messages"),
                          (dict(messages=[{"role": "user", "content": "   "}]), "messages"),
                          (dict(messages=ask("pain " * 3000)), "messages"),
                          (dict(messages=ask() * 33), "messages"),  # max_messages
                          (dict(messages=ask("ache " * 6000) * 7), "messages")):  # 210,000 chars: max_prompt_chars
        with pytest.raises(openai.BadRequestError) as info:
            c.chat.completions.create(model="prefloop", **kwargs)
        body = info.value.body
        assert info.value.status_code == 400 and body["type"] == "invalid_request_error" and body["message"]
        assert param in (body.get("param") or ""), (kwargs, body)
    raw = httpx.post(f"{gateway.url}/v1/chat/completions", content=b"{not json",
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"


def test_a_body_over_the_size_limit_gets_413_with_an_openai_error_declared_or_streamed(gateway):
    huge = json.dumps({"model": "prefloop", "messages": ask("x" * 30_000) * 20}).encode()  # 600 KB > 512 KiB
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    declared = httpx.post(f"{gateway.url}/v1/chat/completions", content=huge, headers=headers, timeout=30)
    streamed = httpx.post(f"{gateway.url}/v1/chat/completions", headers=headers, timeout=30,
                          content=(huge[i:i + 65_536] for i in range(0, len(huge), 65_536)))  # chunked
    for response in (declared, streamed):
        assert response.status_code == 413, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and "524288 bytes" in error["message"]
    assert client(gateway).chat.completions.create(model="prefloop", messages=ask(), max_tokens=4).choices


def test_feedback_pick_rating_ownership_and_once_only(gateway, kafka):
    c = client(gateway)
    two = c.chat.completions.create(model="prefloop", messages=ask(), n=2, max_tokens=40, temperature=1.0, seed=7)
    texts = [ch.message.content for ch in two.choices]
    fb = httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert texts[0].strip() != texts[1].strip()  # seeded: two different answers, so a pick means something
    other = httpx.post(f"{gateway.url}/v1/feedback", json={"response_id": two.id, "preferred_index": 1},
                       headers={"Authorization": f"Bearer {OTHER}"})
    assert other.status_code == 403 and other.json()["error"]["type"] == "permission_error"
    r = fb.post("/v1/feedback", json={"response_id": two.id, "preferred_index": 1})
    assert r.status_code == 202 and r.json()["status"] == "accepted"
    assert fb.post("/v1/feedback", json={"response_id": two.id, "preferred_index": 0}).status_code == 409
    assert fb.post("/v1/feedback", json={"response_id": "chatcmpl-nope", "preferred_index": 0}).status_code == 404
    pref = read_events(kafka.bootstrap_servers, PREFERENCES.with_prefix(kafka.topic_prefix), 1, 20)[0]
    assert (pref.chosen, pref.rejected, pref.source) == (texts[1], texts[0], "user")
    assert pref.policy_version == "v0001" and pref.judge_id.startswith("user:")
    assert (pref.chosen_cut, pref.rejected_cut) == tuple(two.choices[i].finish_reason == "length" for i in (1, 0))

    one = c.chat.completions.create(model="prefloop", messages=ask("Is my cough serious?"), max_tokens=32)
    r = fb.post("/v1/feedback", json={"response_id": one.id, "choice_index": 0, "rating": -1, "comment": "vague"})
    assert r.status_code == 202
    assert fb.post("/v1/feedback", json={"response_id": one.id, "preferred_index": 0}).status_code in (400, 409)
    prompt = read_events(kafka.bootstrap_servers, PROMPTS.with_prefix(kafka.topic_prefix), 1, 20)[0]
    assert prompt.source == "feedback" and prompt.messages[-1].content == "Is my cough serious?"
    assert prompt.extra_candidates[0].text == one.choices[0].message.content
    assert prompt.extra_candidates[0].user_rating == -1 and prompt.extra_candidates[0].origin == "served"
    feedback = read_events(kafka.bootstrap_servers, FEEDBACK.with_prefix(kafka.topic_prefix), 2, 20)
    assert {f.response_id for f in feedback} == {two.id, one.id}
    assert all(KEY not in f.model_dump_json() for f in feedback)  # the key id, never the key


def test_hot_swap_under_32_streaming_clients_fails_nothing(gateway, kafka, producer, registry_copy):
    parent = GenerationEngine.from_registry(registry_copy)
    v2 = registry_copy.save(parent.model, parent.tokenizer, kind="dpo", parent="v0001").version
    registry_copy.promote(v2)
    failures, versions, lock = [], [], threading.Lock()
    swapped = threading.Event()

    def user(i):
        c = client(gateway)
        for _ in range(40):
            try:
                seen = set()
                text = ""
                for chunk in c.chat.completions.create(model="prefloop", messages=ask(f"question {i}"), max_tokens=24,
                                                       stream=True):
                    seen.add(chunk.system_fingerprint)
                    text += "".join(ch.delta.content or "" for ch in chunk.choices)
                with lock:
                    versions.append(seen)
            except Exception as exc:  # noqa: BLE001 - any failure is the finding
                with lock:
                    failures.append(repr(exc))
            if swapped.is_set() and any(v2 in s for s in versions[-32:]):
                return

    threads = [threading.Thread(target=user, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    wait_for(lambda: len(versions) >= 32, 120, "every client streaming")
    producer.publish(MODEL_UPDATES.with_prefix(kafka.topic_prefix), [ModelUpdatedEvent(
        producer="test", version=v2, parent="v0001", kind="dpo", location=str(registry_copy.root / v2))])
    wait_for(lambda: any(v2 in s for s in versions), 120, "responses from the new version")
    swapped.set()
    for t in threads:
        t.join(180)
    assert failures == []
    assert all(len(s) == 1 for s in versions)  # no response mixes versions
    assert {v for s in versions for v in s} == {"v0001", v2}

    # A promoted version that is corrupt on disk fails to load: the gateway keeps serving v2.
    broken = registry_copy.root / "v0003"
    shutil.copytree(registry_copy.root / v2, broken)
    registry_copy.promote("v0003")
    (broken / "model.safetensors").write_bytes(b"corrupt")
    producer.publish(MODEL_UPDATES.with_prefix(kafka.topic_prefix), [ModelUpdatedEvent(
        producer="test", version="v0003", parent=v2, kind="dpo", location=str(broken))])
    wait_for(lambda: "prefloop_gateway_model_load_failures_total 1.0" in gateway.get("/metrics").text, 60,
             "the corrupt version to be refused")
    out = client(gateway).chat.completions.create(model="prefloop", messages=ask(), max_tokens=8)
    assert out.system_fingerprint == v2


def test_admin_reload_serves_the_registrys_current_version(gateway, registry_copy):
    parent = GenerationEngine.from_registry(registry_copy)
    v2 = registry_copy.save(parent.model, parent.tokenizer, kind="dpo", parent="v0001").version
    registry_copy.promote(v2)
    admin = httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
    assert httpx.post(f"{gateway.url}/admin/reload", headers={"Authorization": f"Bearer {KEY}"}).status_code == 401
    assert admin.post("/admin/reload").json()["served_version"] == v2
    registry_copy.rollback()  # what the trainer's rollback does to the registry
    assert admin.post("/admin/reload").json()["served_version"] == "v0001"
    assert admin.post("/admin/rollback").status_code == 404  # a trainer operation, not a replica's


def queued(outbox_dir) -> int:
    with sqlite3.connect(outbox_dir / "outbox.sqlite") as db:
        return db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]


def test_feedback_survives_a_broker_outage_through_the_outbox(tmp_path, registry_copy):
    from shared.broker import EmbeddedBroker
    from shared.settings import KafkaSettings
    from shared.topics import all_topics_with_dlq

    broker = EmbeddedBroker(log_file=tmp_path / "outage-broker.log").start(topics=all_topics_with_dlq())
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap)
    gw = ServiceProcess("gateway", kafka, tmp_path, registry_dir=registry_copy.root, api_keys=KEY,
                        outbox_dir=tmp_path / "outbox", outbox_retry_s=0.5, default_max_tokens=24).start()
    try:
        two = client(gw).chat.completions.create(model="prefloop", messages=ask(), n=2, temperature=1.0, seed=7)
        assert two.choices[0].message.content.strip() != two.choices[1].message.content.strip()  # seeded
        broker.stop()
        # answered within the producer's 2 s budget plus the publish timeout, not after kafka-python's
        # 30 s first-connection wait (the gateway's producer connects on its first send, here)
        r = httpx.post(f"{gw.url}/v1/feedback", json={"response_id": two.id, "preferred_index": 0},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=20)
        assert r.status_code == 202 and r.json()["status"] == "queued"
        assert queued(tmp_path / "outbox") == 2  # feedback + preference
        broker = EmbeddedBroker(port=broker.port, log_file=tmp_path / "outage-broker.log")
        broker.start(topics=all_topics_with_dlq())
        pref = wait_for(lambda: read_events(broker.bootstrap, PREFERENCES, 1, 2), 120, "the queued preference")[0]
        assert pref.source == "user" and pref.chosen == two.choices[0].message.content
        wait_for(lambda: queued(tmp_path / "outbox") == 0, 60, "the outbox to empty")
        assert 'prefloop_outbox_dead_total{outbox="feedback"} 0.0' in gw.get("/metrics").text
    finally:
        gw.kill()
        broker.stop()


def test_rate_limits_answer_429_with_retry_after_per_key(kafka, tmp_path, registry_copy):
    gw = ServiceProcess("gateway", kafka, tmp_path, registry_dir=registry_copy.root, api_keys=f"{KEY},{OTHER}",
                        requests_per_minute=2, feedback_per_minute=1, default_max_tokens=8).start()
    try:
        c = client(gw)
        first = c.chat.completions.create(model="prefloop", messages=ask())
        c.chat.completions.create(model="prefloop", messages=ask())
        with pytest.raises(openai.RateLimitError) as info:
            c.chat.completions.create(model="prefloop", messages=ask(), stream=True)
        assert info.value.status_code == 429 and info.value.body["type"] == "rate_limit_error"
        assert info.value.body["code"] == "rate_limit_exceeded"
        assert 1 <= int(info.value.response.headers["retry-after"]) <= 60
        assert client(gw, OTHER).chat.completions.create(model="prefloop", messages=ask()).choices  # per key

        fb = {"Authorization": f"Bearer {KEY}"}
        body = {"response_id": first.id, "choice_index": 0, "rating": 1}
        assert httpx.post(f"{gw.url}/v1/feedback", json=body, headers=fb).status_code == 202
        limited = httpx.post(f"{gw.url}/v1/feedback", json=body, headers=fb)
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        assert "feedback rate limit" in limited.json()["error"]["message"]
        assert 'prefloop_gateway_requests_total{status="429",stream="true"} 1.0' in gw.get("/metrics").text
    finally:
        gw.kill()


@pytest.mark.parametrize("policy", ["default_system_prompt", "previous_prompt", "off"])
def test_the_gateways_engine_reuses_only_the_public_system_prompts_cache_by_default(tiny_registry, policy):
    """Requests from different API keys share the engine: by default only the default system prompt's
    cache is reused (public text), so no request's time to first token reveals another's prompt."""
    from prometheus_client import CollectorRegistry

    from services.gateway.serving import model_follower
    from services.gateway.settings import GatewaySettings
    from shared.prompts import with_system_prompt
    from shared.wire import ChatMessage

    settings = GatewaySettings(registry_dir=str(tiny_registry), prefix_reuse=policy)
    engine = model_follower(settings, CollectorRegistry())._factory("v0001")
    try:
        pinned = engine._batcher.decoder.pinned_prefix
        if policy == "previous_prompt":
            assert pinned is None
        elif policy == "off":
            assert pinned == []
        else:
            question = ChatMessage(role="user", content="Is a fever of 38.5 C dangerous?")
            ids, _ = engine.encode_prompt(with_system_prompt([question], settings.default_system_prompt), 16)
            assert 0 < len(pinned) < len(ids) and engine._batcher.decoder._shared_prefix(ids) == len(pinned)
            own = [ChatMessage(role="system", content="You are a pirate."), question]  # a tenant's own prompt
            ids, _ = engine.encode_prompt(with_system_prompt(own, settings.default_system_prompt), 16)
            assert engine._batcher.decoder._shared_prefix(ids) == 0
    finally:
        engine.close()
