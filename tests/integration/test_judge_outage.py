"""A judge endpoint outage is waited out, not dead-lettered; `prefloop dlq replay` re-publishes dead
letters after a fix. Real broker, `prefloop serve judge`, and the fake OpenAI-protocol server."""

from __future__ import annotations

import os
import re
import subprocess

from kafka import KafkaProducer

from shared.topics import ABSTENTIONS, CANDIDATES, PREFERENCES
from tests.fake_openai import FakeOpenAI, Script
from tests.helpers import wait_for
from tests.integration.procs import PREFLOOP
from tests.integration.test_judge import BAD, GOOD, candidates, judge_proc, topic_events

FAST_BREAKER = dict(circuit_open_s=0.2, circuit_max_open_s=1.0, batch_size=4)


def metric(judge, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", judge.get("/metrics").text, re.M)
    return float(found.group(1)) if found else 0.0


def all_of(kafka, topic, count, timeout_s=60, what=""):
    return wait_for(lambda: (e := topic_events(kafka, topic, count)) and len(e) >= count and e, timeout_s,
                    what or f"{count} events on {topic.name}")


def test_an_endpoint_outage_is_waited_out_and_every_event_is_judged_when_it_returns(kafka, producer, tmp_path):
    with FakeOpenAI(Script(status=503)) as fake:
        judge = judge_proc(kafka, tmp_path, fake, **FAST_BREAKER).start()
        try:
            events = [candidates(f"Question {i} about my cough", BAD, GOOD) for i in range(6)]
            malformed = candidates("MALFORMED question", BAD, GOOD)
            producer.publish(CANDIDATES.with_prefix(kafka.topic_prefix), [*events, malformed])
            wait_for(lambda: metric(judge, "prefloop_judge_circuit_open") == 1, 60, "the breaker to open")
            sent_at_open = len(fake.script.requests)
            status = wait_for(lambda: (d := judge.get("/status").json()["detail"])["circuit_open_for_s"] >= 2 and
                              len(fake.script.requests) > sent_at_open and d, 60, "failed probes while it is down")
            assert status["circuit"] in ("open", "half_open") and status["endpoint_outages"] == 1
            health = judge.get("/healthz")
            assert health.status_code == 200 and health.json()["status"] == "ok"  # not the pod's fault
            assert topic_events(kafka, CANDIDATES.dead_letter, 1, 2) == []
            assert topic_events(kafka, ABSTENTIONS, 1, 1) == [] and topic_events(kafka, PREFERENCES, 1, 1) == []

            fake.script.status = None  # the endpoint is back
            prefs = all_of(kafka, PREFERENCES, len(events), what="a preference for every event")
            assert sorted(p.prompt_id for p in prefs) == sorted(e.prompt_id for e in events)
            dead = all_of(kafka, CANDIDATES.dead_letter, 1, what="the malformed event dead-lettered")
            assert len(dead) == 1 and "no usable verdict after 3 attempts: unusable reply" in dead[0].error
            assert [a.reason for a in topic_events(kafka, ABSTENTIONS, 1)] == ["failure"]
            assert metric(judge, "prefloop_judge_circuit_open") == 0
            assert metric(judge, "prefloop_judge_endpoint_outages_total") == 1
            assert metric(judge, "prefloop_judge_preferences_total") == len(events)  # each judged once
            port = fake.port
        except BaseException:
            judge.kill()
            raise
    try:  # the server is gone: connection refused
        later = [candidates(f"Later question {i} about my knee", BAD, GOOD) for i in range(3)]
        producer.publish(CANDIDATES.with_prefix(kafka.topic_prefix), later)
        wait_for(lambda: metric(judge, "prefloop_judge_endpoint_outages_total") == 2, 60, "the second outage")
        assert metric(judge, "prefloop_judge_circuit_open") == 1
        with FakeOpenAI(port=port):
            prefs = all_of(kafka, PREFERENCES, len(events) + len(later), what="preferences after the restart")
            assert {e.prompt_id for e in later} <= {p.prompt_id for p in prefs}
            assert len(topic_events(kafka, CANDIDATES.dead_letter, 2, 2)) == 1
            wait_for(lambda: metric(judge, "prefloop_judge_circuit_open") == 0, 30, "the breaker to close")
    finally:
        judge.kill()


def replay(kafka, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFLOOP_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
           "PREFLOOP_KAFKA_TOPIC_PREFIX": kafka.topic_prefix, "COLUMNS": "200"}
    out = subprocess.run([PREFLOOP, "dlq", "replay", "prefloop.candidates.v1", "--idle-s", "1", *args], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def test_dlq_replay_republishes_dead_letters_once_and_they_get_judged(kafka, producer, tmp_path):
    with FakeOpenAI(Script(status=404)) as fake:  # a misconfigured model name: each record's own 4xx
        judge = judge_proc(kafka, tmp_path, fake).start()
        try:
            events = [candidates(f"Replay question {i} about my ear", BAD, GOOD) for i in range(3)]
            producer.publish(CANDIDATES.with_prefix(kafka.topic_prefix), events)
            raw = KafkaProducer(bootstrap_servers=[kafka.bootstrap_servers])
            raw.send(CANDIDATES.with_prefix(kafka.topic_prefix).name, b"not json").get(30)
            raw.close()
            all_of(kafka, CANDIDATES.dead_letter, 4, what="every record dead-lettered")
            assert metric(judge, "prefloop_judge_endpoint_outages_total") == 0  # a 404 is no outage

            fake.script.status = None  # fixed
            dry = replay(kafka, "--dry-run")
            assert re.search(r"handler: judge failed: HTTP 404\s.*\s3\s", dry.stdout), dry.stdout
            assert re.search(r"decode: value is not JSON.*\s1\s", dry.stdout), dry.stdout
            assert "read 4 dead letters, 4 matching; would re-publish 3" in dry.stdout
            assert "1 still unreadable" in dry.stdout and topic_events(kafka, PREFERENCES, 1, 2) == []

            done = replay(kafka, "--reason", "HTTP 404")
            assert "read 4 dead letters, 3 matching; re-published 3" in done.stdout, done.stdout
            prefs = all_of(kafka, PREFERENCES, 3, what="the replayed events judged")
            assert sorted(p.prompt_id for p in prefs) == sorted(e.prompt_id for e in events)
            again = replay(kafka, "--reason", "HTTP 404")
            assert "read 0 dead letters" in again.stdout, again.stdout
            assert len(topic_events(kafka, PREFERENCES, 4, 3)) == 3
        finally:
            judge.kill()
